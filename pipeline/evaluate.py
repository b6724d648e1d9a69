"""Evaluate: the trained model on the held-out test split, in terms a person reads.

Logs to the training run: ``test_accuracy``, ``test_macro_f1``, per-class precision, recall and
F1 (metrics ``test_f1_<class>`` and the table ``evaluation/per_class_metrics.json``) and a
confusion-matrix image (``evaluation/confusion_matrix.png``). Rerunning on a run that already
has them logs nothing new.

Returns an :class:`~pipeline.refs.EvaluationResult`.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path

import numpy as np

from pipeline.config import Settings
from pipeline.refs import EvaluationResult, ProcessedDatasetRef, TrainResult
from pipeline.storage import Storage
from pipeline.tracking import tracking_client

log = logging.getLogger(__name__)

ARTIFACT_DIR = "evaluation"
PER_CLASS = f"{ARTIFACT_DIR}/per_class_metrics.json"
CONFUSION = f"{ARTIFACT_DIR}/confusion_matrix.png"


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


def confusion_figure(matrix: np.ndarray, classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 7))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    ax.set_title("Confusion matrix (test split)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate(trained: TrainResult, processed: ProcessedDatasetRef, storage: Storage, settings: Settings) -> EvaluationResult:
    """Evaluate the run's best checkpoint on the test split; log everything to the run."""
    client = tracking_client(settings)
    run = client.get_run(trained.run_id)
    if "test_accuracy" in run.data.metrics:
        per_class = json.loads(Path(client.download_artifacts(trained.run_id, PER_CLASS)).read_text())
        log.info("run %s already evaluated: test_accuracy %.4f", trained.run_id, run.data.metrics["test_accuracy"])
        return EvaluationResult(
            run_id=trained.run_id,
            test_accuracy=run.data.metrics["test_accuracy"],
            macro_f1=run.data.metrics["test_macro_f1"],
            per_class=per_class,
            artifacts=[PER_CLASS, CONFUSION],
        )

    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    from pipeline.models import load_checkpoint
    from pipeline.preprocess import load_split

    model = load_checkpoint(str(storage.local_path(f"checkpoints/{trained.run_id}/best.ckpt")))
    images, labels = load_split(processed, storage, "test")
    predicted = predict(model, images).argmax(axis=1)
    classes = processed.classes
    ids = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=ids, zero_division=0)
    per_class = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)
    }
    accuracy = float((predicted == labels).mean())
    macro_f1 = float(np.mean(f1))

    metrics = {"test_accuracy": accuracy, "test_macro_f1": macro_f1}
    for name, values in per_class.items():
        for kind in ("precision", "recall", "f1"):
            metrics[f"test_{kind}_{metric_key(name)}"] = values[kind]
    with tempfile.TemporaryDirectory(prefix="evaluate-") as tmp:
        (Path(tmp) / Path(PER_CLASS).name).write_text(json.dumps(per_class, indent=2))
        confusion_figure(confusion_matrix(labels, predicted, labels=ids), classes, Path(tmp) / Path(CONFUSION).name)
        client.log_artifacts(trained.run_id, tmp, ARTIFACT_DIR)
    # Metrics last: their presence marks the evaluation as complete (see the reuse check above).
    for key, value in sorted(metrics.items(), key=lambda kv: kv[0] == "test_accuracy"):
        client.log_metric(trained.run_id, key, value)
    log.info("run %s: test_accuracy %.4f, macro F1 %.4f", trained.run_id, accuracy, macro_f1)
    return EvaluationResult(
        run_id=trained.run_id, test_accuracy=accuracy, macro_f1=macro_f1, per_class=per_class,
        artifacts=[PER_CLASS, CONFUSION],
    )
