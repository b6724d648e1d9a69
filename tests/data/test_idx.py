"""The strict IDX reader on real files and on each kind of broken one."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from defects import DEFECTS, TRAIN_IMAGES, TRAIN_LABELS, broken_copy

from pipeline.data.idx import parse_idx, read_split, write_idx
from pipeline.errors import CorruptFileError, IdxFormatError


def test_reads_the_real_files(real_splits):
    images, labels = real_splits["train"]
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (60000,) and set(np.unique(labels)) == set(range(10))
    assert real_splits["t10k"][0].shape == (10000, 28, 28)


def test_round_trip_of_a_subset_keeps_every_byte(tmp_path, small_splits):
    images, labels = small_splits["train"]
    write_idx(images, tmp_path / "x.gz")
    write_idx(labels, tmp_path / "y", compress=False)
    x, y = read_split(tmp_path / "x.gz", tmp_path / "y")
    assert np.array_equal(x, images) and np.array_equal(y, labels)


@pytest.mark.parametrize("defect", [d for d in DEFECTS if d.breaks_the_file], ids=lambda d: d.name)
def test_broken_file_raises_a_typed_one_line_error(tmp_path, small_dataset, defect):
    folder = broken_copy(small_dataset, tmp_path / "fashion-mnist", defect)
    with pytest.raises((IdxFormatError, CorruptFileError)) as info:
        read_split(folder / TRAIN_IMAGES, folder / TRAIN_LABELS)
    message = str(info.value)
    assert "\n" not in message
    for word in defect.words:
        assert word in message, f"{word!r} missing from: {message}"


def test_float_payload_is_refused_for_images(tmp_path):
    write_idx(np.zeros((3, 28, 28), dtype=np.float32), tmp_path / "f.gz")
    write_idx(np.zeros(3, dtype=np.uint8), tmp_path / "l.gz")
    with pytest.raises(IdxFormatError, match="expected uint8 payload, found float32 payload"):
        read_split(tmp_path / "f.gz", tmp_path / "l.gz")


def test_float_payload_parses_when_no_dtype_is_required(tmp_path):
    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    write_idx(data, tmp_path / "f")
    assert np.array_equal(parse_idx(gzip.decompress((tmp_path / "f").read_bytes()), "f"), data)


def test_tiny_file_is_refused():
    with pytest.raises(IdxFormatError, match="x: expected an IDX header of at least 4 bytes, found 2 bytes"):
        parse_idx(b"\x00\x00", "x")


def test_extra_trailing_bytes_are_refused(tmp_path: Path):
    write_idx(np.zeros(5, dtype=np.uint8), tmp_path / "l", compress=False)
    (tmp_path / "l").write_bytes((tmp_path / "l").read_bytes() + b"\x00")
    with pytest.raises(IdxFormatError, match="expected 5 payload bytes for shape \\(5,\\), found 6"):
        parse_idx((tmp_path / "l").read_bytes(), "l", ndim=1)


def test_broken_gzip_is_a_corrupt_file_error(tmp_path):
    (tmp_path / "x.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    with pytest.raises(CorruptFileError, match="x.gz: expected a complete gzip stream"):
        read_split(tmp_path / "x.gz", tmp_path / "x.gz")


@pytest.mark.parametrize(
    ("head", "found"),
    [
        (b"\x00\x00\x07\x03", "magic 0x00000703"),  # the IDX zeros: the rest are format fields, shown
        (b"root:x:0:0:root", "4 bytes of text, not an IDX magic"),
        (b"\x1f\x8b\x08\x00", "gzip data (compressed twice?)"),
        (b"PK\x03\x04rest", "a ZIP archive"),
        (b"\xde\xad\xbe\xef", "4 bytes that are not an IDX magic"),
    ],
)
def test_finding_a_wrong_magic_is_described_not_echoed(head, found):
    with pytest.raises(IdxFormatError) as info:
        parse_idx(head + bytes(16), "x")
    assert info.value.found == found


def test_finding_a_header_declaring_more_than_the_limit_is_refused_before_reading(tmp_path, monkeypatch):
    from defects import gzip_bomb

    from pipeline.data.idx import read_idx
    from pipeline.errors import SourceLimitError

    gzip_bomb(tmp_path / "bomb.gz", zeros=1 << 20)
    monkeypatch.setenv("PIPELINE_MAX_DATASET_BYTES", str(1 << 30))
    with pytest.raises(
        SourceLimitError,
        match=r"bomb.gz: expected at most 1073741824 bytes of content "
        r"\(PIPELINE_MAX_DATASET_BYTES\), found a header declaring 784000000000 payload bytes",
    ):
        read_idx(tmp_path / "bomb.gz")
