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
    # An INT8 model that agrees with the float one on 99% of 10,000 images differs on 100 of them;
    # 0.3 points of accuracy is about the noise of that test set.
    variant_max_accuracy_drop: float = setting(
        0.003,
        title="Tolerated accuracy drop of an ONNX or INT8 variant",
        help="Largest tolerated fall in test accuracy of a version's ONNX and INT8 variants against its "
        "float model (0.003: 0.3 points). A variant beyond it is not served.",
        section="gate",
        param="gate_variant_max_accuracy_drop",
        minimum=0,
        maximum=1,
    )
    variant_min_agreement: float = setting(
        0.99,
        title="Required top-1 agreement of an ONNX or INT8 variant",
        help="Share of test images on which a variant must give the float model's class. A variant below "
        "it is not served.",
        section="gate",
        param="gate_variant_min_agreement",
        minimum=0,
        maximum=1,
    )
    require_variants: bool = setting(
        False,
        title="Require the ONNX and INT8 variants to pass",
        help="Fail the gate when a version's ONNX or INT8 variant failed its checks (or none was exported); "
        "off, a failed variant is only not served.",
        section="gate",
        param="gate_require_variants",
    )

    def __post_init__(self) -> None:
        check_settings(self)
