"""Every kind of bad image or broken layout, in a real dataset (Fashion-MNIST images as PNG class
folders, or a manifest of them): under the default policy validate stops with exit status 2 and
one line naming the file and the problem; under ``max_invalid_fraction`` the run goes on, the
data report lists the quarantined file, and the processed splits (all training ever sees) hold
every good image and nothing else."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from image_datasets import FOLDERS, cut, encode, fashion_folders

from pipeline.config import AcquireConfig, PreprocessConfig
from pipeline.data.acquire import acquire
from pipeline.data.preprocess import preprocess
from pipeline.data.validate import validate_raw
from pipeline.errors import BadInputError

GOOD = 510  # 400 training and 110 test images


def bomb() -> bytes:
    """A valid PNG header declaring 20000x20000 pixels over a few bytes of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20_000, 20_000, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def tiff_in_lab() -> bytes:
    """A CIELAB TIFF under a .png name. Every mode PNG, JPEG, WebP and BMP can hold converts to
    grayscale or RGB (checked in tests/data/test_images.py); an image that cannot is one in a
    format the dataset does not take."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("LAB", (28, 28)).save(buffer, "TIFF")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images(small_splits):
    return cut(small_splits, 400, 110)


#: name -> (file written into the dataset, its bytes from the real images, words of the problem)
IMAGE_CASES = {
    "zero_byte": ("train/Bag/empty.png", lambda x: b"", "found 0 bytes"),
    "undecodable": ("train/Bag/noise.png", lambda x: np.random.default_rng(0).bytes(300), "found"),
    "truncated_png": ("train/Coat/cut.png", lambda x: encode(x)[: len(encode(x)) // 2], "found"),
    "truncated_jpeg": ("test/Coat/cut.jpg", lambda x: encode(x, "JPEG")[:150], "found"),
    "unconvertible_mode": ("train/Shirt/lab.png", lambda x: tiff_in_lab(), "TIFF"),
    "decompression_bomb": ("train/Shirt/bomb.png", lambda x: bomb(), "decompression bomb"),
    "another_size": ("train/Dress/big.png", lambda x: encode(np.zeros((32, 32), np.uint8) + 99), "32"),
}


def folder_with(root: Path, images, name: str, data: bytes) -> Path:
    fashion_folders(root, images)
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(data)
    return root


def check_stops_and_quarantines(source: Path, storage, where: str, words: str, good: int = GOOD) -> None:
    raw = acquire(AcquireConfig(source_uri=str(source)), storage)
    with pytest.raises(BadInputError) as error:
        validate_raw(raw, storage)
    message = str(error.value)
    assert message.startswith(f"{source}/{where}: expected ") and words in message and "\n" not in message, message
    assert error.value.exit_code == 2
    assert not storage.exists("processed")

    tolerant = acquire(AcquireConfig(source_uri=str(source), max_invalid_fraction=0.01), storage)
    validation = validate_raw(tolerant, storage)
    assert validation.spec["quarantined"] == 1
    report = storage.local_path(f"{validation.report_prefix}/index.html").read_text()
    assert "Quarantined images (1)" in report and where in report
    processed = preprocess(tolerant, storage, PreprocessConfig(seed=0))
    assert sum(processed.counts.values()) == good


@pytest.mark.parametrize("case", IMAGE_CASES, ids=str)
def test_a_bad_image_stops_validate_or_is_quarantined(case, tmp_path, storage, images):
    name, make, words = IMAGE_CASES[case]
    source = folder_with(tmp_path / "data", images, name, make(images["train"][0][0]))
    check_stops_and_quarantines(source, storage, name, words)


def test_an_empty_class_folder(tmp_path, storage, images):
    source = fashion_folders(tmp_path / "data", images)
    (source / "train" / "Unicorn").mkdir()
    check_stops_and_quarantines(source, storage, "train/Unicorn", "an empty class folder")


def test_a_class_only_in_the_test_split(tmp_path, storage, images):
    source = folder_with(tmp_path / "data", images, "test/Unicorn/x.png", encode(images["t10k"][0][0]))
    check_stops_and_quarantines(source, storage, "test/Unicorn/x.png", "no training image")


def manifest_dataset(root: Path, images, extra_rows: list[str], extra_files: dict[str, bytes]) -> Path:
    rows = ["path,label,split"]
    for split, (pixels, labels) in (("train", images["train"]), ("test", images["t10k"])):
        for index, (image, label) in enumerate(zip(pixels, labels, strict=True)):
            name = f"{split}-{index:04d}.png"
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(encode(image))
            rows.append(f"{name},{FOLDERS[label]},{split}")
    for name, data in extra_files.items():
        (root / name).write_bytes(data)
    (root / "labels.csv").write_text("\n".join(rows + extra_rows) + "\n")
    return root


def test_a_manifest_row_whose_file_is_missing(tmp_path, storage, images):
    source = manifest_dataset(tmp_path / "data", images, ["gone.png,Bag,train"], {})
    check_stops_and_quarantines(source, storage, f"labels.csv row {GOOD + 2}", "no such file")


def test_a_file_no_manifest_row_labels(tmp_path, storage, images):
    source = manifest_dataset(tmp_path / "data", images, [], {"stray.png": encode(images["train"][0][1])})
    check_stops_and_quarantines(source, storage, "stray.png", "no label")


def test_the_run_command_exits_2_with_the_one_line(tmp_path, pipeline_home, images, capsys):
    from pipeline.entrypoints.cli import main

    source = folder_with(tmp_path / "data", images, "train/Bag/empty.png", b"")
    assert main(["run", "--source", str(source), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {source}/train/Bag/empty.png: expected ")
    assert not (pipeline_home / "storage" / "processed").exists()
