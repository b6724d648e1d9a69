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

Metrics are logged last and ``test_accuracy`` last of all: its presence marks the evaluation as
complete, and a rerun returns the logged result without computing anything.

Returns an :class:`~pipeline.refs.EvaluationResult`.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Settings
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

CALIBRATION_BINS = 15
CONFIDENT = 0.9
"""Confidence from which a mistake counts as confident in the report."""
MISTAKES_SHOWN = 16
EXPLAINED_CORRECT, EXPLAINED_MISTAKES = 2, 6
IG_STEPS = 64
"""Integration steps: attributions then sum to p(image) - p(baseline) within about 0.01
(tests/evaluation/test_evaluation_report.py); 8 images cost about a second on 2 CPU cores."""
IG_METHOD = f"Integrated gradients (Captum, {IG_STEPS} steps, black baseline) of the predicted class's probability"


def metric_key(class_name: str) -> str:
    """An MLflow-safe metric suffix for a class name (``T-shirt/top`` -> ``t_shirt_top``)."""
    return re.sub(r"[^a-z0-9]+", "_", class_name.lower()).strip("_")


def predict(model: object, images: np.ndarray, batch_size: int = 2048) -> np.ndarray:
    """Class probabilities for uint8 images ``(n, 28, 28)``."""
    import torch

    outputs = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start : start + batch_size].copy())
            outputs.append(torch.softmax(model(batch), dim=1).numpy())  # type: ignore[operator]
    return np.concatenate(outputs)


def calibration_bins(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int = CALIBRATION_BINS
) -> list[dict[str, Any]]:
    """Equal-width confidence bins ``(lower, upper]`` with the count, accuracy and mean confidence
    of the predictions in each (0 for an empty bin)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    index = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    table = []
    for b in range(n_bins):
        member = index == b
        count = int(member.sum())
        table.append(
            {
                "lower": b / n_bins,
                "upper": (b + 1) / n_bins,
                "count": count,
                "accuracy": float(correct[member].mean()) if count else 0.0,
                "confidence": float(confidence[member].mean()) if count else 0.0,
            }
        )
    return table


def expected_calibration_error(bins: list[dict[str, Any]]) -> float:
    """Sum over bins of ``|bin|/n * |accuracy(bin) - mean confidence(bin)|``."""
    n = sum(b["count"] for b in bins)
    return float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in bins)) if n else 0.0


def worst_class(per_class: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The classes with the lowest and the highest recall, and the gap between them (classes
    without test images left out)."""
    recall = {name: values["recall"] for name, values in per_class.items() if values["support"]}
    worst, best = min(recall, key=recall.__getitem__), max(recall, key=recall.__getitem__)
    return {
        "class": worst,
        "recall": recall[worst],
        "best_class": best,
        "best_recall": recall[best],
        "gap": recall[best] - recall[worst],
    }


def most_confused_pairs(matrix: np.ndarray, classes: list[str], top: int = 5) -> list[dict[str, Any]]:
    """The class pairs most often mistaken for each other, either way round, most first."""
    mistakes = int(matrix.sum() - np.trace(matrix))
    pairs: list[dict[str, Any]] = []
    for i in range(len(classes)):
        for j in range(i + 1, len(classes)):
            count = int(matrix[i, j] + matrix[j, i])
            if count:
                pairs.append(
                    {
                        "classes": [classes[i], classes[j]],
                        "count": count,
                        "first_as_second": int(matrix[i, j]),
                        "second_as_first": int(matrix[j, i]),
                        "share_of_mistakes": count / mistakes,
                    }
                )
    return sorted(pairs, key=lambda pair: -pair["count"])[:top]


def confident_mistakes(probabilities: np.ndarray, labels: np.ndarray, count: int = MISTAKES_SHOWN) -> np.ndarray:
    """Test-split indices of the wrong predictions with the highest confidence, most confident first."""
    wrong = np.flatnonzero(probabilities.argmax(axis=1) != labels)
    return wrong[np.argsort(-probabilities.max(axis=1)[wrong], kind="stable")][:count]


def integrated_gradients(
    model: Any, images: np.ndarray, targets: np.ndarray, steps: int = IG_STEPS
) -> tuple[np.ndarray, np.ndarray]:
    """Attributions ``(n, 28, 28)`` of the served model's probability of ``targets`` to the pixels
    of uint8 ``images``, from a black baseline (the background of every image), and the
    completeness error of each: sum of attributions minus (p(image) - p(baseline))."""
    import torch
    from captum.attr import IntegratedGradients

    from pipeline.models.export import export_for_serving

    served = export_for_serving(copy.deepcopy(model))  # the registered form: pixels in [0, 1]
    pixels = torch.from_numpy(images[:, None].astype(np.float32) / 255.0)
    attributions, delta = IntegratedGradients(served).attribute(
        pixels,
        baselines=torch.zeros_like(pixels),
        target=torch.from_numpy(targets.astype(np.int64)),
        n_steps=steps,
        return_convergence_delta=True,
    )
    return attributions[:, 0].detach().numpy(), delta.detach().numpy()


def build_report(probabilities: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Every number of the evaluation from the test split's predicted probabilities."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    ids = list(range(len(classes)))
    predicted, confidence = probabilities.argmax(axis=1), probabilities.max(axis=1)
    correct = predicted == labels
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=ids, zero_division=0)
    per_class = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)
    }
    accuracy = float(correct.mean())
    bins = calibration_bins(confidence, correct)
    matrix = confusion_matrix(labels, predicted, labels=ids)
    mistakes = confident_mistakes(probabilities, labels)
    return {
        "overall": {
            "test_images": len(labels),
            "accuracy": accuracy,
            "macro_f1": float(np.mean(f1)),
            # Normal approximation of the binomial: how far accuracy may move on another sample.
            "accuracy_margin_95": float(1.96 * np.sqrt(accuracy * (1 - accuracy) / len(labels))),
            "ece": expected_calibration_error(bins),
            "mean_confidence": float(confidence.mean()),
        },
        "per_class": per_class,
        "worst_class": worst_class(per_class),
        "calibration": {"bins": CALIBRATION_BINS, "table": bins},
        "confusion_matrix": matrix.tolist(),
        "most_confused_pairs": most_confused_pairs(matrix, classes),
        "mistakes": {
            "count": int((~correct).sum()),
            "confident_threshold": CONFIDENT,
            "confident_count": int(((~correct) & (confidence >= CONFIDENT)).sum()),
            "most_confident": [_describe(i, probabilities, labels, classes) for i in mistakes],
        },
    }


def _describe(index: int, probabilities: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    predicted = int(probabilities[index].argmax())
    return {
        "index": int(index),
        "true": classes[labels[index]],
        "predicted": classes[predicted],
        "confidence": float(probabilities[index, predicted]),
    }


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
            {**_describe(i, probabilities, labels, classes), "completeness_error": float(error)}
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
