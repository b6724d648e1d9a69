"""The networks, the training module and the served form take their input's channels, size and
classes from the data: grayscale 8x8 (scikit-learn's digits), RGB 32x32 and Fashion-MNIST's
28x28 alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import ARCHITECTURES
from pipeline.models.classifier import ImageClassifier, random_crop_flip
from pipeline.models.export import export_for_serving, predict_probabilities, to_pixels
from pipeline.models.networks import build_network

SHAPES = [(1, 8, 8), (3, 32, 32), (1, 28, 28), (3, 20, 12)]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_every_network_takes_any_channels_and_size(architecture, shape):
    channels, height, width = shape
    net = build_network(architecture, num_classes=7, in_channels=channels, image_size=(height, width)).eval()
    with torch.no_grad():
        logits = net(torch.rand(2, channels, height, width))
    assert logits.shape == (2, 7)


def test_the_default_sizes_are_fashion_mnists_and_unchanged():
    # The baseline's dense layer after a 3x3 conv and 2x2 pool of 28x28: 32 * 13 * 13 inputs.
    assert build_network("seed_cnn")[4].in_features == 32 * 13 * 13
    assert build_network("simple_cnn")[10].in_features == 64 * 7 * 7
    assert build_network("resnet_deep")[0].in_channels == 1


def _first_stage_side(architecture: str, channels: int, side: int) -> int:
    """The side of the feature maps the first residual block sees."""
    from pipeline.models.networks import ResidualBlock

    net = build_network(architecture, in_channels=channels, image_size=(side, side)).eval()
    seen: list[int] = []
    block = next(m for m in net if isinstance(m, ResidualBlock))
    block.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].shape[-1]))
    with torch.no_grad():
        net(torch.rand(1, channels, side, side))
    return seen[0]


@pytest.mark.parametrize(
    ("side", "first", "large_first"),
    [(8, 8, 8), (28, 14, 28), (32, 16, 32), (64, 16, 32), (96, 24, 48), (224, 28, 56)],
)
def test_the_residual_stem_adapts_to_the_image_size(side, first, large_first):
    # Small images keep their detail (8x8 digits are not pooled to 4x4 before the first block);
    # large ones reach the first stage at 14-28 pixels, as 28x28 does, instead of at full size.
    assert _first_stage_side("resnet_deep", 3, side) == first
    assert _first_stage_side("resnet_small", 1, side) == first
    assert _first_stage_side("resnet_large", 3, side) == large_first  # full 28x28: half the others' reduction


def test_fashion_mnists_residual_network_is_unchanged_by_the_adaptive_stem():
    # Versions registered before load into the same modules: conv, bn, relu, max-pool, blocks.
    keys = list(build_network("resnet_deep").state_dict())
    assert keys[:2] == ["0.weight", "1.weight"] and "4.body.0.weight" in keys
    assert build_network("resnet_deep")[0].kernel_size == (3, 3) and build_network("resnet_deep")[0].stride == (1, 1)


def test_a_network_refuses_an_image_too_small_for_it():
    with pytest.raises(ValueError, match="at least 4x4"):
        build_network("seed_cnn", image_size=(3, 3))


def test_the_crop_and_flip_of_colour_images_moves_pixels_not_channels():
    torch.manual_seed(0)
    images = torch.zeros(64, 12, 12, 3, dtype=torch.uint8)
    for c in range(3):
        images[..., c] = 10 * (c + 1)  # each channel one value: a mixed channel would show
    out = random_crop_flip(images, padding=2)
    assert out.shape == images.shape
    for c in range(3):
        assert set(out[..., c].unique().tolist()) <= {0, 10 * (c + 1)}
    assert (out == 0).any(), "the padding never showed: nothing was cropped"
    gray = random_crop_flip(images[..., 0], padding=2)
    assert gray.shape == (64, 12, 12)


def test_a_colour_model_trains_a_step_and_serves_the_same_probabilities():
    torch.manual_seed(0)
    model = ImageClassifier(architecture="simple_cnn", num_classes=4, in_channels=3, image_size=(16, 16), mean=0.5)
    images = torch.randint(0, 256, (8, 16, 16, 3), dtype=torch.uint8)
    labels = torch.randint(0, 4, (8,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(random_crop_flip(images, 2)), labels)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    model.eval()
    with torch.no_grad():
        offline = torch.softmax(model(images), dim=1).numpy()
    served = predict_probabilities(export_for_serving(model), images.numpy())
    np.testing.assert_allclose(served, offline, atol=1e-5)
    assert to_pixels(images.numpy()).shape == (8, 3, 16, 16)


def test_normalisation_is_per_channel_in_training_and_serving():
    mean, std = (0.2, 0.4, 0.5), (0.1, 0.2, 0.3)
    model = ImageClassifier(
        architecture="simple_cnn", num_classes=2, in_channels=3, image_size=(8, 8), mean=mean, std=std
    )
    one_sd_above = np.array([[m + s for m, s in zip(mean, std, strict=True)]]) * 255
    images = torch.from_numpy(np.broadcast_to(one_sd_above.round(), (4, 8, 8, 3)).astype(np.uint8).copy())
    normalised = model.normalise(images)
    assert normalised.shape == (4, 3, 8, 8)
    np.testing.assert_allclose(normalised.mean(dim=(0, 2, 3)).numpy(), [1.0, 1.0, 1.0], atol=0.03)
    served = export_for_serving(model.eval())
    assert served.mean.flatten().tolist() == pytest.approx(mean) and served.std.flatten().tolist() == pytest.approx(std)
    # A grayscale module from a checkpoint of before keeps its one number.
    assert ImageClassifier(architecture="simple_cnn", mean=0.29, std=0.35).normalise(
        torch.full((1, 28, 28), 255, dtype=torch.uint8)
    ).mean().item() == pytest.approx((1 - 0.29) / 0.35, rel=1e-5)
