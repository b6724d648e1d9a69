"""Dataset sources: a local folder (or ``file://``), an ``http(s)://`` URL prefix
(:mod:`pipeline.data.http_source`), an ``s3://`` prefix (:mod:`pipeline.data.s3_source`). Each can
tell a file's cheap fingerprint (size and mtime, ETag or Last-Modified) without downloading it, so
that an unchanged source is not fetched again, and can stream a file; :func:`open_source` picks
the kind from the URI.

What a source may do is bounded (:class:`~pipeline.config.SourceLimits`, read from the
environment): an HTTP source follows redirects only to its own scheme, host and port, or to a
host in ``PIPELINE_REDIRECT_HOSTS``; an announced size over ``PIPELINE_MAX_DOWNLOAD_BYTES`` is
refused before the body is read; a local source follows no symbolic link out of its folder.
Messages show :meth:`Source.file_uri`, with credentials redacted; only requests use the full URI.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.config import SourceLimits
from pipeline.errors import SourceNotFoundError
from pipeline.redact import redact_uri

CHUNK = 1 << 20


class Source:
    uri: str

    def fingerprint(self, name: str) -> dict[str, Any] | None:
        """Metadata that changes when the file changes, or None when the source cannot tell;
        raises if the file is missing."""
        raise NotImplementedError

    def stream(self, name: str) -> tuple[Iterator[bytes], int | None]:
        """The file's bytes in chunks, and its size when known."""
        raise NotImplementedError

    def folders(self) -> list[str]:
        """Every folder under the source (empty ones included, where the source has folders)."""
        return []

    def names(self) -> list[str]:
        """Every file under the source, by relative POSIX name, sorted (hidden ones left out)."""
        raise SourceNotFoundError(
            redact_uri(self.uri),
            "a source that can list its files (a folder or s3://), or the URL of an archive or a manifest",
            "an HTTP prefix, which cannot be listed",
        )

    def file_uri(self, name: str) -> str:
        """The file's URI as messages, logs and records show it: credentials redacted."""
        return redact_uri(self._file_url(name))

    def _file_url(self, name: str) -> str:
        """The file's full URI, credentials included: for requests only."""
        return f"{self.uri.rstrip('/')}/{name}"


class LocalSource(Source):
    """A folder. A symbolic link in it is followed only when its target, resolved, is inside the
    folder too (a file shared between two names); one that leads out of it is refused, so a
    source folder cannot make the worker copy any file it can read."""

    def __init__(self, folder: Path, uri: str) -> None:
        self.folder = folder
        self.uri = uri
        self._listed: dict[str, tuple[Path, dict[str, Any]]] = {}
        """What :meth:`names` found and checked: each file's resolved path and fingerprint."""

    def _path(self, name: str) -> Path:
        if name in self._listed:
            return self._listed[name][0]
        path = self.folder / name
        if not path.is_file():
            if not self.folder.is_dir():
                raise SourceNotFoundError(self.uri, "an existing folder", "no such folder")
            raise SourceNotFoundError(str(path), "a file", "no such file")
        real = path.resolve()
        if not real.is_relative_to(self.folder.resolve()):
            raise SourceNotFoundError(
                str(path), "a file inside the source folder", "a symbolic link to a file outside it"
            )
        return real

    def fingerprint(self, name: str) -> dict[str, Any]:
        if name in self._listed:
            return self._listed[name][1]
        st = self._path(name).stat()
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def folders(self) -> list[str]:
        found = []
        for root, folders, _ in os.walk(self.folder):
            folders[:] = [f for f in folders if not f.startswith(".")]
            base = Path(root).relative_to(self.folder)
            found += [(base / f).as_posix() for f in folders]
        return sorted(found)

    def names(self) -> list[str]:
        """Every file, each checked as :meth:`_path` checks one (a link must stay inside the
        folder), with one ``stat`` each: tens of thousands of images are listed in a second."""
        if not self.folder.is_dir():
            raise SourceNotFoundError(self.uri, "an existing folder", "no such folder")
        inside = str(self.folder.resolve())
        listed: dict[str, tuple[Path, dict[str, Any]]] = {}
        pending = [("", inside)]
        while pending:  # os.scandir and plain strings: pathlib costs more than the stat calls
            relative, folder = pending.pop()
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    name = f"{relative}{entry.name}"
                    if entry.is_dir(follow_symlinks=False):
                        pending.append((f"{name}/", entry.path))
                        continue
                    real = os.path.realpath(entry.path) if entry.is_symlink() else entry.path
                    if not (real == inside or real.startswith(inside + os.sep)):
                        raise SourceNotFoundError(
                            str(self.folder / name),
                            "a file inside the source folder",
                            "a symbolic link to a file outside it",
                        )
                    if not (os.path.isfile(real) if entry.is_symlink() else entry.is_file()):
                        continue
                    st = entry.stat() if real is entry.path else os.stat(real)
                    listed[name] = (Path(real), {"size": st.st_size, "mtime_ns": st.st_mtime_ns})
        self._listed = listed
        return sorted(listed)

    def stream(self, name: str) -> tuple[Iterator[bytes], int | None]:
        path = self._path(name)

        def chunks() -> Iterator[bytes]:
            # O_NOFOLLOW: a link put in place of the checked file since is not followed either.
            with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as fh:
                while block := fh.read(CHUNK):
                    yield block

        return chunks(), self._listed[name][1]["size"] if name in self._listed else path.stat().st_size


def split_uri(uri: str) -> tuple[str, str]:
    """``(parent, file name)`` of a file's URI (an HTTP query stays with the parent)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme else uri)
        return (f"file://{path.parent}" if parsed.scheme else str(path.parent)), path.name
    head, _, name = parsed.path.rpartition("/")
    return parsed._replace(path=head).geturl(), name


def open_source(uri: str, limits: SourceLimits | None = None) -> Source:
    """The :class:`Source` for a folder path, ``file://``, ``http(s)://`` or ``s3://`` URI,
    bounded by ``limits`` (default: :meth:`SourceLimits.from_env`)."""
    # Imported here: both subclass Source, defined above.
    from pipeline.data.http_source import HttpSource
    from pipeline.data.s3_source import S3Source

    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        return HttpSource(uri, limits)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise SourceNotFoundError("source_uri", "s3://bucket/prefix", redact_uri(uri))
        return S3Source(uri, limits)
    if parsed.scheme == "file":
        return LocalSource(Path(parsed.path), uri)
    if parsed.scheme == "":
        return LocalSource(Path(uri).expanduser(), uri)
    raise SourceNotFoundError("source_uri", "a folder, file://, http(s):// or s3:// URI", redact_uri(uri))
