"""The Lightning module that trains a network, and how a trained one is read back.

:class:`ImageClassifier` trains on uint8 batches and normalises (and, when asked, augments) them
on the device, so the data loader only slices tensors. Weights and activations are kept
``channels_last``: on the 2-core CPU this doubles training throughput of the convolutional
networks (bench/train_bench.py), and it is what GPU tensor cores want.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.config import FASHION_MNIST_CLASSES, FASHION_MNIST_SHAPE, TrainConfig
from pipeline.models.networks import build_network, channel_tensor, flip_averaged_logits

_RECIPE = TrainConfig()
"""The defaults are the training recipe's (:class:`~pipeline.config.TrainConfig`)."""


def random_crop_flip(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Per-image random crop of a zero-padded copy and random horizontal flip, on uint8
    ``(n, h, w)`` or ``(n, h, w, c)`` batches, vectorised (one gather for the whole batch, no
    Python loop)."""
    n, h, w = images.shape[:3]
    channels = (0, 0) * (images.dim() - 3)  # no padding of a trailing channel axis
    padded = F.pad(images, (*channels, padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n, 1, 1), device=images.device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1, 1), device=images.device)
    rows = dy + torch.arange(h, device=images.device).view(1, h, 1)
    cols = dx + torch.arange(w, device=images.device).view(1, 1, w)
    crops = padded[torch.arange(n, device=images.device).view(n, 1, 1), rows, cols]
    flip = torch.rand(n, 1, 1, device=images.device) < 0.5
    if images.dim() == 4:
        flip = flip.unsqueeze(-1)
    return torch.where(flip, crops.flip(2), crops)


def make_optimizer(parameters, name: str, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    """``adamw``, ``adam`` or ``sgd`` (Nesterov momentum 0.9, the usual one for residual CNNs).

    Fused (one kernel over all parameters) on the CPU and CUDA: torch's default there is a
    Python loop over the tensors on the CPU, and SGD's step for resnet_deep on 2 cores took
    0.84 ms that way against 0.33 ms fused, 2% of a training step."""
    parameters = list(parameters)
    fused = True if all(p.device.type in ("cpu", "cuda") for p in parameters) else None
    if name == "sgd":
        return torch.optim.SGD(
            parameters, lr=learning_rate, momentum=0.9, nesterov=True, weight_decay=weight_decay, fused=fused
        )
    kind = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return kind(parameters, lr=learning_rate, weight_decay=weight_decay, fused=fused)


class ImageClassifier(pl.LightningModule):
    """Trains a network from :func:`build_network`.

    ``learning_rate`` is the rate actually used (the training stage scales it with the global
    batch); ``test_time_flip`` makes predictions outside training (validation, evaluation and,
    through :func:`~pipeline.models.export.export_for_serving`, serving) average those for the image and its mirror;
    ``lr_schedule`` is ``onecycle`` (warm-up then cosine decay over the whole run, per
    step), ``cosine`` (decay from the start, per step) or ``constant``; ``temperature`` divides
    the logits of those predictions (1 while training; the training stage sets the one fitted on
    the validation split in ``best.ckpt``, see :func:`~pipeline.training.calibration.fit_temperature`).
    """

    _mean: torch.Tensor
    _std: torch.Tensor

    def __init__(
        self,
        architecture: str = _RECIPE.architecture,
        learning_rate: float = _RECIPE.learning_rate,
        weight_decay: float = _RECIPE.weight_decay,
        optimizer: str = _RECIPE.optimizer,
        lr_schedule: str = _RECIPE.lr_schedule,
        augment: bool = _RECIPE.augment,
        label_smoothing: float = _RECIPE.label_smoothing,
        crop_padding: int = 2,
        test_time_flip: bool = _RECIPE.test_time_flip,
        mean: float | Sequence[float] = 0.0,
        std: float | Sequence[float] = 1.0,
        num_classes: int = len(FASHION_MNIST_CLASSES),
        compile: bool = _RECIPE.compile,
        temperature: float = 1.0,
        in_channels: int = FASHION_MNIST_SHAPE[0],
        image_size: Sequence[int] = FASHION_MNIST_SHAPE[1:],
        *,
        net: nn.Module | None = None,
    ) -> None:
        super().__init__()
        # Kept in checkpoints (the network's weights go in the state dict, its shape is named by
        # ``architecture``); the training stage logs the run's parameters itself (the configured
        # learning rate, not only the scaled one this module gets).
        self.save_hyperparameters(logger=False, ignore=["net"])
        net = net if net is not None else build_network(architecture, num_classes, in_channels, image_size)
        self.net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stub lacks it
        self._compiled: nn.Module | None = None
        # Per channel (one number for all, from checkpoints before); not in the state dict.
        self.register_buffer("_mean", channel_tensor(mean), persistent=False)
        self.register_buffer("_std", channel_tensor(std), persistent=False)

    @property
    def hp(self) -> Any:
        """The hyperparameters (Lightning's attribute dict), by name."""
        return self.hparams

    def configure_model(self) -> None:
        if self.hp.compile and self._compiled is None:
            # Kept out of the module's children so that state_dict keys stay those of ``net``.
            object.__setattr__(self, "_compiled", torch.compile(self.net))

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(n, h, w)`` or ``(n, h, w, c)`` -> normalised float ``(n, c, h, w)``, channels_last."""
        x = (images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)).float().div_(255.0)
        return ((x - self._mean) / self._std).contiguous(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalise(images)
        if self.training:
            return (self._compiled if self._compiled is not None else self.net)(x)
        # .get: checkpoints written before the settings existed lack them.
        logits = flip_averaged_logits(self.net, x) if self.hparams.get("test_time_flip") else self.net(x)
        return logits / self.hparams.get("temperature", 1.0)

    def on_train_epoch_start(self) -> None:
        self._epoch_sums: torch.Tensor | None = None

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        if self.hp.augment:
            images = random_crop_flip(images, self.hp.crop_padding)
        logits = self(images).float()  # the loss in fp32 under bf16 autocast
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.get("label_smoothing", 0.0))
        # The epoch's means are summed here and logged once, on its last batch: every
        # self.log call costs about 1.5 ms in Lightning 2.6 (it moves its metric state to the
        # value's device each time), 4% of a CPU step of resnet_small if done per step.
        with torch.no_grad():
            correct = (logits.argmax(dim=1) == labels).sum().float()
            sums = torch.stack([loss.detach() * len(labels), correct, correct.new_tensor(float(len(labels)))])
            # None at an epoch's start, and absent when a run resumes in the middle of one (the
            # epoch's means then cover the batches run since).
            previous = getattr(self, "_epoch_sums", None)
            self._epoch_sums = sums if previous is None else previous + sums
        if batch_idx == self.trainer.num_training_batches - 1:
            loss_sum, correct_sum, count = self._epoch_sums
            # sync_dist: under DDP each rank sees an equal shard; epoch values are averaged over ranks.
            self.log(
                "train_loss",
                loss_sum / count,
                on_step=False,
                on_epoch=True,
                prog_bar=True,
                sync_dist=True,
                batch_size=1,
            )
            self.log(
                "train_accuracy",
                correct_sum / count,
                on_step=False,
                on_epoch=True,
                prog_bar=True,
                sync_dist=True,
                batch_size=1,
            )
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        # In fp32 even when training in bf16: validation picks best.ckpt, and its figures should
        # be those of the weights as evaluated and served (fp32), not of their bf16 rounding.
        with torch.autocast(device_type=self.device.type, enabled=False):
            logits = self(images)
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        self.log("val_loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("val_accuracy", accuracy, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> Any:
        hp = self.hp
        optimizer = make_optimizer(self.parameters(), hp.optimizer, hp.learning_rate, hp.weight_decay)
        if hp.lr_schedule == "constant":
            return optimizer
        steps = int(self.trainer.estimated_stepping_batches)
        schedule: torch.optim.lr_scheduler.LRScheduler
        if hp.lr_schedule == "onecycle":
            schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp.learning_rate, total_steps=steps)
        else:
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def classifier_from_checkpoint(checkpoint: dict, **overrides: object) -> ImageClassifier:
    """The trained module, in eval mode, from a loaded checkpoint's hyperparameters (with
    ``overrides``) and weights."""
    model = ImageClassifier(**{**checkpoint["hyper_parameters"], **overrides})
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def load_checkpoint(path: str) -> ImageClassifier:
    """Rebuild the trained module from a Lightning checkpoint without executing pickled code."""
    return classifier_from_checkpoint(torch.load(path, map_location="cpu", weights_only=True))
