"""Acquire: fetch a dataset from a source into content-addressed storage.

The four IDX files are fetched here; any other dataset (class folders, a manifest, an archive)
by :mod:`pipeline.data.acquire_images`, which :func:`acquire` hands it to.

Sources are a local folder or ``file://`` URI, an ``http(s)://`` URL prefix, or an ``s3://``
prefix (see :mod:`pipeline.data.sources`). Each file is streamed (with a progress bar on a terminal)
into a staging folder while two sha256 digests are taken: of the bytes as served, and of the
decompressed IDX content, which stays the same when a distributor recompresses the file (Debian
does). The files are then stored under ``raw/<dataset_hash>/`` with a ``MANIFEST.json`` written
last, so a folder without a manifest is never taken for a complete dataset.

Every file is bounded (:class:`~pipeline.config.SourceLimits`, operator settings from the
environment): its bytes as served by ``PIPELINE_MAX_DOWNLOAD_BYTES``, its download time by
``PIPELINE_DOWNLOAD_DEADLINE_S``, and the dataset's decompressed content by
``PIPELINE_MAX_DATASET_BYTES`` (an IDX header that declares more stops the download at once). A
breach raises :class:`~pipeline.errors.SourceLimitError` and leaves nothing in the staging
folder or in storage. URIs are shown, logged and recorded with their credentials redacted.

A per-source record (``sources/<hash of URI>.json``) remembers each file's cheap fingerprint
(size and mtime, ETag, Last-Modified) and digests: a rerun on an unchanged source fetches and
writes nothing. A source that cannot tell (an HTTP server without ETag or Last-Modified, or
one that refuses HEAD) is fetched every time.

Returns a :class:`~pipeline.refs.RawDatasetRef`.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.config import IDX_FILES, AcquireConfig, SourceLimits
from pipeline.config.settings import dataset_name
from pipeline.data.idx import IDX_DTYPES, ContentStream
from pipeline.data.sources import Source, open_source, split_uri
from pipeline.errors import (
    ChecksumMismatchError,
    ConfigError,
    CorruptFileError,
    ReferenceNotFoundError,
    SourceLimitError,
    SourceNotFoundError,
)
from pipeline.redact import redact_uri
from pipeline.refs import RawDatasetRef
from pipeline.storage import Storage

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"


def dataset_hash(content_sha256: dict[str, str]) -> str:
    """Identity of a dataset: its files' names and decompressed-content digests."""
    lines = "".join(f"{name} {digest}\n" for name, digest in sorted(content_sha256.items()))
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def _source_key(source_uri: str) -> str:
    return f"sources/{hashlib.sha256(source_uri.encode()).hexdigest()[:16]}.json"


def _declared_size(head: bytes) -> int | None:
    """Content bytes an IDX header declares (header included), or None if ``head`` is not one."""
    if len(head) < 4 or head[:2] != b"\x00\x00" or head[2] not in IDX_DTYPES or len(head) < 4 + 4 * head[3]:
        return None
    size = IDX_DTYPES[head[2]].itemsize
    for dim in struct.unpack(f">{head[3]}I", head[4 : 4 + 4 * head[3]]):
        size *= dim
    return 4 + 4 * head[3] + size


class _Content:
    """The content digest of a file as it streams in, its size bounded by ``budget``.

    A stream that is broken as served (bad deflate data, or cut short with a matching length)
    is not a transport error: ``broken`` says so and the caller stores the bytes as they are,
    so that ``validate``'s strict IDX reader rejects the dataset with the file named, and the
    raw zone stays a faithful copy of what the source served."""

    def __init__(self, where: str, budget: int) -> None:
        self.where, self.budget = where, budget
        self.stream = ContentStream(where)
        self.digest = hashlib.sha256()
        self.size = 0
        self.head = b""
        self.broken = False

    def _take(self, piece: bytes) -> None:
        if len(self.head) < 1024:  # the longest IDX header: 4 + 4 * 255 bytes
            self.head += piece[: 1024 - len(self.head)]
            declared = _declared_size(self.head)
            if declared is not None and declared > self.budget:
                self._refuse(f"a header declaring {declared} bytes")
        self.size += len(piece)
        if self.size > self.budget:
            self._refuse(f"more than {self.budget} bytes")
        self.digest.update(piece)

    def _refuse(self, found: str) -> None:
        raise SourceLimitError(
            self.where, f"at most {self.budget} bytes of decompressed content (PIPELINE_MAX_DATASET_BYTES)", found
        )

    def feed(self, block: bytes) -> None:
        if self.broken:
            return
        try:
            for piece in self.stream.feed(block):
                self._take(piece)
        except CorruptFileError:
            self.broken = True

    def finish(self) -> None:
        if self.broken:
            return
        try:
            for piece in self.stream.finish():
                self._take(piece)
        except CorruptFileError:
            self.broken = True


def fetch_file(
    source: Source, name: str, dest: Path, limits: SourceLimits | None = None, budget: int | None = None
) -> dict[str, Any]:
    """Stream one file to ``dest``; return its size, both digests and its content's size.

    A transfer cut short (fewer bytes than the source announced) raises; a file that is itself
    a broken gzip stream is kept, with the content digest taken over its bytes, for
    ``validate`` to reject. ``limits`` (default: from the environment) bound the download;
    ``budget`` (default ``limits.max_dataset_bytes``) bounds the decompressed content.
    """
    from tqdm import tqdm

    limits = limits or SourceLimits.from_env()
    where = source.file_uri(name)
    deadline = time.monotonic() + limits.download_deadline_s
    chunks, total = source.stream(name)
    try:
        if total is not None and total > limits.max_download_bytes:
            raise SourceLimitError(
                where,
                f"at most {limits.max_download_bytes} bytes (PIPELINE_MAX_DOWNLOAD_BYTES)",
                f"a file of {total} bytes",
            )
        file_digest = hashlib.sha256()
        content = _Content(where, limits.max_dataset_bytes if budget is None else budget)
        size = 0
        with (
            dest.open("wb") as out,
            tqdm(
                total=total, unit="B", unit_scale=True, desc=name, disable=not sys.stderr.isatty(), leave=False
            ) as bar,
        ):
            for block in chunks:
                size += len(block)
                if size > limits.max_download_bytes:
                    raise SourceLimitError(
                        where,
                        f"at most {limits.max_download_bytes} bytes (PIPELINE_MAX_DOWNLOAD_BYTES)",
                        f"more than {limits.max_download_bytes}",
                    )
                if time.monotonic() > deadline:
                    raise SourceLimitError(
                        where,
                        f"a download within {limits.download_deadline_s:g} s (PIPELINE_DOWNLOAD_DEADLINE_S)",
                        f"{size} bytes by then, not the end",
                    )
                out.write(block)
                file_digest.update(block)
                content.feed(block)
                bar.update(len(block))
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    if total is not None and size != total:
        dest.unlink(missing_ok=True)
        raise CorruptFileError(where, f"{total} bytes", f"{size} bytes")
    content.finish()
    if content.broken:
        log.warning("%s is not a complete gzip stream; storing it as served for validate to judge", where)
        return {
            "size": size,
            "sha256": file_digest.hexdigest(),
            "content_sha256": file_digest.hexdigest(),
            "content_size": size,
        }
    return {
        "size": size,
        "sha256": file_digest.hexdigest(),
        "content_sha256": content.digest.hexdigest(),
        "content_size": content.size,
    }


def _verify(config: AcquireConfig, source: Source, name: str, info: dict[str, Any]) -> None:
    expected = config.expected_sha256.get(name)
    if expected and expected.lower() not in (info["sha256"], info["content_sha256"]):
        raise ChecksumMismatchError(
            source.file_uri(name),
            f"sha256 {expected.lower()}",
            f"{info['sha256']} (bytes) and {info['content_sha256']} (content)",
        )


def acquire(config: AcquireConfig, storage: Storage, limits: SourceLimits | None = None) -> RawDatasetRef:
    """Fetch the dataset named by ``config.source_uri`` into ``storage`` (idempotent), within
    ``limits`` (default: :meth:`SourceLimits.from_env`)."""
    limits = limits or SourceLimits.from_env()
    listed: list[Any] = []
    if config.format != "idx" and holds_images(config, limits, listed):
        from pipeline.data.acquire_images import acquire_images

        return acquire_images(config, storage, limits, *listed)
    unexpected = set(config.expected_sha256) - set(IDX_FILES.values())
    if unexpected:
        raise ConfigError("expected_sha256", f"keys among {sorted(IDX_FILES.values())}", str(sorted(unexpected)))
    source = open_source(config.source_uri, limits)
    shown = redact_uri(config.source_uri)
    reading = {**config.reading(), "dataset_name": config.dataset_name or dataset_name(config.source_uri)}
    names = list(IDX_FILES.values())
    fingerprints = {name: source.fingerprint(name) for name in names}

    record_key = _source_key(config.source_uri)
    if storage.exists(record_key):
        record = storage.get_json(record_key)
        raw_manifest = f"raw/{record['dataset_hash']}/{MANIFEST}"
        unknown = any(fp is None for fp in fingerprints.values())
        if (
            not unknown
            and record["fingerprints"] == fingerprints
            and "files" in record
            and storage.exists(raw_manifest)
        ):
            # This source's own digests: another source may have stored the same content
            # under different bytes (recompressed), and checksums refer to what is served here.
            files = record["files"]
            for name in names:
                _verify(config, source, name, files[name])
            log.info("source %s unchanged: reusing raw/%s", shown, record["dataset_hash"])
            return RawDatasetRef(
                dataset_hash=record["dataset_hash"],
                uri=storage.uri(f"raw/{record['dataset_hash']}"),
                source_uri=shown,
                files=files,
                read=reading,
            )

    with tempfile.TemporaryDirectory(prefix="acquire-") as staging:
        files = {}
        budget = limits.max_dataset_bytes
        for name in names:
            files[name] = fetch_file(source, name, Path(staging) / name, limits, budget)
            budget -= files[name]["content_size"]
            _verify(config, source, name, files[name])
            log.info(
                "fetched %s: %d bytes, sha256 %s", source.file_uri(name), files[name]["size"], files[name]["sha256"]
            )
        digest = dataset_hash({name: info["content_sha256"] for name, info in files.items()})
        prefix = f"raw/{digest}"
        if not storage.exists(f"{prefix}/{MANIFEST}"):
            for name in names:
                storage.put_file(Path(staging) / name, f"{prefix}/{name}")
            manifest = {
                "dataset_hash": digest,
                "files": files,
                "layout": "idx",
                "dataset_name": reading["dataset_name"],
            }
            storage.put_json(manifest, f"{prefix}/{MANIFEST}")
    storage.put_json(
        {"source_uri": shown, "fingerprints": fingerprints, "dataset_hash": digest, "files": files},
        record_key,  # the key hashes the full URI: two tokens for one prefix are two sources
    )
    return RawDatasetRef(
        dataset_hash=digest, uri=storage.uri(prefix), source_uri=shown, files=files, fetched=names, read=reading
    )


def holds_images(config: AcquireConfig, limits: SourceLimits, listed: list[Any] | None = None) -> bool:
    """Whether ``config.source_uri`` is an image dataset rather than the four IDX files: its
    ``format`` says so, or it names an archive or a manifest, or it is a folder or S3 prefix
    that holds files but none of the IDX files. The first IDX file is looked for first (one
    ``stat`` or ``HEAD``: an IDX source is never listed); a source that cannot be reached fails
    here naming it; an empty or missing one goes the IDX way, which names the missing file. An
    HTTP prefix cannot be listed: the IDX files, unless told. A listing made here is appended to
    ``listed`` (the source and its names), so that acquiring does not list again."""
    from pipeline.data.layouts import MANIFEST_NAMES, is_archive

    if config.format in ("folders", "manifest"):
        return True
    _, last = split_uri(config.source_uri.rstrip("/"))
    if is_archive(last) or last in MANIFEST_NAMES or last.endswith(".parquet"):
        return True
    if urlparse(config.source_uri).scheme in ("http", "https"):
        return False
    source = open_source(config.source_uri, limits)
    try:
        source.fingerprint(IDX_FILES["train_images"])
        return False
    except SourceNotFoundError:
        pass
    try:
        names = set(source.names())
    except SourceNotFoundError:
        return False  # the IDX path names what is missing
    if listed is not None:
        listed += [source, sorted(names)]
    return bool(names) and not set(IDX_FILES.values()) & names  # an IDX file or none: the IDX path says what is missing


def load_raw_ref(storage: Storage, digest: str) -> RawDatasetRef:
    """Rebuild the reference of a dataset already in storage (for CLI subcommands)."""
    if not storage.exists(f"raw/{digest}/{MANIFEST}"):
        raise ReferenceNotFoundError("--dataset", f"a dataset hash under {storage.uri('raw')}", repr(digest))
    manifest = storage.get_json(f"raw/{digest}/{MANIFEST}")
    return RawDatasetRef(
        dataset_hash=digest,
        uri=storage.uri(f"raw/{digest}"),
        source_uri="",
        files=manifest["files"],
        layout=manifest.get("layout", "idx"),
        read={"dataset_name": manifest.get("dataset_name", "")},  # the rest: the settings' defaults
    )


def load_raw_splits(
    raw: RawDatasetRef, storage: Storage, limits: SourceLimits | None = None
) -> dict[str, tuple[Any, Any]]:
    """``{"train": (images, labels), "test": (images, labels)}`` read strictly from storage,
    the four files' content together within ``limits.max_dataset_bytes``."""
    from pipeline.data.idx import read_split

    budget = (limits or SourceLimits.from_env()).max_dataset_bytes
    prefix = f"raw/{raw.dataset_hash}"
    splits = {}
    for split in ("train", "test"):
        images, labels = splits[split] = read_split(
            storage.local_path(f"{prefix}/{IDX_FILES[f'{split}_images']}"),
            storage.local_path(f"{prefix}/{IDX_FILES[f'{split}_labels']}"),
            max_bytes=max(1, budget),
        )
        budget -= images.nbytes + labels.nbytes + 16 + 8
    return splits
