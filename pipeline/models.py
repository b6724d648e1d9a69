"""The networks, the Lightning module that trains them, and the module that is served.

* ``seed_cnn``: the original design's network (one 3x3 convolution with 32 filters, 2x2
  max-pooling, a 128-unit dense layer), kept as the baseline.
* ``simple_cnn``: two convolution blocks with batch norm and dropout; the default.

:class:`ImageClassifier` trains on uint8 batches and normalises them on the fly;
:class:`ServingModel` is what gets registered: float pixels in [0, 1], shape ``(n, 1, 28, 28)``,
in; class probabilities out. It needs nothing but torch and this module to load.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F


def build_network(architecture: str, num_classes: int = 10) -> nn.Module:
    """Logits from normalised images ``(n, 1, 28, 28)``."""
    if architecture == "seed_cnn":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 13 * 13, 128), nn.ReLU(), nn.Linear(128, num_classes),
        )
    if architecture == "simple_cnn":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.25), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Dropout(0.25),
            nn.Linear(128, num_classes),
        )
    raise ValueError(f"unknown architecture {architecture!r}")


class ImageClassifier(pl.LightningModule):
    """Trains a network from :func:`build_network` with Adam and an L2 penalty."""

    def __init__(
        self,
        architecture: str = "simple_cnn",
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-4,
        mean: float = 0.0,
        std: float = 1.0,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = build_network(architecture, num_classes)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(n, 28, 28)`` -> normalised float ``(n, 1, 28, 28)``."""
        x = images.unsqueeze(1).float().div_(255.0)
        return (x - self.hparams.mean) / self.hparams.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalise(images))

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        on_step = stage == "train"
        self.log(f"{stage}_loss", loss, on_step=on_step, on_epoch=True, prog_bar=True)
        self.log(f"{stage}_accuracy", accuracy, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            self.parameters(), lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay
        )


class ServingModel(nn.Module):
    """Pixels in [0, 1], ``(n, 1, 28, 28)`` float32 -> class probabilities ``(n, classes)``."""

    def __init__(self, net: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net((pixels - self.mean) / self.std), dim=1)


def load_checkpoint(path: str) -> ImageClassifier:
    """Rebuild the trained module from a Lightning checkpoint without executing pickled code."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model = ImageClassifier(**checkpoint["hyper_parameters"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def serving_model(model: ImageClassifier) -> ServingModel:
    return ServingModel(model.net, model.hparams.mean, model.hparams.std).eval()
