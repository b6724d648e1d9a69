"""Preprocessing: duplicates and leakage removed, stratified splits, stored once per config."""

from __future__ import annotations

import numpy as np
import pytest
from defects import write_dataset

from pipeline.config import AcquireConfig, PreprocessConfig
from pipeline.data.acquire import acquire
from pipeline.data.preprocess import preprocess
from pipeline.data.processed import load_split
from pipeline.data.profile import image_hashes
from pipeline.errors import ConfigError


@pytest.fixture
def raw(small_dataset, storage):
    return acquire(AcquireConfig(source_uri=str(small_dataset)), storage)


def test_splits_are_stratified_disjoint_and_complete(raw, storage):
    ref = preprocess(raw, storage, PreprocessConfig(val_fraction=0.2))
    assert ref.counts == {"train": 1600, "val": 400, "test": 500}
    train, val = load_split(ref, storage, "train"), load_split(ref, storage, "val")
    assert not set(image_hashes(train[0])) & set(image_hashes(val[0]))
    train_share = np.bincount(train[1], minlength=10) / len(train[1])
    val_share = np.bincount(val[1], minlength=10) / len(val[1])
    assert np.abs(train_share - val_share).max() < 0.01
    assert 0.2 < ref.mean[0] < 0.4 and 0.25 < ref.std[0] < 0.45  # Fashion-MNIST: 0.286, 0.353
    assert train[0].dtype == np.uint8


def test_duplicates_and_test_images_in_train_are_dropped(tmp_path, small_splits, storage):
    (x, y), (xt, yt) = small_splits["train"], small_splits["t10k"]
    x2 = np.concatenate([x, x[:30], xt[:20]])
    y2 = np.concatenate([y, y[:30], yt[:20]])
    folder = write_dataset(tmp_path / "dups", {"train": (x2, y2), "t10k": (xt, yt)})
    raw = acquire(AcquireConfig(source_uri=str(folder)), storage)
    ref = preprocess(raw, storage, PreprocessConfig())
    assert ref.removed == {"duplicates": 30, "leaked": 20}
    assert ref.counts["train"] + ref.counts["val"] == 2000
    kept = set(image_hashes(load_split(ref, storage, "train")[0])) | set(
        image_hashes(load_split(ref, storage, "val")[0])
    )
    assert not kept & set(image_hashes(xt))


def test_same_inputs_are_processed_once(raw, storage):
    first = preprocess(raw, storage, PreprocessConfig())
    path = storage.local_path(f"processed/{first.processed_hash}/train.npz")
    mtime = path.stat().st_mtime_ns
    assert preprocess(raw, storage, PreprocessConfig()) == first
    assert path.stat().st_mtime_ns == mtime
    other = preprocess(raw, storage, PreprocessConfig(seed=7))
    assert other.processed_hash != first.processed_hash


def test_sample_cap_keeps_class_balance(raw, storage):
    ref = preprocess(raw, storage, PreprocessConfig(sample_cap=500))
    assert ref.counts["train"] + ref.counts["val"] == 500 and ref.counts["test"] <= 500
    labels = load_split(ref, storage, "train")[1]
    assert set(np.unique(labels)) == set(range(10))


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"val_fraction: expected a number in \[0.01, 0.5\], found 0.9"):
        PreprocessConfig(val_fraction=0.9)
    with pytest.raises(ConfigError, match="sample_cap: expected an integer >= 100 or empty, found 5"):
        PreprocessConfig(sample_cap=5)


def test_split_check_refuses_an_image_in_two_splits_and_a_missing_class(raw, storage):
    """The guard preprocess runs before writing: what a bug in splitting would produce is refused."""
    from pipeline.data.preprocess import check_splits
    from pipeline.errors import DataValidationError

    ref = preprocess(raw, storage, PreprocessConfig())
    train, val, test = (load_split(ref, storage, s) for s in ("train", "val", "test"))
    leaked_val = (np.concatenate([val[0], test[0][:5]]), np.concatenate([val[1], test[1][:5]]))
    with pytest.raises(DataValidationError, match=r"suite processed_splits, .*\(overlap_fraction\): .*split val"):
        check_splits({"train": train, "val": leaked_val, "test": test})
    no_bags = (train[0][train[1] != 8], train[1][train[1] != 8])
    with pytest.raises(
        DataValidationError, match=r"\(n_classes\): expected n_classes in \[10, 10\], found split train: n_classes=9"
    ):
        check_splits({"train": no_bags, "val": val, "test": test})


def test_channel_statistics_are_exact_per_channel_and_read_old_refs():
    from pipeline.data.preprocess import channel_statistics
    from pipeline.refs import ProcessedDatasetRef

    rng = np.random.default_rng(0)
    rgb = np.stack(
        [rng.integers(0, 60, (5000, 6, 6)), rng.integers(100, 256, (5000, 6, 6)), rng.integers(0, 256, (5000, 6, 6))],
        axis=-1,
    ).astype(np.uint8)
    mean, std = channel_statistics(rgb, chunk=777)
    pixels = rgb.reshape(-1, 3).astype(np.float64) / 255.0
    np.testing.assert_allclose(mean, pixels.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(std, pixels.std(axis=0), rtol=1e-9)
    assert mean[0] < 0.25 < 0.6 < mean[1]
    gray_mean, gray_std = channel_statistics(rgb[..., 0])
    assert gray_mean == pytest.approx([mean[0]]) and gray_std == pytest.approx([std[0]])
    old = {
        "processed_hash": "h",
        "dataset_hash": "d",
        "uri": "u",
        "counts": {},
        "removed": {},
        "mean": 0.29,
        "std": 0.35,
        "classes": [],
    }
    ref = ProcessedDatasetRef.from_dict(old)
    assert (ref.mean, ref.std) == ([0.29], [0.35])
