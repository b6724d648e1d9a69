"""Explanations for the evaluation report: integrated gradients (Captum) of the served model's
predicted probability to the pixels of a few test images."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

IG_STEPS = 64
"""Integration steps: attributions then sum to p(image) - p(baseline) within about 0.01
(tests/evaluation/test_evaluation_report.py); 8 images cost about a second on 2 CPU cores."""
IG_METHOD = f"Integrated gradients (Captum, {IG_STEPS} steps, black baseline) of the predicted class's probability"


def integrated_gradients(
    model: Any, images: np.ndarray, targets: np.ndarray, steps: int = IG_STEPS
) -> tuple[np.ndarray, np.ndarray]:
    """Attributions ``(n, h, w)`` (summed over colour channels) of the served model's probability of ``targets`` to the pixels
    of uint8 ``images``, from a black baseline (the background of every image), and the
    completeness error of each: sum of attributions minus (p(image) - p(baseline))."""
    import torch
    from captum.attr import IntegratedGradients

    from pipeline.models.export import export_for_serving, to_pixels

    served = export_for_serving(copy.deepcopy(model))  # the registered form: pixels in [0, 1]
    pixels = torch.from_numpy(to_pixels(images))
    attributions, delta = IntegratedGradients(served).attribute(
        pixels,
        baselines=torch.zeros_like(pixels),
        target=torch.from_numpy(targets.astype(np.int64)),
        n_steps=steps,
        return_convergence_delta=True,
    )
    return attributions.sum(dim=1).detach().numpy(), delta.detach().numpy()
