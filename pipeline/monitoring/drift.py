"""Drift: how far a new batch of images has moved from the data the model was trained on.

Compares a batch's profile table (:func:`pipeline.data.profile.profile_table`) with the reference
profile saved when the training data was validated:

* per profile feature: the population stability index (PSI, on the reference's quantile bins)
  and the two-sample Kolmogorov-Smirnov statistic;
* labels, when the batch has them: total variation distance between the label distributions;
* the model's own outputs, when a model is given: distance between the predicted-class
  distributions, the drop in mean confidence, and (with labels) the drop in agreement between
  predictions and labels, which is where label noise shows.

Thresholds are :class:`DriftConfig` fields with documented defaults. The result is a
:class:`DriftReport` (JSON through ``to_dict``, a page through :func:`drift_report_html`).
"""

from __future__ import annotations

import dataclasses
import html
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import ConfigError

DEFAULT_FEATURES = ("pixel_mean", "pixel_std", "nonzero_fraction", "pixel_max", "bbox_height", "bbox_width")


@dataclass(frozen=True)
class DriftConfig:
    """When a batch counts as drifted. Any single flag is enough."""

    psi_threshold: float = 0.25
    """PSI above this on any feature flags it. Rule of thumb: below 0.1 stable, 0.1-0.25
    moderate, above 0.25 a major shift. Same-distribution samples of 1,000 images stay below 0.05."""

    label_distance_threshold: float = 0.08
    """Total variation distance between label distributions (0 same, 1 disjoint). With ten
    balanced classes a class vanishing from the batch gives 0.10; sampling noise alone stays
    near 0.06 for 500 images and 0.02 for 2,000."""

    prediction_distance_threshold: float = 0.1
    """Total variation distance between the model's predicted-class distributions."""

    confidence_drop_threshold: float = 0.05
    """Drop in the model's mean top-class probability, batch against reference."""

    agreement_drop_threshold: float = 0.03
    """Drop in the share of images whose prediction equals their label (needs labels): label
    noise and concept shift show here first."""

    bins: int = 10
    """Quantile bins of the reference used for PSI."""

    features: tuple[str, ...] = DEFAULT_FEATURES
    """Profile columns compared."""

    def __post_init__(self) -> None:
        for name in (
            "psi_threshold",
            "label_distance_threshold",
            "prediction_distance_threshold",
            "confidence_drop_threshold",
            "agreement_drop_threshold",
        ):
            value = getattr(self, name)
            if not 0 < value <= 10:
                raise ConfigError(name, "a value in (0, 10]", repr(value))
        if not 2 <= self.bins <= 100:
            raise ConfigError("bins", "an integer in [2, 100]", repr(self.bins))


@dataclass(frozen=True)
class OutputStatistics:
    """What a model says about a set of images."""

    prediction_distribution: list[float]
    mean_confidence: float
    agreement: float | None = None
    """Share of images whose predicted class equals the label; None without labels."""

    @classmethod
    def from_probabilities(cls, probabilities: np.ndarray, labels: np.ndarray | None = None) -> OutputStatistics:
        predicted = probabilities.argmax(axis=1)
        counts = np.bincount(predicted, minlength=probabilities.shape[1])
        return cls(
            prediction_distribution=(counts / max(len(predicted), 1)).tolist(),
            mean_confidence=float(probabilities.max(axis=1).mean()),
            agreement=None if labels is None else float((predicted == labels).mean()),
        )


@dataclass(frozen=True)
class DriftReport:
    drifted: bool
    reasons: list[str]
    """One line per flag, e.g. ``pixel_mean: PSI 0.83 > 0.25``; empty when nothing drifted."""
    features: dict[str, dict[str, float | bool]]
    labels: dict[str, Any] | None = None
    outputs: dict[str, Any] | None = None
    batch_size: int = 0
    reference_size: int = 0
    thresholds: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def population_stability_index(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """PSI of ``current`` against ``reference`` on the reference's quantile bins."""
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    ref_counts = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=len(edges) + 1)
    cur_counts = np.bincount(np.searchsorted(edges, current, side="right"), minlength=len(edges) + 1)
    # A small floor keeps empty bins from making the log infinite.
    ref_share = np.maximum(ref_counts / len(reference), 1e-4)
    cur_share = np.maximum(cur_counts / len(current), 1e-4)
    return float(np.sum((cur_share - ref_share) * np.log(cur_share / ref_share)))


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    return float(0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum())


def label_distribution(labels: np.ndarray, classes: int = 10) -> np.ndarray:
    return np.bincount(labels.astype(np.int64), minlength=classes) / max(len(labels), 1)


def compute_drift(
    reference: pd.DataFrame,
    batch: pd.DataFrame,
    config: DriftConfig | None = None,
    *,
    reference_outputs: OutputStatistics | None = None,
    batch_outputs: OutputStatistics | None = None,
) -> DriftReport:
    """Compare a batch profile with the reference profile (and model outputs, when given)."""
    from scipy.stats import ks_2samp

    config = config or DriftConfig()
    reasons: list[str] = []
    features: dict[str, dict[str, float | bool]] = {}
    for name in config.features:
        ref, cur = reference[name].to_numpy(float), batch[name].to_numpy(float)
        psi = population_stability_index(ref, cur, config.bins)
        drifted = psi > config.psi_threshold
        features[name] = {
            "psi": psi,
            "ks": float(ks_2samp(ref, cur).statistic),
            "reference_mean": float(ref.mean()),
            "batch_mean": float(cur.mean()),
            "drifted": bool(drifted),
        }
        if drifted:
            reasons.append(
                f"{name}: PSI {psi:.3f} > {config.psi_threshold} (mean {ref.mean():.2f} -> {cur.mean():.2f})"
            )

    labels = None
    if "label" in batch and batch["label"].notna().all():
        ref_dist, cur_dist = (
            label_distribution(reference["label"].to_numpy()),
            label_distribution(batch["label"].to_numpy()),
        )
        distance = total_variation(ref_dist, cur_dist)
        labels = {
            "distance": distance,
            "reference": ref_dist.tolist(),
            "batch": cur_dist.tolist(),
            "drifted": distance > config.label_distance_threshold,
        }
        if labels["drifted"]:
            reasons.append(f"labels: total variation {distance:.3f} > {config.label_distance_threshold}")

    outputs = None
    if reference_outputs is not None and batch_outputs is not None:
        distance = total_variation(
            np.array(reference_outputs.prediction_distribution), np.array(batch_outputs.prediction_distribution)
        )
        confidence_drop = reference_outputs.mean_confidence - batch_outputs.mean_confidence
        outputs = {
            "prediction_distance": distance,
            "reference_confidence": reference_outputs.mean_confidence,
            "batch_confidence": batch_outputs.mean_confidence,
            "confidence_drop": confidence_drop,
            "reference_agreement": reference_outputs.agreement,
            "batch_agreement": batch_outputs.agreement,
        }
        if distance > config.prediction_distance_threshold:
            reasons.append(f"predictions: total variation {distance:.3f} > {config.prediction_distance_threshold}")
        if confidence_drop > config.confidence_drop_threshold:
            reasons.append(
                f"model confidence: dropped {confidence_drop:.3f} > {config.confidence_drop_threshold} "
                f"({reference_outputs.mean_confidence:.3f} -> {batch_outputs.mean_confidence:.3f})"
            )
        if reference_outputs.agreement is not None and batch_outputs.agreement is not None:
            drop = reference_outputs.agreement - batch_outputs.agreement
            outputs["agreement_drop"] = drop
            if drop > config.agreement_drop_threshold:
                reasons.append(
                    f"prediction-label agreement: dropped {drop:.3f} > {config.agreement_drop_threshold} "
                    f"({reference_outputs.agreement:.3f} -> {batch_outputs.agreement:.3f})"
                )

    return DriftReport(
        drifted=bool(reasons),
        reasons=reasons,
        features=features,
        labels=labels,
        outputs=outputs,
        batch_size=len(batch),
        reference_size=len(reference),
        thresholds=dataclasses.asdict(config),
    )


def drift_report_html(report: DriftReport, title: str = "Drift report") -> str:
    """A page a person reads: the verdict, the reasons, then every number behind them."""
    verdict = "DRIFT" if report.drifted else "no drift"
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in report.reasons) or "<li>none</li>"
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{v['psi']:.3f}</td><td>{v['ks']:.3f}</td>"
        f"<td>{v['reference_mean']:.2f}</td><td>{v['batch_mean']:.2f}</td><td>{'yes' if v['drifted'] else ''}</td></tr>"
        for name, v in report.features.items()
    )
    extra = ""
    for name, section in (("Labels", report.labels), ("Model outputs", report.outputs)):
        if section is not None:
            extra += f"<h2>{name}</h2><pre>{html.escape(json.dumps(section, indent=2))}</pre>"
    return (
        f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"
        f"<h1>{html.escape(title)}: {verdict}</h1>"
        f"<p>{report.batch_size} images against a reference of {report.reference_size}.</p>"
        f"<h2>Why</h2><ul>{reasons}</ul>"
        "<h2>Profile features</h2><table border=1><tr><th>feature</th><th>PSI</th><th>KS</th>"
        f"<th>reference mean</th><th>batch mean</th><th>drifted</th></tr>{rows}</table>{extra}"
        f"<h2>Thresholds</h2><pre>{html.escape(json.dumps(report.thresholds, indent=2))}</pre></body></html>"
    )
