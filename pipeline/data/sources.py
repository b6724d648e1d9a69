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

    def _path(self, name: str) -> Path:
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
        st = self._path(name).stat()
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def stream(self, name: str) -> tuple[Iterator[bytes], int | None]:
        path = self._path(name)

        def chunks() -> Iterator[bytes]:
            # O_NOFOLLOW: a link put in place of the checked file since is not followed either.
            with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as fh:
                while block := fh.read(CHUNK):
                    yield block

        return chunks(), path.stat().st_size


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
