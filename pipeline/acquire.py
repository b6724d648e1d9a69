"""Acquire: fetch the four IDX files from a source into content-addressed storage.

Sources are a local folder or ``file://`` URI, an ``http(s)://`` URL prefix, or an ``s3://``
prefix (see :mod:`pipeline.sources`). Each file is streamed (with a progress bar on a terminal)
into a staging folder while two sha256 digests are taken: of the bytes as served, and of the
decompressed IDX content, which stays the same when a distributor recompresses the file (Debian
does). The files are then stored under ``raw/<dataset_hash>/`` with a ``MANIFEST.json`` written
last, so a folder without a manifest is never taken for a complete dataset.

A per-source record (``sources/<hash of URI>.json``) remembers each file's cheap fingerprint
(size and mtime, ETag, Last-Modified): a rerun on an unchanged source fetches and writes nothing.

Returns a :class:`~pipeline.refs.RawDatasetRef`.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

from pipeline.config import IDX_FILES, AcquireConfig
from pipeline.errors import ChecksumMismatchError, CorruptFileError
from pipeline.idx import GZIP_MAGIC
from pipeline.refs import RawDatasetRef
from pipeline.sources import Source, open_source
from pipeline.storage import Storage

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"


def dataset_hash(content_sha256: dict[str, str]) -> str:
    """Identity of a dataset: its files' names and decompressed-content digests."""
    lines = "".join(f"{name} {digest}\n" for name, digest in sorted(content_sha256.items()))
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def _source_key(source_uri: str) -> str:
    return f"sources/{hashlib.sha256(source_uri.encode()).hexdigest()[:16]}.json"


def _fetch(source: Source, name: str, dest: Path) -> dict[str, Any]:
    """Stream one file to ``dest``; return its size and both digests."""
    from tqdm import tqdm

    chunks, total = source.stream(name)
    file_digest, content_digest = hashlib.sha256(), hashlib.sha256()
    inflater: Any = None
    size = 0
    with dest.open("wb") as out, tqdm(
        total=total, unit="B", unit_scale=True, desc=name, disable=not sys.stderr.isatty(), leave=False
    ) as bar:
        for block in chunks:
            if inflater is None:
                # wbits=31: a gzip stream; anything else is taken as raw IDX bytes.
                inflater = zlib.decompressobj(31) if block.startswith(GZIP_MAGIC) else False
            out.write(block)
            file_digest.update(block)
            size += len(block)
            bar.update(len(block))
            if inflater:
                try:
                    content_digest.update(inflater.decompress(block))
                except zlib.error as exc:
                    raise CorruptFileError(source.file_uri(name), "a valid gzip stream", str(exc)) from exc
            else:
                content_digest.update(block)
    if inflater and not inflater.eof:
        raise CorruptFileError(source.file_uri(name), "a complete gzip stream", f"truncated after {size} bytes")
    if total is not None and size != total:
        raise CorruptFileError(source.file_uri(name), f"{total} bytes", f"{size} bytes")
    return {"size": size, "sha256": file_digest.hexdigest(), "content_sha256": content_digest.hexdigest()}


def _verify(config: AcquireConfig, source: Source, name: str, info: dict[str, Any]) -> None:
    expected = config.expected_sha256.get(name)
    if expected and expected.lower() not in (info["sha256"], info["content_sha256"]):
        raise ChecksumMismatchError(
            source.file_uri(name), f"sha256 {expected.lower()}", f"{info['content_sha256']} (content)"
        )


def acquire(config: AcquireConfig, storage: Storage) -> RawDatasetRef:
    """Fetch the dataset named by ``config.source_uri`` into ``storage`` (idempotent)."""
    source = open_source(config.source_uri)
    names = list(IDX_FILES.values())
    fingerprints = {name: source.fingerprint(name) for name in names}

    record_key = _source_key(config.source_uri)
    if storage.exists(record_key):
        record = storage.get_json(record_key)
        raw_manifest = f"raw/{record['dataset_hash']}/{MANIFEST}"
        if record["fingerprints"] == fingerprints and storage.exists(raw_manifest):
            manifest = storage.get_json(raw_manifest)
            for name in names:
                _verify(config, source, name, manifest["files"][name])
            log.info("source %s unchanged: reusing raw/%s", config.source_uri, record["dataset_hash"])
            return RawDatasetRef(
                dataset_hash=record["dataset_hash"],
                uri=storage.uri(f"raw/{record['dataset_hash']}"),
                source_uri=config.source_uri,
                files=manifest["files"],
            )

    with tempfile.TemporaryDirectory(prefix="acquire-") as staging:
        files = {}
        for name in names:
            files[name] = _fetch(source, name, Path(staging) / name)
            _verify(config, source, name, files[name])
            log.info("fetched %s: %d bytes, sha256 %s", source.file_uri(name), files[name]["size"], files[name]["sha256"])
        digest = dataset_hash({name: info["content_sha256"] for name, info in files.items()})
        prefix = f"raw/{digest}"
        if not storage.exists(f"{prefix}/{MANIFEST}"):
            for name in names:
                storage.put_file(Path(staging) / name, f"{prefix}/{name}")
            storage.put_json({"dataset_hash": digest, "files": files}, f"{prefix}/{MANIFEST}")
    storage.put_json(
        {"source_uri": config.source_uri, "fingerprints": fingerprints, "dataset_hash": digest}, record_key
    )
    return RawDatasetRef(
        dataset_hash=digest, uri=storage.uri(prefix), source_uri=config.source_uri, files=files, fetched=names
    )


def load_raw_ref(storage: Storage, digest: str) -> RawDatasetRef:
    """Rebuild the reference of a dataset already in storage (for CLI subcommands)."""
    manifest = storage.get_json(f"raw/{digest}/{MANIFEST}")
    return RawDatasetRef(dataset_hash=digest, uri=storage.uri(f"raw/{digest}"), source_uri="", files=manifest["files"])


def load_raw_splits(raw: RawDatasetRef, storage: Storage) -> dict[str, tuple[Any, Any]]:
    """``{"train": (images, labels), "test": (images, labels)}`` read strictly from storage."""
    from pipeline.idx import read_split

    prefix = f"raw/{raw.dataset_hash}"
    return {
        split: read_split(
            storage.local_path(f"{prefix}/{IDX_FILES[f'{split}_images']}"),
            storage.local_path(f"{prefix}/{IDX_FILES[f'{split}_labels']}"),
        )
        for split in ("train", "test")
    }
