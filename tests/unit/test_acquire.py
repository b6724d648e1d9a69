"""Acquisition from a local folder: content addressing, idempotence, checksums, bad sources."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import pytest
from defects import DEFECTS, TRAIN_IMAGES, broken_copy

from pipeline.acquire import acquire, dataset_hash, load_raw_splits
from pipeline.config import IDX_FILES, AcquireConfig
from pipeline.errors import ChecksumMismatchError, CorruptFileError, SourceNotFoundError


def stored_files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_stores_the_four_files_under_their_content_hash(small_dataset, storage):
    ref = acquire(AcquireConfig(source_uri=str(small_dataset)), storage)
    assert sorted(ref.fetched) == sorted(IDX_FILES.values())
    for name in IDX_FILES.values():
        stored = Path(storage.uri(f"raw/{ref.dataset_hash}/{name}"))
        assert stored.read_bytes() == (small_dataset / name).read_bytes()
        assert ref.files[name]["sha256"] == hashlib.sha256(stored.read_bytes()).hexdigest()
        assert ref.files[name]["content_sha256"] == hashlib.sha256(gzip.decompress(stored.read_bytes())).hexdigest()
    assert ref.dataset_hash == dataset_hash({n: f["content_sha256"] for n, f in ref.files.items()})
    assert ref.uri == storage.uri(f"raw/{ref.dataset_hash}")


def test_rerun_on_an_unchanged_source_fetches_and_writes_nothing(small_dataset, storage):
    first = acquire(AcquireConfig(source_uri=str(small_dataset)), storage)
    second = acquire(AcquireConfig(source_uri=f"file://{small_dataset}"), storage)  # another URI: fetched
    assert second.fetched and second.dataset_hash == first.dataset_hash
    before = stored_files(storage.root)
    third = acquire(AcquireConfig(source_uri=f"file://{small_dataset}"), storage)
    assert third.fetched == [] and third.dataset_hash == first.dataset_hash
    assert stored_files(storage.root) == before


def test_recompressed_files_keep_the_dataset_hash(tmp_path, small_dataset, storage):
    # Debian recompresses the upstream .gz files: the bytes differ, the content does not.
    other = tmp_path / "recompressed"
    other.mkdir()
    for name in IDX_FILES.values():
        (other / name).write_bytes(gzip.compress(gzip.decompress((small_dataset / name).read_bytes()), compresslevel=1))
    a = acquire(AcquireConfig(source_uri=str(small_dataset)), storage)
    b = acquire(AcquireConfig(source_uri=str(other)), storage)
    assert a.files[TRAIN_IMAGES]["sha256"] != b.files[TRAIN_IMAGES]["sha256"]
    assert a.dataset_hash == b.dataset_hash


def test_expected_checksum_of_content_or_bytes_is_accepted(small_dataset, storage):
    raw = (small_dataset / TRAIN_IMAGES).read_bytes()
    for digest in (hashlib.sha256(raw).hexdigest(), hashlib.sha256(gzip.decompress(raw)).hexdigest()):
        ref = acquire(AcquireConfig(source_uri=str(small_dataset), expected_sha256={TRAIN_IMAGES: digest}), storage)
        assert ref.files[TRAIN_IMAGES]["sha256"] == hashlib.sha256(raw).hexdigest()


def test_a_second_source_keeps_its_own_byte_checksums_on_rerun(tmp_path, small_dataset, storage):
    other = tmp_path / "recompressed"
    other.mkdir()
    for name in IDX_FILES.values():
        (other / name).write_bytes(gzip.compress(gzip.decompress((small_dataset / name).read_bytes()), compresslevel=1))
    acquire(AcquireConfig(source_uri=str(small_dataset)), storage)
    pinned = {TRAIN_IMAGES: hashlib.sha256((other / TRAIN_IMAGES).read_bytes()).hexdigest()}
    first = acquire(AcquireConfig(source_uri=str(other), expected_sha256=pinned), storage)
    again = acquire(AcquireConfig(source_uri=str(other), expected_sha256=pinned), storage)
    assert again.fetched == [] and again.files == first.files


def test_multi_member_gzip_is_hashed_whole(tmp_path, small_dataset, storage):
    # gzip.decompress (and so the IDX reader) reads every member; the content hash must too.
    folder = tmp_path / "members"
    folder.mkdir()
    for name in IDX_FILES.values():
        payload = gzip.decompress((small_dataset / name).read_bytes())
        half = len(payload) // 2
        (folder / name).write_bytes(gzip.compress(payload[:half]) + gzip.compress(payload[half:]))
    ref = acquire(AcquireConfig(source_uri=str(folder)), storage)
    single = acquire(AcquireConfig(source_uri=str(small_dataset)), storage)
    assert ref.dataset_hash == single.dataset_hash


def test_checksum_mismatch_names_the_file_and_writes_nothing(small_dataset, storage):
    config = AcquireConfig(source_uri=str(small_dataset), expected_sha256={TRAIN_IMAGES: "0" * 64})
    with pytest.raises(ChecksumMismatchError) as info:
        acquire(config, storage)
    assert str(info.value).startswith(f"{small_dataset / TRAIN_IMAGES}: expected sha256 {'0' * 64}, found ")
    assert not storage.exists("raw") and not storage.exists("sources")


def test_checksum_is_checked_on_an_unchanged_source_too(small_dataset, storage):
    acquire(AcquireConfig(source_uri=str(small_dataset)), storage)
    with pytest.raises(ChecksumMismatchError):
        acquire(AcquireConfig(source_uri=str(small_dataset), expected_sha256={TRAIN_IMAGES: "1" * 64}), storage)


def test_a_file_broken_as_served_is_stored_faithfully_for_validate(tmp_path, small_dataset, storage):
    # Acquire copies what the source serves (the raw zone is a faithful copy); judging the
    # content is validate's job, so the run stops there with the file named (tests/defects.py).
    defect = next(d for d in DEFECTS if d.name == "truncated_gzip")
    folder = broken_copy(small_dataset, tmp_path / "broken", defect)
    ref = acquire(AcquireConfig(source_uri=str(folder)), storage)
    served = (folder / TRAIN_IMAGES).read_bytes()
    stored = Path(storage.uri(f"raw/{ref.dataset_hash}/{TRAIN_IMAGES}"))
    assert stored.read_bytes() == served
    assert ref.files[TRAIN_IMAGES]["content_sha256"] == hashlib.sha256(served).hexdigest()
    with pytest.raises(CorruptFileError, match=f"{TRAIN_IMAGES}: expected a complete gzip stream, found one truncated"):
        load_raw_splits(ref, storage)


def test_missing_folder_and_missing_file(tmp_path, small_dataset, storage):
    with pytest.raises(SourceNotFoundError, match="nowhere: expected an existing folder, found no such folder"):
        acquire(AcquireConfig(source_uri=str(tmp_path / "nowhere")), storage)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / TRAIN_IMAGES).write_bytes((small_dataset / TRAIN_IMAGES).read_bytes())
    with pytest.raises(SourceNotFoundError, match="train-labels-idx1-ubyte.gz: expected a file, found no such file"):
        acquire(AcquireConfig(source_uri=str(partial)), storage)


def test_config_refuses_malformed_checksums():
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"expected_sha256\[t10k-images-idx3-ubyte.gz\]: expected 64 hex digits"):
        AcquireConfig(expected_sha256={"t10k-images-idx3-ubyte.gz": "abc"})
    with pytest.raises(ConfigError, match="expected_sha256: expected keys among"):
        AcquireConfig(expected_sha256={"other.gz": "0" * 64})
