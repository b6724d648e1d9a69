"""Acquire a dataset of image files: an archive, a manifest or a folder of class folders.

:func:`pipeline.data.acquire.acquire` hands every source that is not the four IDX files here.

* An archive (``.tar``, ``.tar.gz``, ``.tgz``, ``.zip``), by any URI: fetched as one file and
  stored as served, under ``raw/<dataset_hash>/``, its hash over the decompressed content (the
  same tar recompressed is the same dataset).
* A folder (local, ``file://`` or ``s3://``): listed, and every file (images, a manifest, a
  README) packed into one uncompressed ``images.tar`` in sorted order with fixed metadata, so
  the same files give the same bytes and the same hash, and storage holds one object, not tens of
  thousands; the hash is over the files' names and contents.
* A manifest by URL (``…/labels.csv`` or ``.parquet``, for a source that cannot be listed such as
  HTTP): the manifest, then every file it names (relative to it), packed as a folder is.

Reading the files (layout, labels, decoding) is :mod:`pipeline.data.dataset`'s, at validation.
Every file is bounded as the IDX files are (:class:`~pipeline.config.SourceLimits`); a source
unchanged since the last call (same listing, sizes and mtimes or ETags) is not fetched again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.config import AcquireConfig, SourceLimits
from pipeline.config.settings import MANIFEST_NAMES, dataset_name
from pipeline.data.layouts import is_archive, open_members
from pipeline.data.sources import Source, open_source, split_uri
from pipeline.errors import ChecksumMismatchError, DatasetLayoutError, SourceLimitError
from pipeline.redact import redact_uri
from pipeline.refs import RawDatasetRef
from pipeline.storage import Storage

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
PACKED = "images.tar"


def content_hash(digests: dict[str, str]) -> str:
    lines = "".join(f"{name} {digest}\n" for name, digest in sorted(digests.items()))
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def _source_key(source_uri: str) -> str:
    return f"sources/{hashlib.sha256(source_uri.encode()).hexdigest()[:16]}.json"


def _read_all(source: Source, name: str, limits: SourceLimits, budget: int) -> bytes:
    """One file's bytes, within the download limits and what is left of the dataset's budget."""
    where = source.file_uri(name)
    deadline = time.monotonic() + limits.download_deadline_s
    chunks, total = source.stream(name)
    cap = min(limits.max_download_bytes, budget)
    parts, size = [], 0
    try:
        if total is not None and total > cap:
            raise SourceLimitError(where, _limit_text(limits, budget), f"a file of {total} bytes")
        for block in chunks:
            size += len(block)
            if size > cap:
                raise SourceLimitError(where, _limit_text(limits, budget), f"more than {cap} bytes")
            if time.monotonic() > deadline:
                raise SourceLimitError(
                    where,
                    f"a download within {limits.download_deadline_s:g} s (PIPELINE_DOWNLOAD_DEADLINE_S)",
                    f"{size} bytes by then, not the end",
                )
            parts.append(block)
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    return b"".join(parts)


def _limit_text(limits: SourceLimits, budget: int) -> str:
    if budget < limits.max_download_bytes:
        return f"at most {budget} more bytes of the dataset (PIPELINE_MAX_DATASET_BYTES)"
    return f"at most {limits.max_download_bytes} bytes (PIPELINE_MAX_DOWNLOAD_BYTES)"


def _verify(config: AcquireConfig, where: str, name: str, digest: str) -> None:
    expected = config.expected_sha256.get(name)
    if expected and expected.lower() != digest:
        raise ChecksumMismatchError(where, f"sha256 {expected.lower()}", digest)


def _listing(
    config: AcquireConfig, limits: SourceLimits, source: Source | None = None, names: list[str] | None = None
) -> tuple[Source, list[str], str | None]:
    """The source to read, the files to take from it (``source`` and ``names`` when already
    listed), and the single file (archive or manifest) the URI names, if it names one."""
    uri = config.source_uri
    if source is not None and names is not None:
        return source, names, None
    _, last = split_uri(uri.rstrip("/"))
    if is_archive(last) or last in MANIFEST_NAMES or last.endswith(".parquet"):
        parent, name = split_uri(uri)
        return open_source(parent, limits), [name], name
    source = open_source(uri, limits)
    return source, source.names(), None


def empty_folders(folders: list[str], files: dict[str, bytes]) -> list[str]:
    """The folders no file is under: the only ones a listing of files does not imply (S3 has no
    folders), so the same files give the same hash from a disk or a bucket."""
    holding = {str(parent) for name in files for parent in PurePosixPath(name).parents}
    return [folder for folder in folders if folder not in holding]


def _fingerprint(source: Source, names: list[str], single: str | None) -> str | None:
    """One digest of every file's cheap fingerprint (sizes and mtimes, ETags), or None when the
    source cannot tell, or the URI names a manifest (the files it names are not fingerprinted:
    such a source is fetched every time; decoding still happens once per content)."""
    if single is not None and not is_archive(single):
        return None
    prints = [source.fingerprint(name) for name in names]
    if any(p is None for p in prints):
        return None
    lines = json.dumps([list(zip(names, prints, strict=True)), source.folders()], sort_keys=True, default=str)
    return hashlib.sha256(lines.encode()).hexdigest()


def _pack(files: dict[str, bytes], dest: Path, folders: list[str]) -> None:
    """``files`` (and ``folders``, so that an empty class folder is seen) as an uncompressed tar
    with fixed metadata, members sorted: same files, same bytes."""
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as out:
        for name in sorted(folders):
            info = tarfile.TarInfo(name)
            info.type, info.mtime, info.mode = tarfile.DIRTYPE, 0, 0o755
            out.addfile(info)
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(files[name]), 0, 0o644
            out.addfile(info, io.BytesIO(files[name]))


def acquire_images(
    config: AcquireConfig,
    storage: Storage,
    limits: SourceLimits,
    source: Source | None = None,
    names: list[str] | None = None,
) -> RawDatasetRef:
    """Fetch an image dataset's files into ``storage`` (idempotent; see the module docstring);
    ``source`` and ``names``: the source's listing, when the caller made one."""
    shown = redact_uri(config.source_uri)
    source, names, single = _listing(config, limits, source, names)
    fingerprints = _fingerprint(source, names, single)
    reading = {**config.reading(), "dataset_name": config.dataset_name or dataset_name(config.source_uri)}
    record_key = _source_key(config.source_uri)
    if storage.exists(record_key) and fingerprints is not None:
        record = storage.get_json(record_key)
        if record.get("fingerprints") == fingerprints and storage.exists(f"raw/{record['dataset_hash']}/{MANIFEST}"):
            log.info("source %s unchanged: reusing raw/%s", shown, record["dataset_hash"])
            layout: str = config.format if config.format != "auto" else record["layout"]  # a reading setting
            return _ref(storage, record["dataset_hash"], shown, record["files"], layout, reading, [])

    budget = limits.max_dataset_bytes
    with tempfile.TemporaryDirectory(prefix="acquire-") as staging:
        if single is not None and is_archive(single):
            from pipeline.data.acquire import fetch_file

            stored = single
            info = fetch_file(source, single, Path(staging) / single, limits, budget)
            _verify(config, source.file_uri(single), single, info["sha256"])
            files = {single: info}
            digest = content_hash({single: info["content_sha256"]})
            fetched = [single]
        else:
            if single is not None:  # a manifest: it, then the files it names beside it
                manifest = _read_all(source, single, limits, budget)
                names = [single, *_manifest_paths(single, manifest, source.file_uri(single))]
                taken = {single: manifest}
                budget -= len(manifest)
            else:
                taken = {}
            for name in names:
                if name not in taken:
                    taken[name] = _read_all(source, name, limits, budget)
                    budget -= len(taken[name])
            digests = {name: hashlib.sha256(data).hexdigest() for name, data in taken.items()}
            for name, hexdigest in digests.items():
                _verify(config, source.file_uri(name), name, hexdigest)
            stored = PACKED
            folders = empty_folders(source.folders(), taken) if single is None else []
            _pack(taken, Path(staging) / PACKED, folders)
            del taken
            packed = (Path(staging) / PACKED).read_bytes()
            files = {PACKED: {"size": len(packed), "sha256": hashlib.sha256(packed).hexdigest(), "files": len(digests)}}
            del packed
            digest = content_hash({**digests, **{f"{folder}/": "folder" for folder in folders}})
            fetched_names = sorted(digests)
            fetched = [PACKED]
        from pipeline.data.layouts import detect_layout

        if config.format != "auto":
            layout = config.format
        elif stored == PACKED:
            layout = str(detect_layout(fetched_names, shown))
        else:
            with open_members(Path(staging) / stored) as members:
                layout = str(detect_layout(members.names(), shown))
        if layout == "idx":
            raise DatasetLayoutError(shown, "images (the four IDX files are read from a folder or prefix)", "IDX files")
        prefix = f"raw/{digest}"
        if not storage.exists(f"{prefix}/{MANIFEST}"):
            storage.put_file(Path(staging) / stored, f"{prefix}/{stored}")
            stored_manifest = {
                "dataset_hash": digest,
                "files": files,
                "layout": layout,
                "dataset_name": reading["dataset_name"],
            }
            storage.put_json(stored_manifest, f"{prefix}/{MANIFEST}")
    storage.put_json(
        {"source_uri": shown, "fingerprints": fingerprints, "dataset_hash": digest, "files": files, "layout": layout},
        record_key,
    )
    log.info("stored %s of %s as %s/%s (%s layout)", files[stored].get("files", 1), shown, prefix, stored, layout)
    return _ref(storage, digest, shown, files, layout, reading, fetched)


def _ref(
    storage: Storage,
    digest: str,
    shown: str,
    files: dict[str, Any],
    layout: str,
    reading: dict[str, Any],
    fetched: list[str],
) -> RawDatasetRef:
    return RawDatasetRef(
        dataset_hash=digest,
        uri=storage.uri(f"raw/{digest}"),
        source_uri=shown,
        files=files,
        fetched=fetched,
        layout=layout,
        read=reading,
    )


def _manifest_paths(name: str, data: bytes, where: str) -> list[str]:
    """The relative paths a manifest names (absolute URIs and ``..`` are refused)."""
    from pipeline.data.layouts import read_manifest

    table = read_manifest(name, data, where)
    paths = []
    for row, path in enumerate(table["path"].astype(str), start=2):
        parts = PurePosixPath(path)
        if "://" in path or parts.is_absolute() or ".." in parts.parts:
            raise DatasetLayoutError(
                f"{where} row {row}", "a path relative to the manifest, inside its folder", repr(path)
            )
        paths.append(str(parts))
    return sorted(set(paths))
