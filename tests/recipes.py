"""The training recipe tests train with (apart from the tests of the defaults themselves), the
small processed dataset most tests of a later stage start from, and a model logged to MLflow
without training one.

Tests check what a training does (it runs, checkpoints, registers, passes or fails a gate,
serves), not how accurate the default recipe is on all of Fashion-MNIST: that is
``bench/train_bench.py``'s job (docs/BENCHMARKS.md). Pinning a small recipe here keeps the
tests' expectations (gate floors of 0.5 after one epoch on 2,000 images, a 3-epoch model beating
a 1-epoch one) independent of the default recipe, which is tuned for 15 epochs on 54,000 images:
``resnet_small`` with AdamW at a peak of 4e-3 learns the small sample in one epoch.
Precision and test-time flipping stay at their defaults, so the tests exercise them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

SMALL_RECIPE = {"architecture": "resnet_small", "optimizer": "adamw", "learning_rate": 4e-3, "label_smoothing": 0.0}


def recipe_flags() -> list[str]:
    """SMALL_RECIPE as ``pipeline train``/``pipeline run`` flags."""
    return [part for key, value in SMALL_RECIPE.items() for part in (f"--{key.replace('_', '-')}", str(value))]


@dataclass(frozen=True)
class Prepared:
    """The small real subset acquired, validated and processed into one storage."""

    raw: Any
    validation: Any
    processed: Any


def prepare_small(storage: Any, source: Path) -> Prepared:
    """Acquire, validate and preprocess (default config) the dataset at ``source`` into
    ``storage``: what most tests of a later stage start from."""
    from pipeline.config import AcquireConfig, PreprocessConfig
    from pipeline.data.acquire import acquire
    from pipeline.data.preprocess import preprocess
    from pipeline.data.validate import validate_raw

    raw = acquire(AcquireConfig(source_uri=str(source)), storage)
    validation = validate_raw(raw, storage)
    return Prepared(raw, validation, preprocess(raw, storage, PreprocessConfig()))


def log_model(settings: Any, model: Any, serialization_format: str) -> tuple[str, str]:
    """Log the ``torch.nn.Module`` ``model`` in a run of the pipeline's experiment, in
    ``serialization_format`` (``pt2`` or ``pickle``); (run id, logged model URI)."""
    import mlflow
    import torch

    from pipeline.tracking import tracking_client

    tracking_client(settings)  # sets the tracking URI and creates the store
    mlflow.set_experiment(settings.experiment_name)
    # pt2 traces the program on an example; a pickle gets none (MLflow would load it to check it).
    example = torch.zeros(2, 1, 28, 28).numpy() if serialization_format == "pt2" else None
    with mlflow.start_run() as run:
        info = mlflow.pytorch.log_model(
            model, name="model", serialization_format=serialization_format, input_example=example, pip_requirements=[]
        )
    return run.info.run_id, info.model_uri
