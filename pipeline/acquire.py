"""Acquire: fetch the four IDX files from a source into content-addressed storage.

Sources are a local folder or ``file://`` URI, an ``http(s)://`` URL prefix, or an ``s3://``
prefix (see :mod:`pipeline.sources`). Each file is streamed (with a progress bar on a terminal)
into a staging folder while two sha256 digests are taken: of the bytes as served, and of the
decompressed IDX content, which stays the same when a distributor recompresses the file (Debian
does). The files are then stored under ``raw/<dataset_hash>/`` with a ``MANIFEST.json`` written
last, so a folder without a manifest is never taken for a complete dataset.

A per-source record (``sources/<hash of URI>.json``) remembers each file's cheap fingerprint
(size and mtime, ETag, Last-Modified) and digests: a rerun on an unchanged source fetches and
writes nothing. A source that cannot tell (an HTTP server without ETag or Last-Modified, or
one that refuses HEAD) is fetched every time.

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
from pipeline.errors import ChecksumMismatchError, CorruptFileError, ReferenceNotFoundError
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


class _Gunzip:
    """Incremental gunzip that follows every gzip member (as ``gzip.decompress`` does); bytes
    that do not start with the gzip magic pass through as raw IDX.

    A stream that is broken as served (bad deflate data, or cut short with a matching length)
    is not a transport error: ``broken`` says so and the caller stores the bytes as they are,
    so that ``validate``'s strict IDX reader rejects the dataset with the file named, and the
    raw zone stays a faithful copy of what the source served.
    """

    def __init__(self) -> None:
        self.inflater: Any = None
        self.compressed: bool | None = None
        self.broken = False

    def feed(self, block: bytes) -> bytes:
        if self.compressed is None:
            self.compressed = block.startswith(GZIP_MAGIC)
        if not self.compressed:
            return block
        out = []
        while block and not self.broken:
            if self.inflater is None:
                self.inflater = zlib.decompressobj(31)
            try:
                out.append(self.inflater.decompress(block))
            except zlib.error:
                self.broken = True
                break
            if not self.inflater.eof:
                break
            block, self.inflater = self.inflater.unused_data, None  # the next member, if any
        return b"".join(out)

    def finish(self) -> None:
        if self.inflater is not None and not self.inflater.eof:
            self.broken = True


def fetch_file(source: Source, name: str, dest: Path) -> dict[str, Any]:
    """Stream one file to ``dest``; return its size and both digests.

    A transfer cut short (fewer bytes than the source announced) raises; a file that is itself
    a broken gzip stream is kept, with the content digest taken over its bytes, for
    ``validate`` to reject.
    """
    from tqdm import tqdm

    chunks, total = source.stream(name)
    file_digest, content_digest = hashlib.sha256(), hashlib.sha256()
    gunzip = _Gunzip()
    size = 0
    with dest.open("wb") as out, tqdm(
        total=total, unit="B", unit_scale=True, desc=name, disable=not sys.stderr.isatty(), leave=False
    ) as bar:
        for block in chunks:
            out.write(block)
            file_digest.update(block)
            content_digest.update(gunzip.feed(block))
            size += len(block)
            bar.update(len(block))
    if total is not None and size != total:
        raise CorruptFileError(source.file_uri(name), f"{total} bytes", f"{size} bytes")
    gunzip.finish()
    if gunzip.broken:
        log.warning("%s is not a complete gzip stream; storing it as served for validate to judge", source.file_uri(name))
        return {"size": size, "sha256": file_digest.hexdigest(), "content_sha256": file_digest.hexdigest()}
    return {"size": size, "sha256": file_digest.hexdigest(), "content_sha256": content_digest.hexdigest()}


def _verify(config: AcquireConfig, source: Source, name: str, info: dict[str, Any]) -> None:
    expected = config.expected_sha256.get(name)
    if expected and expected.lower() not in (info["sha256"], info["content_sha256"]):
        raise ChecksumMismatchError(
            source.file_uri(name),
            f"sha256 {expected.lower()}",
            f"{info['sha256']} (bytes) and {info['content_sha256']} (content)",
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
        unknown = any(fp is None for fp in fingerprints.values())
        if not unknown and record["fingerprints"] == fingerprints and "files" in record and storage.exists(raw_manifest):
            # This source's own digests: another source may have stored the same content
            # under different bytes (recompressed), and checksums refer to what is served here.
            files = record["files"]
            for name in names:
                _verify(config, source, name, files[name])
            log.info("source %s unchanged: reusing raw/%s", config.source_uri, record["dataset_hash"])
            return RawDatasetRef(
                dataset_hash=record["dataset_hash"],
                uri=storage.uri(f"raw/{record['dataset_hash']}"),
                source_uri=config.source_uri,
                files=files,
            )

    with tempfile.TemporaryDirectory(prefix="acquire-") as staging:
        files = {}
        for name in names:
            files[name] = fetch_file(source, name, Path(staging) / name)
            _verify(config, source, name, files[name])
            log.info("fetched %s: %d bytes, sha256 %s", source.file_uri(name), files[name]["size"], files[name]["sha256"])
        digest = dataset_hash({name: info["content_sha256"] for name, info in files.items()})
        prefix = f"raw/{digest}"
        if not storage.exists(f"{prefix}/{MANIFEST}"):
            for name in names:
                storage.put_file(Path(staging) / name, f"{prefix}/{name}")
            storage.put_json({"dataset_hash": digest, "files": files}, f"{prefix}/{MANIFEST}")
    storage.put_json(
        {"source_uri": config.source_uri, "fingerprints": fingerprints, "dataset_hash": digest, "files": files},
        record_key
    )
    return RawDatasetRef(
        dataset_hash=digest, uri=storage.uri(prefix), source_uri=config.source_uri, files=files, fetched=names
    )


def load_raw_ref(storage: Storage, digest: str) -> RawDatasetRef:
    """Rebuild the reference of a dataset already in storage (for CLI subcommands)."""
    if not storage.exists(f"raw/{digest}/{MANIFEST}"):
        raise ReferenceNotFoundError("--dataset", f"a dataset hash under {storage.uri('raw')}", repr(digest))
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
