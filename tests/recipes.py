"""The training recipe tests train with (apart from the tests of the defaults themselves), and the
small processed dataset most tests of a later stage start from.

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
