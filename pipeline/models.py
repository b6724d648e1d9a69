"""The networks, the Lightning module that trains them, and the module that is served.

* ``resnet_deep``: a residual CNN with batch norm in three stages (stem at 28x28 and max-pool,
  one residual block at 14x14 with 32 channels, at 7x7 with 64 and at 4x4 with 128, global
  average pooling); the default.
* ``resnet_small``: its first two stages only.
* ``resnet_wide``: ``resnet_small`` with 48 and 96 channels.
* ``resnet_large``: for a GPU; two residual blocks per stage with 64, 128 and 256 channels at
  28x28, 14x14 and 7x7 (no max-pool after the stem).
* ``simple_cnn``: two convolution blocks with batch norm and dropout.
* ``seed_cnn``: the original design's network (one 3x3 convolution with 32 filters, 2x2
  max-pooling, a 128-unit dense layer), kept as the baseline.

:class:`ImageClassifier` trains on uint8 batches and normalises (and, when asked, augments) them
on the device, so the data loader only slices tensors. Weights and activations are kept
``channels_last``: on the 2-core CPU this doubles training throughput of the convolutional
networks (bench/train_bench.py), and it is what GPU tensor cores want.

:class:`ServingModel` is what gets registered: float pixels in [0, 1], shape ``(n, 1, 28, 28)``,
in; class probabilities out. It needs nothing but torch and this module to load.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity shortcut (He et al., 2016)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn_relu(channels, channels),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class ResNetSpec(NamedTuple):
    """A residual network of :func:`_resnet`: a 3x3 stem, then stages of residual blocks."""

    stages: tuple[tuple[int, int], ...]
    """(channels, residual blocks) per stage. Each stage after the first starts with a strided
    3x3 convolution that halves the resolution."""

    pool_stem: bool = True
    """Max-pool after the stem, so that the first stage works at 14x14 (a quarter of the
    arithmetic, for the CPU); without, it works at the full 28x28."""


# On 2 CPU cores resnet_deep trains at 1.25x (fp32) to 1.3x (bf16) resnet_wide's speed with
# equal or better test accuracy (docs/BENCHMARKS.md): its third stage adds depth and parameters
# where the feature maps are small (14 -> 7 -> 4), and its channel counts are multiples of 32,
# which oneDNN ran faster than 48 or 80 in the same probe. resnet_large is for a GPU: twice the
# blocks and channels per stage, the first stage at 28x28 (28 -> 14 -> 7), 27x the arithmetic.
RESNETS: dict[str, ResNetSpec] = {
    "resnet_deep": ResNetSpec(((32, 1), (64, 1), (128, 1))),
    "resnet_small": ResNetSpec(((32, 1), (64, 1))),
    "resnet_wide": ResNetSpec(((48, 1), (96, 1))),
    "resnet_large": ResNetSpec(((64, 2), (128, 2), (256, 2)), pool_stem=False),
}


def _resnet(spec: ResNetSpec, num_classes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 1
    for index, (width, blocks) in enumerate(spec.stages):
        if index == 0:
            layers += _conv_bn_relu(channels, width)
            layers += [nn.MaxPool2d(2)] if spec.pool_stem else []  # 28 -> 14
        else:
            layers += _conv_bn_relu(channels, width, stride=2)
        layers += [ResidualBlock(width) for _ in range(blocks)]
        channels = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


def build_network(architecture: str, num_classes: int = 10) -> nn.Module:
    """Logits from normalised images ``(n, 1, 28, 28)``."""
    if architecture in RESNETS:
        return _resnet(RESNETS[architecture], num_classes)
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


def flip_averaged_logits(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits whose softmax is the mean of the class probabilities for ``x`` and for its mirror
    image (test-time augmentation): one forward pass over both halves of a doubled batch."""
    plain, mirrored = net(torch.cat([x, x.flip(-1)])).log_softmax(dim=1).chunk(2)
    return torch.logaddexp(plain, mirrored) - math.log(2.0)


def random_crop_flip(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Per-image random crop of a zero-padded copy and random horizontal flip, on uint8
    ``(n, h, w)`` batches, vectorised (one gather for the whole batch, no Python loop)."""
    n, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n, 1, 1), device=images.device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1, 1), device=images.device)
    rows = dy + torch.arange(h, device=images.device).view(1, h, 1)
    cols = dx + torch.arange(w, device=images.device).view(1, 1, w)
    crops = padded[torch.arange(n, device=images.device).view(n, 1, 1), rows, cols]
    flip = torch.rand(n, 1, 1, device=images.device) < 0.5
    return torch.where(flip, crops.flip(-1), crops)


def make_optimizer(parameters, name: str, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    """``adamw``, ``adam`` or ``sgd`` (Nesterov momentum 0.9, the usual one for residual CNNs).

    Fused (one kernel over all parameters) on the CPU and CUDA: torch's default there is a
    Python loop over the tensors on the CPU, and SGD's step for resnet_deep on 2 cores took
    0.84 ms that way against 0.33 ms fused, 2% of a training step."""
    parameters = list(parameters)
    fused = True if all(p.device.type in ("cpu", "cuda") for p in parameters) else None
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=learning_rate, momentum=0.9, nesterov=True, weight_decay=weight_decay,
                               fused=fused)
    kind = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return kind(parameters, lr=learning_rate, weight_decay=weight_decay, fused=fused)


class ImageClassifier(pl.LightningModule):
    """Trains a network from :func:`build_network`.

    ``learning_rate`` is the rate actually used (the training stage scales it with the global
    batch); ``test_time_flip`` makes predictions outside training (validation, evaluation and,
    through :func:`serving_model`, serving) average those for the image and its mirror;
    ``lr_schedule`` is ``onecycle`` (warm-up then cosine decay over the whole run, per
    step), ``cosine`` (decay from the start, per step) or ``constant``; ``temperature`` divides
    the logits of those predictions (1 while training; the training stage sets the one fitted on
    the validation split in ``best.ckpt``, see :func:`fit_temperature`).
    """

    def __init__(
        self,
        architecture: str = "resnet_small",
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-4,
        optimizer: str = "adamw",
        lr_schedule: str = "onecycle",
        augment: bool = False,
        label_smoothing: float = 0.0,
        crop_padding: int = 2,
        test_time_flip: bool = False,
        mean: float = 0.0,
        std: float = 1.0,
        num_classes: int = 10,
        compile: bool = False,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        # Kept in checkpoints; the training stage logs the run's parameters itself (the
        # configured learning rate, not only the scaled one this module gets).
        self.save_hyperparameters(logger=False)
        self.net = build_network(architecture, num_classes).to(memory_format=torch.channels_last)
        self._compiled: nn.Module | None = None

    def configure_model(self) -> None:
        if self.hparams.compile and self._compiled is None:
            # Kept out of the module's children so that state_dict keys stay those of ``net``.
            object.__setattr__(self, "_compiled", torch.compile(self.net))

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(n, 28, 28)`` -> normalised float ``(n, 1, 28, 28)``, channels_last."""
        x = images.unsqueeze(1).float().div_(255.0)
        return ((x - self.hparams.mean) / self.hparams.std).contiguous(memory_format=torch.channels_last)

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
        if self.hparams.augment:
            images = random_crop_flip(images, self.hparams.crop_padding)
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
            self.log("train_loss", loss_sum / count, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=1)
            self.log("train_accuracy", correct_sum / count, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=1)
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

    def configure_optimizers(self) -> object:
        hp = self.hparams
        optimizer = make_optimizer(self.parameters(), hp.optimizer, hp.learning_rate, hp.weight_decay)
        if hp.lr_schedule == "constant":
            return optimizer
        steps = int(self.trainer.estimated_stepping_batches)
        if hp.lr_schedule == "onecycle":
            schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp.learning_rate, total_steps=steps)
        else:
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class ServingModel(nn.Module):
    """Pixels in [0, 1], ``(n, 1, 28, 28)`` float32 -> class probabilities ``(n, classes)``.

    With ``test_time_flip`` the probabilities are the mean of those for the image and its
    mirror, and ``temperature`` divides the logits, as in the trained module's evaluation, so
    served and offline answers agree.
    """

    def __init__(self, net: nn.Module, mean: float, std: float, test_time_flip: bool = False,
                 temperature: float = 1.0) -> None:
        super().__init__()
        self.net = net
        self.test_time_flip = test_time_flip
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        self.register_buffer("temperature", torch.tensor(temperature, dtype=torch.float32))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels - self.mean) / self.std
        logits = flip_averaged_logits(self.net, x) if self.test_time_flip else self.net(x)
        return torch.softmax(logits / self.temperature, dim=1)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature ``T`` that minimises the negative log-likelihood of ``softmax(logits / T)``
    on held-out ``labels`` (temperature scaling, Guo et al. 2017). One scalar for all classes:
    every prediction keeps its class and only its confidence moves. Label smoothing and flip
    averaging leave the default recipe underconfident (``T`` below 1 sharpens).

    The likelihood is unimodal in ``log T``, so a golden-section search over [0.05, 20] finds the
    minimum to about 1e-4, deterministically and without gradients."""
    logits, labels = logits.detach().double(), labels.long()

    def nll(log_t: float) -> float:
        return F.cross_entropy(logits / math.exp(log_t), labels).item()

    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    low, high = math.log(0.05), math.log(20.0)
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    nll_a, nll_b = nll(a), nll(b)
    while high - low > 1e-5:
        if nll_a < nll_b:
            high, b, nll_b = b, a, nll_a
            a = high - ratio * (high - low)
            nll_a = nll(a)
        else:
            low, a, nll_a = a, b, nll_b
            b = low + ratio * (high - low)
            nll_b = nll(b)
    return round(math.exp((low + high) / 2.0), 4)


def classifier_from_checkpoint(checkpoint: dict, **overrides: object) -> ImageClassifier:
    """The trained module, in eval mode, from a loaded checkpoint's hyperparameters (with
    ``overrides``) and weights."""
    model = ImageClassifier(**{**checkpoint["hyper_parameters"], **overrides})
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def load_checkpoint(path: str) -> ImageClassifier:
    """Rebuild the trained module from a Lightning checkpoint without executing pickled code."""
    return classifier_from_checkpoint(torch.load(path, map_location="cpu", weights_only=True))


def serving_model(model: ImageClassifier) -> ServingModel:
    # Served inputs arrive NCHW-contiguous; plain weights keep the exported graph simple.
    net = model.net.to(memory_format=torch.contiguous_format)
    return ServingModel(net, model.hparams.mean, model.hparams.std, bool(model.hparams.get("test_time_flip")),
                        float(model.hparams.get("temperature", 1.0))).eval()


PT2_FILE = "model.pt2"
"""The file of a torch.export program inside a logged model's ``data/`` folder."""


def forbid_pickle() -> None:
    """Make MLflow refuse pickled models in this process and its children.

    MLflow 3 defaults ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION`` to true, which lets whoever can
    write to the registry run code on every machine that loads a model. With it false, MLflow's
    own loader also checks that a pt2 archive holds no pickled record.
    """
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"


def model_format(model_dir: Path) -> str:
    """``pt2`` for a torch.export program; otherwise what the logged model holds instead."""
    data = model_dir / "data"
    if not (model_dir / "MLmodel").is_file():
        return "no MLmodel file"
    if (data / PT2_FILE).is_file() and not (data / "model.pth").exists():
        return "pt2"
    if (data / "model.pth").exists():
        return "pickle (data/model.pth)"
    return "no torch.export program (data/model.pt2)"


def _download_checked(model_uri: str, into: str) -> Path:
    from mlflow.artifacts import download_artifacts

    from pipeline.errors import UnsafeModelError

    local = Path(download_artifacts(artifact_uri=model_uri, dst_path=into))
    found = model_format(local)
    if found != "pt2":
        raise UnsafeModelError(model_uri, "a torch.export program (pt2), which loads without running code", found)
    return local


def require_loadable_format(model_uri: str) -> None:
    """Raise :class:`~pipeline.errors.UnsafeModelError` unless ``model_uri`` is a pt2 program."""
    with tempfile.TemporaryDirectory(prefix="model-check-") as tmp:
        _download_checked(model_uri, tmp)


def load_registered(model_uri: str) -> nn.Module:
    """A registered model (``models:/<name>/<version>`` or ``models:/<name>@<alias>``) on the CPU.

    Only torch.export programs (pt2) load: a pickle-format version (which would run whatever code
    its pickle names) is refused with :class:`~pipeline.errors.UnsafeModelError` before anything
    is deserialised, and MLflow's pickle switch is off for anything else.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.errors import UnsafeModelError

    forbid_pickle()
    with tempfile.TemporaryDirectory(prefix="model-") as tmp:
        local = _download_checked(model_uri, tmp)
        try:
            return mlflow.pytorch.load_model(str(local), map_location="cpu")
        except MlflowException as exc:
            if "pickle" not in str(exc):
                raise
            first = str(exc).split(". ")[0]
            raise UnsafeModelError(model_uri, "a pt2 program free of pickled records", first) from exc


def serving_probabilities(model: nn.Module, images: np.ndarray, batch_size: int = 2048) -> np.ndarray:
    """Probabilities from a serving model for uint8 images ``(n, 28, 28)``."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            pixels = torch.from_numpy(images[start : start + batch_size, None].astype(np.float32) / 255.0)
            out.append(model(pixels).numpy())
    return np.concatenate(out)
