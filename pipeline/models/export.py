"""The module that is registered and served, and its predictions.

:class:`ServingModel` is what gets registered: float pixels in [0, 1], shape ``(n, channels, height,
width)``, in; class probabilities out. It needs nothing but torch and :mod:`pipeline.models.networks` to
load.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from pipeline.models.classifier import ImageClassifier
from pipeline.models.networks import channel_tensor, flip_averaged_logits
from pipeline.models.onnx_runtime import to_pixels

__all__ = ["ServingModel", "export_for_serving", "predict_probabilities", "to_pixels"]


class ServingModel(nn.Module):
    """Pixels in [0, 1], ``(n, c, h, w)`` float32 -> class probabilities ``(n, classes)``.

    With ``test_time_flip`` the probabilities are the mean of those for the image and its
    mirror, and ``temperature`` divides the logits, as in the trained module's evaluation, so
    served and offline answers agree.
    """

    mean: torch.Tensor
    std: torch.Tensor
    temperature: torch.Tensor

    def __init__(
        self,
        net: nn.Module,
        mean: float | Sequence[float],
        std: float | Sequence[float],
        test_time_flip: bool = False,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.net = net
        self.test_time_flip = test_time_flip
        self.register_buffer("mean", channel_tensor(mean))  # per channel, (c, 1, 1)
        self.register_buffer("std", channel_tensor(std))
        self.register_buffer("temperature", torch.tensor(temperature, dtype=torch.float32))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels - self.mean) / self.std
        logits = flip_averaged_logits(self.net, x) if self.test_time_flip else self.net(x)
        return torch.softmax(logits / self.temperature, dim=1)


def export_for_serving(model: ImageClassifier) -> ServingModel:
    # Served inputs arrive NCHW-contiguous; plain weights keep the exported graph simple.
    net = model.net.to(memory_format=torch.contiguous_format)
    return ServingModel(
        net,
        model.hp.mean,
        model.hp.std,
        bool(model.hparams.get("test_time_flip")),
        float(model.hparams.get("temperature", 1.0)),
    ).eval()


def predict_probabilities(model: nn.Module, images: np.ndarray, batch_size: int = 2048) -> np.ndarray:
    """Probabilities from a serving model for uint8 images ``(n, h, w)`` or ``(n, h, w, c)``."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            pixels = torch.from_numpy(to_pixels(images[start : start + batch_size]))
            out.append(model(pixels).numpy())
    return np.concatenate(out)
