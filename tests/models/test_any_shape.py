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
