"""The quality gate's policy."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config.base import check_settings, setting


@dataclass(frozen=True)
class GatePolicy:
    """When a registered candidate may replace ``production`` (the gate of ``pipeline.gate``).

    Both models are evaluated on the same held-out test split in the same run. With no
    production version yet, only ``min_accuracy`` applies.
    """

    min_accuracy: float = setting(
        0.90,
        title="Accuracy floor",
        help="Absolute floor on the candidate's test accuracy.",
        section="gate",
        param="gate_min_accuracy",
        minimum=0,
        maximum=1,
    )
    # 0.005 is half a point: about the noise of a 10,000-image test set.
    max_accuracy_drop: float = setting(
        0.005,
        title="Tolerated accuracy drop",
        help="Largest tolerated fall in overall test accuracy against production (0.005: half a point).",
        section="gate",
        param="gate_max_accuracy_drop",
        minimum=0,
        maximum=1,
    )
    # A class has about 1,000 test images, so 0.02 is a little over one standard error.
    max_class_drop: float = setting(
        0.02,
        title="Tolerated drop in any class's recall",
        help="Largest tolerated fall in any one class's recall against production.",
        section="gate",
        param="gate_max_class_drop",
        minimum=0,
        maximum=1,
    )
    min_improvement: float = setting(
        0.0,
        title="Required gain",
        help="Required gain in overall test accuracy over production (0: none).",
        section="gate",
        param="gate_min_improvement",
        minimum=0,
        maximum=1,
    )

    def __post_init__(self) -> None:
        check_settings(self)
