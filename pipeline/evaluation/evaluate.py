"""Evaluate: the trained model on the held-out test split, in a report a person can check.

Logs to the training run, under ``evaluation/``:

* metrics ``test_accuracy``, ``test_macro_f1``, ``test_ece`` (expected calibration error over 15
  equal-width confidence bins), ``test_worst_class_gap`` (best minus worst per-class recall) and
  per-class precision, recall and F1 (``test_f1_<class>``, ...);
* ``report.json``: every number (overall, per class, the per-bin calibration table and the
  temperature the predictions were scaled by, the worst class, the confusion matrix, the most
  confused class pairs, the test-split indices of the most confident mistakes and of the
  explained images); ``per_class_metrics.json``: the per-class table;
* figures: ``confusion_matrix.png``, ``reliability_diagram.png``, ``confident_mistakes.png`` (the
  16 wrong predictions made with the highest confidence) and ``attributions.png`` (integrated
  gradients, with Captum, for 8 test images: 2 correct ones and the 6 most confident mistakes);
* the model card, ``model_card.md`` and ``model_card.html`` (:mod:`pipeline.evaluation.model_card`).

The numbers come from :mod:`pipeline.evaluation.report`, the attributions from
:mod:`pipeline.evaluation.attributions`, the figures from :mod:`pipeline.evaluation.figures`.

Metrics are logged last and ``test_accuracy`` last of all: its presence marks the evaluation as
complete, and a rerun returns the logged result without computing anything.

Returns an :class:`~pipeline.refs.EvaluationResult`.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Settings
from pipeline.evaluation.attributions import IG_METHOD, integrated_gradients
from pipeline.evaluation.report import build_report, describe_prediction
from pipeline.refs import EvaluationResult, ProcessedDatasetRef, TrainResult
from pipeline.storage import Storage
from pipeline.tracking import tracking_client

log = logging.getLogger(__name__)

ARTIFACT_DIR = "evaluation"
PER_CLASS = f"{ARTIFACT_DIR}/per_class_metrics.json"
CONFUSION = f"{ARTIFACT_DIR}/confusion_matrix.png"
RELIABILITY = f"{ARTIFACT_DIR}/reliability_diagram.png"
MISTAKES = f"{ARTIFACT_DIR}/confident_mistakes.png"
ATTRIBUTIONS = f"{ARTIFACT_DIR}/attributions.png"
REPORT = f"{ARTIFACT_DIR}/report.json"
MODEL_CARD_MD = f"{ARTIFACT_DIR}/model_card.md"
MODEL_CARD_HTML = f"{ARTIFACT_DIR}/model_card.html"
ARTIFACTS = [PER_CLASS, CONFUSION, RELIABILITY, MISTAKES, ATTRIBUTIONS, REPORT, MODEL_CARD_MD, MODEL_CARD_HTML]

EXPLAINED_CORRECT, EXPLAINED_MISTAKES = 2, 6
"""Test images explained in ``attributions.png``: correct ones, and the most confident mistakes."""


def metric_key(class_name: str) -> str:
    """An MLflow-safe metric suffix for a class name (``T-shirt/top`` -> ``t_shirt_top``)."""
    return re.sub(r"[^a-z0-9]+", "_", class_name.lower()).strip("_")


def predict(model: object, images: np.ndarray, batch_size: int = 2048) -> np.ndarray:
    """Class probabilities for uint8 images ``(n, h, w)`` or ``(n, h, w, c)``."""
    import torch

    outputs = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start : start + batch_size].copy())
            outputs.append(torch.softmax(model(batch), dim=1).numpy())  # type: ignore[operator]
    return np.concatenate(outputs)


def _title(item: dict[str, Any]) -> str:
    return f"true {item['true']} / predicted {item['predicted']} (p={item['confidence']:.2f})"


def _result(run_id: str, report: dict[str, Any]) -> EvaluationResult:
    return EvaluationResult(
        run_id=run_id,
        test_accuracy=report["overall"]["accuracy"],
        macro_f1=report["overall"]["macro_f1"],
        per_class=report["per_class"],
        artifacts=list(ARTIFACTS),
        ece=report["overall"]["ece"],
        worst_class=report["worst_class"]["class"],
        worst_class_gap=report["worst_class"]["gap"],
    )


def evaluate(
    trained: TrainResult, processed: ProcessedDatasetRef, storage: Storage, settings: Settings
) -> EvaluationResult:
    """Evaluate the run's best checkpoint on the test split; log everything to the run."""
    client = tracking_client(settings)
    run = client.get_run(trained.run_id)
    # test_ece too: a run evaluated before the report existed is evaluated again, to get one.
    if "test_accuracy" in run.data.metrics and "test_ece" in run.data.metrics:
        report = json.loads(Path(client.download_artifacts(trained.run_id, REPORT)).read_text())
        log.info("run %s already evaluated: test_accuracy %.4f", trained.run_id, run.data.metrics["test_accuracy"])
        return _result(trained.run_id, report)

    from pipeline.data.processed import load_split
    from pipeline.evaluation import figures
    from pipeline.evaluation.model_card import model_card_html, model_card_markdown
    from pipeline.models.classifier import load_checkpoint

    model = load_checkpoint(str(storage.local_path(f"checkpoints/{trained.run_id}/best.ckpt")))
    images, labels = load_split(processed, storage, "test")
    probabilities = predict(model, images)
    classes = processed.classes
    report = {
        "run_id": trained.run_id,
        "data": {
            "dataset_hash": processed.dataset_hash,
            "processed_hash": processed.processed_hash,
            "counts": processed.counts,
            "removed": processed.removed,
            "classes": classes,
            "dataset_name": processed.dataset_name,
            "image_shape": list(processed.image_shape),
        },
        **build_report(probabilities, labels, classes),
    }
    # The temperature the training stage fitted on the validation split (1: none; older runs).
    report["calibration"]["temperature"] = float(model.hparams.get("temperature", 1.0))
    mistakes = [item["index"] for item in report["mistakes"]["most_confident"]]
    correct = np.flatnonzero(probabilities.argmax(axis=1) == labels)
    shown = mistakes[:EXPLAINED_MISTAKES]
    explained = np.array([*correct[: EXPLAINED_CORRECT + EXPLAINED_MISTAKES - len(shown)], *shown], dtype=np.int64)
    attributions, completeness = integrated_gradients(model, images[explained], probabilities[explained].argmax(axis=1))
    report["attributions"] = {
        "method": IG_METHOD,
        "images": [
            {**describe_prediction(i, probabilities, labels, classes), "completeness_error": float(error)}
            for i, error in zip(explained, completeness, strict=True)
        ],
    }

    overall, worst = report["overall"], report["worst_class"]
    metrics = {
        "test_accuracy": overall["accuracy"],
        "test_macro_f1": overall["macro_f1"],
        "test_ece": overall["ece"],
        "test_worst_class_gap": worst["gap"],
    }
    for name, values in report["per_class"].items():
        for kind in ("precision", "recall", "f1"):
            metrics[f"test_{kind}_{metric_key(name)}"] = values[kind]
    with tempfile.TemporaryDirectory(prefix="evaluate-") as tmp:
        folder = Path(tmp)
        (folder / Path(PER_CLASS).name).write_text(json.dumps(report["per_class"], indent=2))
        (folder / Path(REPORT).name).write_text(json.dumps(report, indent=2))
        figures.confusion_figure(np.array(report["confusion_matrix"]), classes, folder / Path(CONFUSION).name)
        figures.reliability_figure(report["calibration"]["table"], overall["ece"], folder / Path(RELIABILITY).name)
        figures.mistakes_figure(
            images[mistakes], [_title(m) for m in report["mistakes"]["most_confident"]], folder / Path(MISTAKES).name
        )
        figures.attribution_figure(
            images[explained],
            attributions,
            [_title(m) for m in report["attributions"]["images"]],
            IG_METHOD,
            folder / Path(ATTRIBUTIONS).name,
        )
        (folder / Path(MODEL_CARD_MD).name).write_text(model_card_markdown(report, run.data.params))
        (folder / Path(MODEL_CARD_HTML).name).write_text(model_card_html(report, run.data.params))
        client.log_artifacts(trained.run_id, tmp, ARTIFACT_DIR)
    # Metrics last: their presence marks the evaluation as complete (see the reuse check above).
    for key, value in sorted(metrics.items(), key=lambda kv: kv[0] == "test_accuracy"):
        client.log_metric(trained.run_id, key, value)
    log.info(
        "run %s: test_accuracy %.4f, macro F1 %.4f, ECE %.4f, worst class %s (recall gap %.4f)",
        trained.run_id,
        overall["accuracy"],
        overall["macro_f1"],
        overall["ece"],
        worst["class"],
        worst["gap"],
    )
    return _result(trained.run_id, report)
