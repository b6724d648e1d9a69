"""Drift on real data: a clean batch raises no alarm; each legitimate shift is flagged by name
and still passes the data gate (it is a shift to watch, not broken data)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from pipeline.data.expectations import ephemeral_context, load_suite, run_suite
from pipeline.data.profile import profile_table
from pipeline.errors import ConfigError
from pipeline.monitoring.drift import (
    DriftConfig,
    OutputStatistics,
    compute_drift,
    drift_report_html,
    population_stability_index,
)

BATCH = 2000
Images = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Shift:
    name: str
    apply: Callable[[np.ndarray, np.ndarray], Images]
    flagged_by: str
    """Start of the drift report's reason line that must name this shift."""


def _noise(x: np.ndarray, y: np.ndarray) -> Images:
    noisy = x.astype(np.float32) + np.random.default_rng(0).normal(0, 60, x.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8), y


def _without_class(x: np.ndarray, y: np.ndarray) -> Images:
    return x[y != 3], y[y != 3]


def _one_class_heavy(x: np.ndarray, y: np.ndarray) -> Images:
    keep = np.concatenate([np.flatnonzero(y == 5)] * 19 + [np.flatnonzero(y != 5)[:200]])
    return x[keep], y[keep]


SHIFTS = [
    Shift("gaussian_noise", _noise, "pixel_std"),
    Shift("darker_images", lambda x, y: ((x * 0.6).astype(np.uint8), y), "pixel_mean"),
    Shift(
        "brighter_objects",
        lambda x, y: (np.where(x > 0, np.clip(x.astype(int) + 60, 0, 255), 0).astype(np.uint8), y),
        "pixel_mean",
    ),
    Shift("rotated_90", lambda x, y: (np.rot90(x, axes=(1, 2)).copy(), y), "bbox_height"),
    Shift("class_missing_from_batch", _without_class, "labels"),
    Shift("one_class_at_95_percent", _one_class_heavy, "labels"),
]


@pytest.fixture(scope="module")
def reference(real_splits):
    return profile_table({"train": real_splits["train"]})


@pytest.fixture(scope="module")
def clean_batch(real_splits) -> Images:
    images, labels = real_splits["t10k"]
    return images[:BATCH], labels[:BATCH]


def batch_profile(images: np.ndarray, labels: np.ndarray):
    return profile_table({"incoming": (images, labels)})


def test_clean_batch_raises_no_alarm(reference, clean_batch):
    report = compute_drift(reference, batch_profile(*clean_batch))
    assert not report.drifted and report.reasons == []
    assert max(f["psi"] for f in report.features.values()) < 0.05
    assert report.labels["distance"] < 0.05


@pytest.mark.parametrize("shift", SHIFTS, ids=lambda s: s.name)
def test_shift_is_flagged_by_name(reference, clean_batch, shift):
    report = compute_drift(reference, batch_profile(*shift.apply(*clean_batch)))
    assert report.drifted
    assert any(reason.startswith(shift.flagged_by) for reason in report.reasons), report.reasons
    page = drift_report_html(report)
    assert "DRIFT" in page and shift.flagged_by in page


@pytest.mark.parametrize("shift", [s for s in SHIFTS if s.flagged_by != "labels"], ids=lambda s: s.name)
def test_shifted_images_still_pass_the_per_image_gate(clean_batch, shift):
    """These are changes in the world to watch, not broken data: the gate lets them through."""
    result = run_suite(
        ephemeral_context(), load_suite("raw_profile"), batch_profile(*shift.apply(*clean_batch)), "raw_profile"
    )
    assert result.success, [r.expectation_config.kwargs.get("column") for r in result.results if not r.success]


def test_psi_is_zero_for_the_same_sample_and_grows_with_the_shift():
    rng = np.random.default_rng(1)
    base = rng.normal(0, 1, 10000)
    assert population_stability_index(base, base) == pytest.approx(0, abs=1e-9)
    small, large = (population_stability_index(base, base + d) for d in (0.1, 1.0))
    assert 0 < small < 0.1 < 0.25 < large


def test_config_refuses_nonsense():
    with pytest.raises(ConfigError, match="psi_threshold: expected a value in \\(0, 10\\], found -1"):
        DriftConfig(psi_threshold=-1)


@pytest.mark.slow
def test_label_noise_shows_in_prediction_label_agreement(real_splits):
    """5% of labels flipped: pixels and label counts look the same, the model disagrees more."""
    import pytorch_lightning as pl
    import torch

    from pipeline.evaluation.evaluate import predict
    from pipeline.models.classifier import ImageClassifier
    from pipeline.training.datamodule import TensorBatches, batch_loader

    (x, y), (xt, yt) = real_splits["train"], real_splits["t10k"]
    pl.seed_everything(0, verbose=False)
    # A quick recipe (one epoch of the small network with Adam), not the default one.
    model = ImageClassifier(
        architecture="resnet_small",
        optimizer="adamw",
        learning_rate=1e-3,
        weight_decay=1e-4,
        augment=False,
        label_smoothing=0.0,
        test_time_flip=False,
        mean=0.286,
        std=0.353,
    )
    data = TensorBatches(torch.from_numpy(x[:12000].copy()), torch.from_numpy(y[:12000].astype("int64")))
    pl.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    ).fit(model, batch_loader(data, 128, shuffle=True))
    model.eval()

    reference_x, reference_y = xt[5000:], yt[5000:]
    batch_x, batch_y = xt[:5000], yt[:5000].copy()
    flip = np.random.default_rng(0).choice(len(batch_y), size=len(batch_y) // 20, replace=False)
    batch_y[flip] = (batch_y[flip] + np.random.default_rng(1).integers(1, 10, len(flip))) % 10

    ref_out = OutputStatistics.from_probabilities(predict(model, reference_x), reference_y)
    clean_out = OutputStatistics.from_probabilities(predict(model, batch_x), yt[:5000])
    noisy_out = OutputStatistics.from_probabilities(predict(model, batch_x), batch_y)
    reference = batch_profile(reference_x, reference_y)

    clean = compute_drift(
        reference, batch_profile(batch_x, yt[:5000]), reference_outputs=ref_out, batch_outputs=clean_out
    )
    assert not clean.drifted, clean.reasons
    noisy = compute_drift(
        reference, batch_profile(batch_x, batch_y), reference_outputs=ref_out, batch_outputs=noisy_out
    )
    assert [r.split(":")[0] for r in noisy.reasons] == ["prediction-label agreement"]
