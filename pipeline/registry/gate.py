"""Gate: may a registered candidate replace ``production``?

The candidate version and the current ``production`` version are both loaded from the registry
(``models:/<name>/<version>``, the artifacts that would be served) and evaluated on the same
held-out test split, in this one call. The :class:`~pipeline.config.GatePolicy` decides: an
absolute floor on accuracy; no fall in overall accuracy, or in any class's recall, beyond a
tolerance; optionally a minimum gain. With no production version yet, only the floor applies.

The decision and every number behind it go to the version's tags (``gate.*``), to the end of its
description, and to the candidate's run as ``gate/gate_report.json`` and ``gate/gate_report.md``.
A failed gate raises :class:`~pipeline.errors.GateFailedError` with one line saying why; no alias
moves. Returns a :class:`GateResult`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.config import GatePolicy, Settings
from pipeline.errors import GateFailedError
from pipeline.refs import ModelVersionRef, ProcessedDatasetRef, Ref
from pipeline.registry.history import PRODUCTION, TAG_GATE, TAG_GATE_PRODUCTION, alias_version
from pipeline.storage import Storage
from pipeline.tracking import tracking_client

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

# Counts of images make the rates; a drop exactly at the tolerance must pass despite float error.
EPSILON = 1e-9
REPORT_JSON = "gate/gate_report.json"
REPORT_MD = "gate/gate_report.md"
DESCRIPTION_MARK = "\n\n## Promotion gate\n"


@dataclass(frozen=True)
class ModelScore(Ref):
    """One model's numbers on the gate's test split."""

    version: str
    accuracy: float
    class_recall: dict[str, float]


@dataclass(frozen=True)
class GateResult(Ref):
    model_name: str
    version: str
    passed: bool
    reasons: list[str]
    """Why it failed (empty when it passed)."""
    candidate: dict[str, Any]
    """The candidate's :class:`ModelScore`."""
    production: dict[str, Any] | None
    """Production's :class:`ModelScore`, or None when there was no production version."""
    policy: dict[str, float]
    test_images: int
    processed_hash: str


def score(version: str, probabilities: np.ndarray, labels: np.ndarray, classes: list[str]) -> ModelScore:
    predicted = probabilities.argmax(axis=1)
    recall = {
        name: float((predicted[labels == i] == i).mean()) if (labels == i).any() else 0.0
        for i, name in enumerate(classes)
    }
    return ModelScore(version=version, accuracy=float((predicted == labels).mean()), class_recall=recall)


def decide(candidate: ModelScore, production: ModelScore | None, policy: GatePolicy) -> list[str]:
    """The policy's objections to ``candidate`` (an empty list: it may be promoted)."""
    reasons = []
    if candidate.accuracy < policy.min_accuracy:
        reasons.append(f"test accuracy {candidate.accuracy:.4f} below the floor {policy.min_accuracy:.4f}")
    if production is None or production.version == candidate.version:
        return reasons
    delta = candidate.accuracy - production.accuracy
    if -delta > policy.max_accuracy_drop + EPSILON:
        reasons.append(
            f"test accuracy {candidate.accuracy:.4f} is {-delta:.4f} below production v{production.version} "
            f"({production.accuracy:.4f}; tolerance {policy.max_accuracy_drop:.4f})"
        )
    elif policy.min_improvement > 0 and delta < policy.min_improvement - EPSILON:
        reasons.append(
            f"gain over production v{production.version} {delta:+.4f}, less than the required "
            f"{policy.min_improvement:.4f}"
        )
    drops = {
        name: production.class_recall[name] - recall
        for name, recall in candidate.class_recall.items()
        if name in production.class_recall
    }
    for name, drop in sorted(drops.items(), key=lambda kv: -kv[1]):
        if drop > policy.max_class_drop + EPSILON:
            reasons.append(
                f"class {name} recall {candidate.class_recall[name]:.4f} is {drop:.4f} below production "
                f"({production.class_recall[name]:.4f}; tolerance {policy.max_class_drop:.4f})"
            )
    return reasons


def variant_reasons(float_accuracy: float, accuracy: float, agreement: float, policy: GatePolicy) -> list[str]:
    """The policy's objections to an ONNX or INT8 variant of a version, against the version's
    float model on the same test images (an empty list: it may be served)."""
    reasons = []
    drop = float_accuracy - accuracy
    if drop > policy.variant_max_accuracy_drop + EPSILON:
        reasons.append(
            f"test accuracy {accuracy:.4f} is {drop:.4f} below the float model's ({float_accuracy:.4f}; "
            f"tolerance {policy.variant_max_accuracy_drop:.4f})"
        )
    if agreement < policy.variant_min_agreement - EPSILON:
        reasons.append(
            f"top-1 agreement with the float model {agreement:.4f}, below the required "
            f"{policy.variant_min_agreement:.4f}"
        )
    return reasons


def _variant_objections(client: MlflowClient, name: str, version: str) -> list[str]:
    """Under ``require_variants``: each variant's failed verdict (``export.<variant>.verdict``,
    written by :mod:`pipeline.registry.export`), or that none was exported."""
    from pipeline.registry.export import VARIANT_FILES, tag

    tags = client.get_model_version(name, version).tags
    reasons = []
    for variant in VARIANT_FILES:
        verdict = tags.get(tag(variant, "verdict"))
        if verdict is None:
            reasons.append(f"no {variant} variant exported (required by the policy)")
        elif verdict != "passed":
            reasons.append(f"{variant} variant {verdict}")
    return reasons


def report_markdown(result: GateResult) -> str:
    cand, prod = result.candidate, result.production
    verdict = "**passed**" if result.passed else "**failed**: " + "; ".join(result.reasons)
    lines = [
        f"Gate {verdict}.",
        "",
        f"Evaluated on the same {result.test_images} held-out test images (processed data {result.processed_hash}).",
        "",
        "Policy: " + ", ".join(f"{k} {v}" for k, v in result.policy.items()) + ".",
        "",
        f"| | candidate v{cand['version']} | "
        + (f"production v{prod['version']} | delta |" if prod else "production |"),
        "|---|---|" + ("---|---|" if prod else "---|"),
    ]

    def row(label: str, c: float, p: float | None) -> str:
        return f"| {label} | {c:.4f} | " + (f"{p:.4f} | {c - p:+.4f} |" if p is not None else "none |")

    lines.append(row("test accuracy", cand["accuracy"], prod["accuracy"] if prod else None))
    for name, recall in cand["class_recall"].items():
        lines.append(row(f"recall: {name}", recall, prod["class_recall"].get(name) if prod else None))
    return "\n".join(lines) + "\n"


def _record(client: MlflowClient, result: GateResult) -> None:
    """Report files, description, then tags, the verdict (``gate.decision``) last: a version
    carries a verdict only once everything behind it is written."""
    from pipeline.registry.register import fit_description

    name, version = result.model_name, result.version
    prod = result.production
    markdown = report_markdown(result)
    found = client.get_model_version(name, version)
    if found.run_id:
        with tempfile.TemporaryDirectory(prefix="gate-") as tmp:
            (Path(tmp) / Path(REPORT_JSON).name).write_text(json.dumps(result.to_dict(), indent=2))
            (Path(tmp) / Path(REPORT_MD).name).write_text(markdown)
            client.log_artifacts(found.run_id, tmp, "gate")
    card = (found.description or "").split(DESCRIPTION_MARK)[0]
    client.update_model_version(
        name, version, description=fit_description(card, DESCRIPTION_MARK + markdown, found.run_id or "")
    )
    tags = {
        "gate.reasons": "; ".join(result.reasons)[:4900] or "none",
        "gate.candidate_accuracy": f"{result.candidate['accuracy']:.4f}",
        "gate.candidate_class_recall": json.dumps(
            {k: round(v, 4) for k, v in result.candidate["class_recall"].items()}
        ),
        TAG_GATE_PRODUCTION: prod["version"] if prod else "none",
        "gate.production_accuracy": f"{prod['accuracy']:.4f}" if prod else "none",
        "gate.production_class_recall": json.dumps({k: round(v, 4) for k, v in prod["class_recall"].items()})
        if prod
        else "none",
        "gate.policy": json.dumps(result.policy, sort_keys=True),
        "gate.test_data": result.processed_hash,
        TAG_GATE: "passed" if result.passed else "failed",
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def gate(
    candidate: ModelVersionRef, processed: ProcessedDatasetRef, storage: Storage, settings: Settings, policy: GatePolicy
) -> GateResult:
    """Evaluate ``candidate`` against production under ``policy``; raise if it must not go on."""
    from pipeline.data.processed import load_split
    from pipeline.models.export import predict_probabilities
    from pipeline.models.registered import load_registered

    client = tracking_client(settings)
    name = candidate.model_name
    images, labels = load_split(processed, storage, "test")
    classes = list(processed.classes)

    def evaluate(version: str) -> ModelScore:
        model = load_registered(f"models:/{name}/{version}")
        return score(version, predict_probabilities(model, images), labels, classes)

    cand = evaluate(candidate.version)
    production_version = alias_version(client, name, PRODUCTION)
    prod: ModelScore | None
    if production_version == candidate.version:
        prod = cand
    else:
        prod = evaluate(production_version) if production_version else None
    reasons = decide(cand, prod, policy)
    if policy.require_variants:
        reasons += _variant_objections(client, name, candidate.version)
    result = GateResult(
        model_name=name,
        version=candidate.version,
        passed=not reasons,
        reasons=reasons,
        candidate=cand.to_dict(),
        production=prod.to_dict() if prod else None,
        policy=asdict(policy),
        test_images=len(labels),
        processed_hash=processed.processed_hash,
    )
    _record(client, result)
    if reasons:
        against = f" against production v{production_version}" if prod else " (no production version yet)"
        shown = "; ".join(reasons[:3]) + (
            f"; and {len(reasons) - 3} more (tag gate.reasons)" if len(reasons) > 3 else ""
        )
        raise GateFailedError(
            f"{name} version {candidate.version}{against}", "a model that meets the promotion policy", shown
        )
    log.info(
        "%s version %s passed the gate (accuracy %.4f%s)",
        name,
        candidate.version,
        cand.accuracy,
        f", production v{prod.version} {prod.accuracy:.4f}" if prod else ", no production yet",
    )
    return result
