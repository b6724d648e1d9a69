"""The networks: logits from normalised images ``(n, channels, height, width)``; sized for
Fashion-MNIST's 28x28 grayscale by default, for any other input by ``in_channels`` and
``image_size``.

* ``resnet_deep``: a residual CNN with batch norm in three stages (stem at 28x28 and max-pool,
  one residual block at 14x14 with 32 channels, at 7x7 with 64 and at 4x4 with 128, global
  average pooling); the default. The stem adapts to the size (:func:`stem_reduction`): the
  first stage works at 14 to 28 pixels for images of 28 or more (28 -> 14, 32 -> 16, 96 -> 24,
  224 -> 28), at full size below.
* ``resnet_small``: its first two stages only.
* ``resnet_wide``: ``resnet_small`` with 48 and 96 channels.
* ``resnet_large``: for a GPU; two residual blocks per stage with 64, 128 and 256 channels at
  28x28, 14x14 and 7x7 (no max-pool after the stem).
* ``simple_cnn``: two convolution blocks with batch norm and dropout.
* ``seed_cnn``: the original design's network (one 3x3 convolution with 32 filters, 2x2
  max-pooling, a 128-unit dense layer), kept as the baseline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.config.settings import FASHION_MNIST_CLASSES, FASHION_MNIST_SHAPE


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


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
    arithmetic, for the CPU); without, it works at the full 28x28 (for larger images, at half
    the resolution :func:`stem_reduction` gives the others)."""


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


#: The first stage's smallest side the stem aims at, and its largest reduction.
FIRST_STAGE_MIN_SIDE = 14
MAX_STEM_REDUCTION = 8


def stem_reduction(image_size: Sequence[int], pool_stem: bool = True) -> int:
    """By how much the stem shrinks the images (1, 2, 4 or 8): the largest power of two, up to
    8, that leaves the first stage at least 14 pixels on its short side (2 for 28x28, 4 for
    96x96, 8 for 224x224; 1 below 28), halved for a network that keeps full resolution
    (``pool_stem=False``). Small images keep their detail; large ones do not make the first
    stage's arithmetic grow with their area."""
    side, reduction = min(image_size), 1
    while reduction < MAX_STEM_REDUCTION and side / (2 * reduction) >= FIRST_STAGE_MIN_SIDE:
        reduction *= 2
    return reduction if pool_stem else max(1, reduction // 2)


def _stem(in_channels: int, width: int, reduction: int) -> list[nn.Module]:
    """A convolution, strided by half the ``reduction`` with a kernel that covers its stride,
    then a 2x2 max-pool; for a reduction of 1, a plain 3x3 convolution."""
    if reduction == 1:
        return _conv_bn_relu(in_channels, width)
    stride = reduction // 2
    return [
        nn.Conv2d(in_channels, width, 2 * stride + 1, stride=stride, padding=stride, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    ]


def _resnet(spec: ResNetSpec, num_classes: int, in_channels: int, image_size: Sequence[int]) -> nn.Sequential:
    # Global average pooling at the end: any input size works.
    layers: list[nn.Module] = []
    channels = in_channels
    for index, (width, blocks) in enumerate(spec.stages):
        if index == 0:
            layers += _stem(channels, width, stem_reduction(image_size, spec.pool_stem))
        else:
            layers += _conv_bn_relu(channels, width, stride=2)
        layers += [ResidualBlock(width) for _ in range(blocks)]
        channels = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


def build_network(
    architecture: str,
    num_classes: int = len(FASHION_MNIST_CLASSES),
    in_channels: int = FASHION_MNIST_SHAPE[0],
    image_size: Sequence[int] = FASHION_MNIST_SHAPE[1:],
) -> nn.Module:
    """Logits from normalised images ``(n, in_channels, *image_size)``."""
    height, width = image_size
    if architecture in RESNETS:
        return _resnet(RESNETS[architecture], num_classes, in_channels, (height, width))
    if min(height, width) < 4:
        raise ValueError(f"{architecture} needs images of at least 4x4, not {height}x{width}")
    if architecture == "seed_cnn":
        return nn.Sequential(
            nn.Conv2d(in_channels, 32, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * ((height - 2) // 2) * ((width - 2) // 2), 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )
    if architecture == "simple_cnn":
        return nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Dropout(0.25),
            nn.Linear(64 * (height // 4) * (width // 4), 128),
            nn.ReLU(),
            nn.Dropout(0.25),
            nn.Linear(128, num_classes),
        )
    raise ValueError(f"unknown architecture {architecture!r}")


def channel_tensor(values: float | Sequence[float]) -> torch.Tensor:
    """Per-channel statistics as a ``(c, 1, 1)`` float32 tensor that broadcasts over
    ``(n, c, h, w)`` (one number: ``(1, 1, 1)``, the same for every channel)."""
    listed = [values] if isinstance(values, (int, float)) else list(values)
    return torch.tensor(listed, dtype=torch.float32).view(-1, 1, 1)


def flip_averaged_logits(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits whose softmax is the mean of the class probabilities for ``x`` and for its mirror
    image (test-time augmentation): one forward pass over both halves of a doubled batch."""
    both = net(torch.cat([x, x.flip(-1)])).log_softmax(dim=1)
    # Slices, not chunk(2): with a dynamic batch size, chunk exports to ONNX as a SplitToSequence
    # that the ONNX optimiser cannot fold.
    n = x.shape[0]
    return torch.logaddexp(both[:n], both[n:]) - math.log(2.0)
