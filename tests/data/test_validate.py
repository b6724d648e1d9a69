"""The data gate: real data passes, injected defects stop with a message naming them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from defects import write_dataset

from pipeline.config import AcquireConfig
from pipeline.data.acquire import acquire
from pipeline.data.expectations import load_suite, suites_dir
from pipeline.data.validate import load_validation_ref, validate_raw
from pipeline.errors import ConfigError, DataValidationError


def acquired(folder, storage):
    return acquire(AcquireConfig(source_uri=str(folder)), storage)


def test_real_subset_passes_and_leaves_a_report(small_dataset, storage):
    ref = validate_raw(acquired(small_dataset, storage), storage)
    assert ref.suites == {"raw_profile": True, "raw_dataset": True}
    assert ref.statistics["train_n_samples"] == 2000 and ref.statistics["test_n_samples"] == 500
    assert ref.report_prefix.startswith(f"reports/{ref.dataset_hash}/suites-")
    report = storage.local_path(f"{ref.report_prefix}/raw_profile.html").read_text()
    assert "pixel_max" in report and "bbox_height" in report  # GX Data Docs lists every expectation
    results = json.loads(storage.local_path(f"{ref.report_prefix}/validation.json").read_text())
    assert results["raw_profile"]["success"] is True
    assert len(results["raw_profile"]["results"]) == len(load_suite("raw_profile").expectations)
    import pandas as pd

    profile = pd.read_parquet(ref.profile_uri)
    assert len(profile) == 2500 and profile["content_hash"].nunique() == 2500
    assert load_validation_ref(storage, ref.dataset_hash) == ref


def test_same_data_and_suites_are_checked_once_and_a_suite_change_checks_again(small_dataset, storage, tmp_path):
    raw = acquired(small_dataset, storage)
    first = validate_raw(raw, storage)
    passed = storage.local_path(f"{first.report_prefix}/passed.json")
    mtime = passed.stat().st_mtime_ns
    assert validate_raw(raw, storage) == first and passed.stat().st_mtime_ns == mtime

    changed = tmp_path / "suites"
    changed.mkdir()
    for name in ("raw_profile", "raw_dataset"):
        (changed / f"{name}.json").write_text((suites_dir() / f"{name}.json").read_text())
    spec = json.loads((changed / "raw_dataset.json").read_text())
    spec["expectations"][0]["kwargs"]["min_value"] = 100_000  # now the small subset is too small
    (changed / "raw_dataset.json").write_text(json.dumps(spec))
    with pytest.raises(DataValidationError, match="n_samples"):
        validate_raw(raw, storage, changed)
    assert validate_raw(raw, storage) == first  # the old suites' verdict is untouched


def test_blank_images_stop_the_gate_naming_suite_expectation_and_file(tmp_path, small_splits, storage):
    (x, y), test = small_splits["train"], small_splits["t10k"]
    x = x.copy()
    x[:7] = 0
    folder = write_dataset(tmp_path / "blank", {"train": (x, y), "t10k": test})
    with pytest.raises(DataValidationError) as info:
        validate_raw(acquired(folder, storage), storage)
    message = str(info.value)
    assert message.startswith(
        "suite raw_profile, expect_column_values_to_be_between(pixel_max): expected pixel_max in [32, 255]"
    )
    assert "found 7 of 2500 rows outside, e.g. [0, 0, 0, 0, 0] in train-images-idx3-ubyte.gz" in message
    assert info.value.suite == "raw_profile"


def test_one_class_taking_over_stops_the_gate(tmp_path, small_splits, storage):
    (x, y), test = small_splits["train"], small_splits["t10k"]
    y = y.copy()
    y[: len(y) // 2] = 3
    folder = write_dataset(tmp_path / "skewed", {"train": (x, y), "t10k": test})
    with pytest.raises(
        DataValidationError,
        match=r"suite raw_dataset, .*\(min_class_fraction\): .*found split train: min_class_fraction=0\.04.*\(and 1 more failed expectation in the report\)",
    ):
        validate_raw(acquired(folder, storage), storage)


def test_test_images_copied_into_train_are_leakage(tmp_path, small_splits, storage):
    (x, y), (xt, yt) = small_splits["train"], small_splits["t10k"]
    x, y = np.concatenate([x, xt[:100]]), np.concatenate([y, yt[:100]])
    folder = write_dataset(tmp_path / "leak", {"train": (x, y), "t10k": (xt, yt)})
    with pytest.raises(
        DataValidationError,
        match=r"\(overlap_fraction\): expected overlap_fraction in \[-inf, 0.01\], found .*split test: overlap_fraction=0.2",
    ):
        validate_raw(acquired(folder, storage), storage)


def test_near_duplicates_of_the_real_files_are_few_and_noisy_copies_are_all_found(real_splits):
    from pipeline.data.profile import near_duplicates

    (x, _), (xt, _) = real_splits["train"], real_splits["t10k"]
    _, in_test = near_duplicates(x[:20000], xt)
    assert in_test.mean() < 0.005  # the real files: 9 of 10,000 against all 60,000
    copies = np.clip(xt[:300].astype(int) + np.random.default_rng(0).integers(-8, 9, (300, 28, 28)), 0, 255)
    found, _ = near_duplicates(copies.astype(np.uint8), xt)
    assert found.all()


def test_suites_are_the_reviewed_json_files():
    for name in ("raw_profile", "raw_dataset", "incoming_profile", "processed_splits"):
        spec = json.loads((suites_dir() / f"{name}.json").read_text())
        assert len(load_suite(name).expectations) == len(spec["expectations"]) > 0


def test_a_suite_with_an_invalid_expectation_is_refused(tmp_path):
    spec = json.loads((suites_dir() / "raw_profile.json").read_text())
    spec["expectations"].append({"type": "expect_column_values_to_be_between", "kwargs": {"min_value": 1}})
    (tmp_path / "raw_profile.json").write_text(json.dumps(spec))
    with pytest.raises(
        ConfigError, match="raw_profile.json: expected a valid expectation suite, found ValidationError.*column"
    ):
        load_suite("raw_profile", tmp_path)


def test_a_suite_with_an_unknown_expectation_type_is_refused(tmp_path):
    # GX logs and drops an unknown expectation instead of raising; the gate must not weaken.
    spec = json.loads((suites_dir() / "raw_profile.json").read_text())
    spec["expectations"].append({"type": "expect_pixels_to_be_pretty", "kwargs": {"column": "label"}})
    (tmp_path / "raw_profile.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match="raw_profile.json: expected"):
        load_suite("raw_profile", tmp_path)
