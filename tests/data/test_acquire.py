"""Acquisition from a local folder: content addressing, idempotence, checksums, bad sources."""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from defects import DEFECTS, TRAIN_IMAGES, TRAIN_LABELS, broken_copy, dataset_with, gzip_bomb

from pipeline.config import IDX_FILES, AcquireConfig
from pipeline.data.acquire import acquire, dataset_hash, load_raw_splits
from pipeline.errors import (
    BadInputError,
    ChecksumMismatchError,
    CorruptFileError,
    IdxFormatError,
    SourceNotFoundError,
)


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
    folder = broken_copy(small_dataset, tmp_path / "fashion-mnist", defect)
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


def test_config_refuses_malformed_checksums(small_dataset, storage):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"expected_sha256\[t10k-images-idx3-ubyte.gz\]: expected 64 hex digits"):
        AcquireConfig(expected_sha256={"t10k-images-idx3-ubyte.gz": "abc"})
    with pytest.raises(ConfigError, match="expected_sha256: expected keys among"):
        AcquireConfig(format="idx", expected_sha256={"other.gz": "0" * 64})
    # Detected as IDX (any layout may name other files): refused before anything is fetched.
    with pytest.raises(ConfigError, match="expected_sha256: expected keys among"):
        acquire(AcquireConfig(source_uri=str(small_dataset), expected_sha256={"other.gz": "0" * 64}), storage)
    assert not storage.exists("raw")


# --- Bounded sources (issue 16) ---------------------------------------------------------------

#: Runs the CLI with the address space limited to what the imports took plus argv[1] bytes, so
#: that a reader which expands a file into memory fails (MemoryError, exit 1) instead of passing.
LIMITED_CLI = """
import resource, sys
import pipeline.data.acquire, pipeline.data.validate, pipeline.entrypoints.cli
with open("/proc/self/status") as status:
    size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
limit = size + int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.exit(pipeline.entrypoints.cli.main(sys.argv[2:]))
"""
HEADROOM = 384 << 20


def limited_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", LIMITED_CLI, str(HEADROOM), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


@pytest.fixture(scope="module")
def bomb_dataset(tmp_path_factory, small_dataset) -> Path:
    """The small dataset with a 0.5 MB train-images file that declares 10^9 images and expands to 512 MiB."""
    return dataset_with(
        small_dataset,
        tmp_path_factory.mktemp("bomb") / "src",
        TRAIN_IMAGES,
        lambda path: gzip_bomb(path, zeros=512 << 20),
    )


def test_finding_gzip_bomb_ends_with_exit_2_and_one_line_without_expanding(bomb_dataset, storage, monkeypatch):
    # acquire reads the header as the bytes stream in and stops at once.
    refused = limited_cli("acquire", "--source", str(bomb_dataset))
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert refused.stderr.count("\n") == 1 and "PIPELINE_MAX_DATASET_BYTES" in refused.stderr, refused.stderr
    assert TRAIN_IMAGES in refused.stderr
    assert not storage.exists("raw") and not storage.exists("sources")

    # One stored before the limit existed (or under a higher one): validate refuses it the same way.
    monkeypatch.setenv("PIPELINE_MAX_DATASET_BYTES", str(10**13))
    ref = acquire(AcquireConfig(source_uri=str(bomb_dataset)), storage)
    monkeypatch.delenv("PIPELINE_MAX_DATASET_BYTES")
    refused = limited_cli("validate", "--dataset", ref.dataset_hash)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert refused.stderr.count("\n") == 1 and "PIPELINE_MAX_DATASET_BYTES" in refused.stderr, refused.stderr
    assert f"{10**9 * 784} payload bytes" in refused.stderr


def test_finding_gzip_content_past_the_dataset_limit_is_stopped(tmp_path, small_dataset, storage, monkeypatch):
    # The header is honest but small; what follows it decompresses to far more than it declared.
    def lying(path: Path) -> None:
        gzip_bomb(path, declared_images=10, zeros=64 << 20)

    folder = dataset_with(small_dataset, tmp_path / "src", TRAIN_IMAGES, lying)
    monkeypatch.setenv("PIPELINE_MAX_DATASET_BYTES", str(16 << 20))
    with pytest.raises(BadInputError, match="PIPELINE_MAX_DATASET_BYTES") as info:
        acquire(AcquireConfig(source_uri=str(folder)), storage)
    assert TRAIN_IMAGES in str(info.value)
    assert not storage.exists("raw") and not storage.exists("sources")


def test_finding_raw_idx_past_the_dataset_limit_is_stopped(tmp_path, small_dataset, storage, monkeypatch):
    def raw(path: Path) -> None:
        path.write_bytes(struct.pack(">HBBI", 0, 8, 1, 3 << 20) + bytes(3 << 20))

    folder = dataset_with(small_dataset, tmp_path / "src", TRAIN_LABELS, raw)
    monkeypatch.setenv("PIPELINE_MAX_DATASET_BYTES", str(2 << 20))
    with pytest.raises(BadInputError, match="PIPELINE_MAX_DATASET_BYTES"):
        acquire(AcquireConfig(source_uri=str(folder)), storage)
    monkeypatch.setenv("PIPELINE_MAX_DATASET_BYTES", str(64 << 20))
    monkeypatch.setenv("PIPELINE_MAX_DOWNLOAD_BYTES", str(1 << 20))
    with pytest.raises(BadInputError, match="PIPELINE_MAX_DOWNLOAD_BYTES"):
        acquire(AcquireConfig(source_uri=str(folder)), storage)
    assert not storage.exists("raw") and not storage.exists("sources")


PASSWD = b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"


def test_finding_symlink_out_of_the_source_root_is_not_followed(tmp_path, small_dataset, storage):
    outside = tmp_path / "passwd"
    outside.write_bytes(PASSWD)
    folder = dataset_with(small_dataset, tmp_path / "src", TRAIN_LABELS, lambda path: path.symlink_to(outside))
    with pytest.raises(SourceNotFoundError) as info:
        acquire(AcquireConfig(source_uri=str(folder)), storage)
    assert str(info.value) == (
        f"{folder / TRAIN_LABELS}: expected a file inside the source folder, found a symbolic link to a file outside it"
    )
    assert not storage.exists("raw") and not storage.exists("sources")

    # A link that stays inside the root is followed (a dataset that shares one file between names).
    (folder / TRAIN_LABELS).unlink()
    (folder / "labels.gz").write_bytes((small_dataset / TRAIN_LABELS).read_bytes())
    (folder / TRAIN_LABELS).symlink_to("labels.gz")
    ref = acquire(AcquireConfig(source_uri=str(folder)), storage)
    assert ref.files[TRAIN_LABELS]["sha256"] == hashlib.sha256((small_dataset / TRAIN_LABELS).read_bytes()).hexdigest()


def test_finding_parse_error_does_not_echo_the_file_content(tmp_path, small_dataset, storage):
    # A text file where a dataset file belongs (what a followed symlink to /etc/passwd gave).
    folder = dataset_with(small_dataset, tmp_path / "src", TRAIN_LABELS, lambda path: path.write_bytes(PASSWD))
    ref = acquire(AcquireConfig(source_uri=str(folder)), storage)
    with pytest.raises(IdxFormatError) as info:
        load_raw_splits(ref, storage)
    message = str(info.value)
    assert TRAIN_LABELS in message and "text" in message, message
    assert info.value.found == "4 bytes of text, not an IDX magic"
    assert PASSWD[:4].hex() not in message, message


SECRET = "s3cr3t-only-in-this-test"


def test_finding_credentials_in_a_local_error_are_redacted(storage):
    with pytest.raises(SourceNotFoundError) as info:
        acquire(AcquireConfig(source_uri=f"ftp://user:{SECRET}@127.0.0.1/data?token={SECRET}"), storage)
    assert SECRET not in str(info.value) and "ftp://***@127.0.0.1/data?token=***" in str(info.value)


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("https://user:pw@host:8443/a/b", "https://***@host:8443/a/b"),
        ("https://tok@host/a", "https://***@host/a"),
        (
            "https://h/f.gz?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA%2F1&X-Amz-Signature=ab&X-Amz-Security-Token=t&v=1",
            "https://h/f.gz?X-Amz-Algorithm=AWS4&X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Security-Token=***&v=1",
        ),
        (
            "https://h/f?Signature=x&Expires=1&AWSAccessKeyId=k",
            "https://h/f?Signature=***&Expires=1&AWSAccessKeyId=***",
        ),
        ("https://h/p?sv=1&sig=abc&token=t&access_token=u", "https://h/p?sv=1&sig=***&token=***&access_token=***"),
        ("/usr/share/datasets/fashion-mnist", "/usr/share/datasets/fashion-mnist"),
        ("s3://bucket/prefix", "s3://bucket/prefix"),
        ("http://127.0.0.1:8000/data", "http://127.0.0.1:8000/data"),
    ],
)
def test_redact_uri_masks_passwords_and_signatures(uri, shown):
    from pipeline.redact import redact_text, redact_uri

    assert redact_uri(uri) == shown
    assert redact_text(f"fetching {uri}: failed") == f"fetching {shown}: failed"


def test_source_limits_come_from_the_environment_and_are_checked():
    from pipeline.config import SourceLimits
    from pipeline.errors import ConfigError

    limits = SourceLimits.from_env(
        {
            "PIPELINE_MAX_DATASET_BYTES": "1000",
            "PIPELINE_MAX_DOWNLOAD_BYTES": "10",
            "PIPELINE_DOWNLOAD_DEADLINE_S": "2.5",
            "PIPELINE_REDIRECT_HOSTS": "a.example, B:81",
        }
    )
    assert limits == SourceLimits(1000, 10, 2.5, ("a.example", "b:81"))
    assert SourceLimits.from_env({}) == SourceLimits()
    for env, words in [
        ({"PIPELINE_MAX_DATASET_BYTES": "4G"}, "PIPELINE_MAX_DATASET_BYTES: expected an integer"),
        ({"PIPELINE_MAX_DOWNLOAD_BYTES": "0"}, "PIPELINE_MAX_DOWNLOAD_BYTES: expected a positive"),
        ({"PIPELINE_DOWNLOAD_DEADLINE_S": "-1"}, "PIPELINE_DOWNLOAD_DEADLINE_S: expected a positive"),
        ({"PIPELINE_REDIRECT_HOSTS": "https://x/"}, "PIPELINE_REDIRECT_HOSTS: expected host names"),
    ]:
        with pytest.raises(ConfigError, match=words):
            SourceLimits.from_env(env)


def test_finding_gzip_bomb_in_a_monitored_batch_is_refused(tmp_path, storage):
    # The drift monitor and batch inference fetch and read new data through the same bounds.
    from pipeline.errors import SourceLimitError
    from pipeline.monitoring.monitor import BATCH_IMAGES, fetch_batch

    batch = tmp_path / "batch"
    batch.mkdir()
    gzip_bomb(batch / BATCH_IMAGES, zeros=1 << 20)
    with pytest.raises(SourceLimitError, match=f"{BATCH_IMAGES}: .*PIPELINE_MAX_DATASET_BYTES.*a header declaring"):
        fetch_batch(str(batch), storage)
    assert not storage.exists("incoming")
