"""The quality gate's policy."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config.base import check_range


@dataclass(frozen=True)
class GatePolicy:
    """When a registered candidate may replace ``production`` (the gate of ``pipeline.gate``).

    Both models are evaluated on the same held-out test split in the same run. With no
    production version yet, only ``min_accuracy`` applies.
    """

    min_accuracy: float = 0.90
    """Absolute floor on the candidate's test accuracy (DAG Param ``gate_min_accuracy``)."""

    max_accuracy_drop: float = 0.005
    """Largest tolerated fall in overall test accuracy against production, e.g. 0.005 = half a
    point: about the noise of a 10,000-image test set (``gate_max_accuracy_drop``)."""

    max_class_drop: float = 0.02
    """Largest tolerated fall in any one class's recall against production; a class has about
    1,000 test images, so 0.02 is a little over one standard error (``gate_max_class_drop``)."""

    min_improvement: float = 0.0
    """Required gain in overall accuracy over production (0: none; ``gate_min_improvement``)."""

    def __post_init__(self) -> None:
        for name in ("min_accuracy", "max_accuracy_drop", "max_class_drop", "min_improvement"):
            check_range(f"gate_{name}", getattr(self, name), 0.0, 1.0)
