"""Any labelled image dataset through acquire, validate and preprocess, on real images: the
Fashion-MNIST cut as PNG class folders, scikit-learn's digits as a CSV manifest with PNG files,
the cut as 32x32 RGB JPEGs in a .tar.gz served over HTTP. Each gets its spec (size, channels,
class names, counts) from the data, and the suites fitted to it; bad images stop validate with
one line, or are quarantined under ``max_invalid_fraction`` and never reach the splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from image_datasets import FOLDERS, digits_manifest, encode, fashion_folders, rgb_archive
from image_datasets import cut as first

from pipeline.config import AcquireConfig, PreprocessConfig
from pipeline.data.acquire import acquire
from pipeline.data.dataset import decoded_prefix
from pipeline.data.preprocess import preprocess
from pipeline.data.processed import load_split
from pipeline.data.validate import validate_raw
from pipeline.errors import BadImageError


@pytest.fixture(scope="module")
def cut(small_splits):
    """The real cut: 2,000 training and 500 test images."""
    return small_splits


@pytest.fixture(scope="module")
def png_folders(tmp_path_factory, cut) -> Path:
    return fashion_folders(tmp_path_factory.mktemp("fashion-png"), cut)


def test_png_class_folders_give_the_same_splits_as_the_idx_files(png_folders, small_dataset, storage, cut):
    raw = acquire(AcquireConfig(source_uri=str(png_folders)), storage)
    assert raw.layout == "folders" and raw.read["dataset_name"] == png_folders.name
    validation = validate_raw(raw, storage)
    spec = validation.spec
    assert (spec["channels"], spec["height"], spec["width"]) == (1, 28, 28)
    assert spec["classes"] == sorted(FOLDERS)
    assert sum(spec["counts"]["train"].values()) == 2000 and sum(spec["counts"]["test"].values()) == 500
    processed = preprocess(raw, storage, PreprocessConfig(seed=0))
    assert processed.classes == sorted(FOLDERS) and processed.image_shape == [1, 28, 28]
    images, labels = load_split(processed, storage, "test")
    # The same images as the IDX files hold (PNG is lossless), each under its class.
    by_hash = {img.tobytes(): FOLDERS[y] for img, y in zip(*cut["t10k"], strict=True)}
    assert all(by_hash[img.tobytes()] == processed.classes[y] for img, y in zip(images, labels, strict=True))
    idx = preprocess(acquire(AcquireConfig(source_uri=str(small_dataset)), storage), storage, PreprocessConfig(seed=0))
    assert idx.counts == processed.counts


def test_a_rerun_on_an_unchanged_folder_fetches_and_decodes_nothing(png_folders, storage):
    raw = acquire(AcquireConfig(source_uri=str(png_folders)), storage)
    validate_raw(raw, storage)
    spec_file = storage.local_path(f"{decoded_prefix(raw)}/spec.json")
    written = spec_file.stat().st_mtime_ns
    again = acquire(AcquireConfig(source_uri=str(png_folders)), storage)
    assert again.dataset_hash == raw.dataset_hash and again.fetched == []
    preprocess(again, storage, PreprocessConfig(seed=0))
    assert spec_file.stat().st_mtime_ns == written


def test_digits_as_a_csv_manifest_are_8x8_with_classes_0_to_9(tmp_path, storage):
    raw = acquire(AcquireConfig(source_uri=str(digits_manifest(tmp_path / "digits"))), storage)
    assert raw.layout == "manifest"
    spec = validate_raw(raw, storage).spec
    assert (spec["channels"], spec["height"], spec["width"]) == (1, 8, 8) and spec["name"] == "digits"
    assert spec["classes"] == [str(d) for d in range(10)]
    total = sum(sum(c.values()) for c in spec["counts"].values())
    assert total == 1797 and 0.15 < sum(spec["counts"]["test"].values()) / total < 0.25
    processed = preprocess(raw, storage, PreprocessConfig(seed=0))
    assert processed.image_shape == [1, 8, 8] and processed.classes == spec["classes"]


@pytest.mark.integration
def test_rgb_jpegs_in_a_tar_gz_over_http_give_a_3_channel_32x32_dataset(tmp_path, storage, cut):
    from services import RecordingServer

    rgb_archive(tmp_path, first(cut, 600, 150))
    with RecordingServer(tmp_path) as server:
        raw = acquire(AcquireConfig(source_uri=f"{server.url}/fashion-rgb.tar.gz"), storage)
    assert raw.files.keys() == {"fashion-rgb.tar.gz"} and raw.read["dataset_name"] == "fashion-rgb"
    spec = validate_raw(raw, storage).spec
    assert (spec["channels"], spec["height"], spec["width"]) == (3, 32, 32)
    processed = preprocess(raw, storage, PreprocessConfig(seed=0))
    images, _ = load_split(processed, storage, "train")
    assert images.shape[1:] == (32, 32, 3) and processed.image_shape == [3, 32, 32]
    # Normalisation statistics per channel, of the training split.
    pixels = images.reshape(-1, 3).astype(np.float64) / 255.0
    np.testing.assert_allclose(processed.mean, pixels.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(processed.std, pixels.std(axis=0), rtol=1e-9)


def broken_folder(root: Path, cut, damage: dict[str, bytes]) -> Path:
    fashion_folders(root, first(cut, 400, 100))
    for name, data in damage.items():
        (root / name).write_bytes(data)
    return root


def test_a_bad_image_stops_validate_with_one_line_naming_it(tmp_path, storage, cut):
    folder = broken_folder(tmp_path / "bad", cut, {"train/Bag/broken.png": b"\x89PNG\r\n\x1a\n" + b"\x00" * 40})
    raw = acquire(AcquireConfig(source_uri=str(folder)), storage)
    with pytest.raises(BadImageError) as error:
        validate_raw(raw, storage)
    message = str(error.value)
    assert message.startswith(f"{folder}/train/Bag/broken.png: ") and "\n" not in message
    assert error.value.exit_code == 2


def test_under_max_invalid_fraction_bad_images_are_quarantined_reported_and_never_trained_on(tmp_path, storage, cut):
    damage = {
        "train/Bag/empty.png": b"",
        "train/Coat/cut.png": encode(cut["train"][0][0])[:60],
        "test/Dress/x.jpg": b"not",
    }
    folder = broken_folder(tmp_path / "bad", cut, damage)
    raw = acquire(AcquireConfig(source_uri=str(folder), max_invalid_fraction=0.01), storage)
    validation = validate_raw(raw, storage)
    assert validation.spec["quarantined"] == 3
    report = storage.local_path(f"{validation.report_prefix}/index.html").read_text()
    for name in damage:
        assert name in report
    processed = preprocess(raw, storage, PreprocessConfig(seed=0))
    assert sum(processed.counts.values()) == 500  # the 500 good images, none of the 3
    too_strict = acquire(AcquireConfig(source_uri=str(folder), max_invalid_fraction=0.002), storage)
    with pytest.raises(BadImageError, match=r"3 of 503 images are invalid, max_invalid_fraction allows 1"):
        validate_raw(too_strict, storage)


def test_the_format_setting_overrides_detection(tmp_path, storage, cut):
    folder = fashion_folders(tmp_path / "both", first(cut, 400, 110))
    rows = ["path,label"] + [f"{p.relative_to(folder).as_posix()},one" for p in sorted(folder.rglob("*.png"))]
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")  # a manifest beside the class folders
    detected = acquire(AcquireConfig(source_uri=str(folder)), storage)
    assert detected.layout == "manifest"  # a manifest, when there is one, says what the labels are
    told = acquire(AcquireConfig(source_uri=str(folder), format="folders"), storage)
    assert told.layout == "folders"
    assert validate_raw(told, storage).spec["classes"] == sorted(FOLDERS)
