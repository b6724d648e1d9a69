"""The evaluation report's numbers, from the test split's predicted probabilities and labels:
overall accuracy and macro F1, per-class precision, recall and F1, calibration (expected
calibration error over equal-width confidence bins), the worst class, the confusion matrix, the
most confused class pairs and the most confident mistakes. Pure functions on arrays; the
``evaluate`` stage (:mod:`pipeline.evaluation.evaluate`) logs what they find.
"""

from __future__ import annotations

from typing import Any

import numpy as np

CALIBRATION_BINS = 15
CONFIDENT = 0.9
"""Confidence from which a mistake counts as confident in the report."""
MISTAKES_SHOWN = 16


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
            "most_confident": [describe_prediction(i, probabilities, labels, classes) for i in mistakes],
        },
    }


def describe_prediction(
    index: int, probabilities: np.ndarray, labels: np.ndarray, classes: list[str]
) -> dict[str, Any]:
    """One test image's entry in the report: its index, true and predicted class, and confidence."""
    predicted = int(probabilities[index].argmax())
    return {
        "index": int(index),
        "true": classes[labels[index]],
        "predicted": classes[predicted],
        "confidence": float(probabilities[index, predicted]),
    }
