"""The endpoint takes the served version's input shape, whatever the data was: a 3-channel 32x32
model answers an RGB JPEG, WebP, PNG or JSON image of that size and refuses Fashion-MNIST's 28x28
grayscale PNG with a 422 that says what it expected; the OpenAPI document states the shape of
the version being served, and follows a swap to a version of another shape."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
import torch
from test_serve import BODY_TYPES

from pipeline.serving.app import create_app
from pipeline.serving.payload import RequestError, parse_image_file, parse_images
from pipeline.serving.slot import ModelSlot, ServedModel

RGB = (3, 32, 32)
GRAY = (1, 28, 28)


def served(version: str, shape: tuple[int, int, int]) -> ServedModel:
    torch.manual_seed(0)
    inputs = int(np.prod(shape))
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(inputs, 4), torch.nn.Softmax(dim=1)).eval()
    metadata = {
        "model_name": "m",
        "version": version,
        "alias": "production",
        "classes": ["a", "b", "c", "d"],
        "input_shape": list(shape),
    }
    return ServedModel(net, metadata)


def encoded(pixels: np.ndarray, fmt: str, **save) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, fmt, **save)
    return buffer.getvalue()


def photo(height: int, width: int) -> np.ndarray:
    """A smooth RGB picture (lossy codecs keep it close), ``(height, width, 3)`` uint8."""
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([rows * 255 // height, cols * 255 // width, (rows + cols) * 127 // (height + width)], -1)


@pytest.fixture
def client():
    from fastapi.testclient import TestClient

    slot = ModelSlot("models:/m@production")
    slot.swap(served("7", RGB))
    with TestClient(create_app(slot)) as test_client:
        test_client.slot = slot
        yield test_client


@pytest.mark.parametrize(
    ("fmt", "kind", "tolerance"),
    [("PNG", "image/png", 1e-7), ("JPEG", "image/jpeg", 0.08), ("WEBP", "image/webp", 0.08)],
)
def test_an_rgb_model_answers_an_rgb_image_file_as_it_answers_the_same_json(client, fmt, kind, tolerance):
    picture = photo(32, 32)
    as_json = client.post("/predict", json={"image": picture.tolist()})
    as_file = client.post("/predict", content=encoded(picture, fmt, quality=95), headers={"content-type": kind})
    assert as_json.status_code == 200 and as_file.status_code == 200, as_file.text
    assert as_file.json()["model_version"] == "7"
    np.testing.assert_allclose(
        as_file.json()["predictions"][0]["probabilities"],
        as_json.json()["predictions"][0]["probabilities"],
        atol=tolerance,
    )
    pixels = parse_image_file(kind, encoded(picture, fmt, quality=95), RGB)
    assert pixels.shape == (1, *RGB) and abs(float(pixels[0, 0].mean()) - picture[..., 0].mean() / 255) < 0.02


def test_an_rgb_model_refuses_a_grayscale_28x28_png_saying_what_it_expected(client):
    fashion = encoded(np.zeros((28, 28)), "PNG")
    response = client.post("/predict", content=fashion, headers={"content-type": "image/png"})
    assert response.status_code == 422
    assert response.json()["detail"] == "image: expected a 32x32 RGB PNG, found 28x28"
    gray32 = encoded(np.zeros((32, 32)), "JPEG")
    response = client.post("/predict", content=gray32, headers={"content-type": "image/jpeg"})
    assert (
        response.status_code == 422
        and response.json()["detail"] == "image: expected a 32x32 RGB JPEG, found 32x32 mode L"
    )
    response = client.post("/predict", json={"image": np.zeros((28, 28), int).tolist()})
    assert (
        response.status_code == 422
        and "expected images of shape (32, 32, 3), found (28, 28)" in response.json()["detail"]
    )


def test_an_image_declared_as_one_type_is_decoded_by_that_decoder_only():
    with pytest.raises(RequestError, match=r"expected JPEG bytes \(image/jpeg\)"):
        parse_image_file("image/jpeg", encoded(photo(32, 32), "PNG"), RGB)
    with pytest.raises(RequestError, match="expected WEBP bytes"):
        parse_image_file("image/webp", b"RIFF\x00\x00\x00\x00WAVEfmt ", RGB)
    with pytest.raises(RequestError, match="expected a readable JPEG"):
        parse_image_file("image/jpeg", encoded(photo(32, 32), "JPEG")[:200], RGB)


def test_exif_orientation_is_honoured():
    from PIL import Image

    upright = photo(20, 32)  # 32 wide, 20 high, as the model wants it
    stored = np.ascontiguousarray(np.rot90(upright, k=1))  # kept on its side, 20 wide, 32 high
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to view
    body = encoded(stored, "PNG", exif=exif)
    pixels = parse_image_file("image/png", body, (3, 20, 32))
    np.testing.assert_allclose(pixels[0], upright.transpose(2, 0, 1) / 255.0, atol=1e-6)
    with pytest.raises(RequestError, match="once turned upright"):
        parse_image_file("image/png", body, (3, 32, 20))


def test_json_colour_images_are_rows_of_channel_triples():
    picture = photo(32, 32)
    pixels = parse_images({"instances": [picture.tolist(), (picture / 255.0).tolist()]}, RGB)
    assert pixels.shape == (2, *RGB)
    np.testing.assert_allclose(pixels[0], picture.transpose(2, 0, 1) / 255.0, atol=1e-7)
    np.testing.assert_allclose(pixels[0], pixels[1], atol=1e-7)


def test_binary_rgb_bodies_are_channels_first_as_the_model_takes_them(client):
    """An RGB batch as .npy or raw bytes, (n, 3, 32, 32), answers as its JSON rows of pixels do;
    the same pixels channels last, as images are stored, get a 422 that says which order."""
    pixels = photo(32, 32)
    expected = client.post("/predict", json={"image": pixels.tolist()}).json()["predictions"][0]["probabilities"]
    planes = pixels.astype(np.uint8).transpose(2, 0, 1)[None]  # (1, 3, 32, 32)
    npy = io.BytesIO()
    np.save(npy, planes)
    for kind, body, headers in (
        ("application/x-npy", npy.getvalue(), {}),
        ("application/octet-stream", planes.tobytes(), {"x-image-shape": "1,3,32,32"}),
    ):
        answer = client.post("/predict", content=body, headers={"content-type": kind, **headers})
        assert answer.status_code == 200, answer.text
        np.testing.assert_allclose(answer.json()["predictions"][0]["probabilities"], expected, atol=1e-6)
    refused = client.post(
        "/predict",
        content=pixels.astype(np.uint8).tobytes(),
        headers={"content-type": "application/octet-stream", "x-image-shape": "32,32,3"},
    )
    assert refused.status_code == 422
    assert refused.json()["detail"] == (
        "X-Image-Shape: expected 32x32 RGB images of shape (3, 32, 32) or (n, 3, 32, 32), channels first, "
        "found (32, 32, 3)"
    )


def test_openapi_states_the_served_versions_shape_and_follows_a_swap(client):
    import jsonschema

    def body_schema() -> dict:
        return client.get("/openapi.json").json()["paths"]["/predict"]["post"]["requestBody"]["content"]

    content = body_schema()
    assert set(content) == BODY_TYPES
    assert "32x32 RGB" in content["image/jpeg"]["schema"]["description"]
    rgb = jsonschema.Draft202012Validator(content["application/json"]["schema"])
    assert rgb.is_valid({"image": photo(32, 32).tolist()}) and not rgb.is_valid(
        {"image": np.zeros((32, 32), int).tolist()}
    )
    client.slot.swap(served("8", GRAY))
    content = body_schema()
    assert "28x28 grayscale" in content["image/png"]["schema"]["description"]
    gray = jsonschema.Draft202012Validator(content["application/json"]["schema"])
    assert gray.is_valid({"image": np.zeros((28, 28), int).tolist()}) and not gray.is_valid(
        {"image": photo(32, 32).tolist()}
    )
    assert client.post("/predict", json={"image": np.zeros((28, 28), int).tolist()}).json()["model_version"] == "8"
    assert client.get("/metadata").json()["input_shape"] == [1, 28, 28]


def test_a_request_decoded_for_a_version_swapped_out_meanwhile_gets_409():
    from pipeline.serving.batching import MicroBatcher, ShapeChanged

    slot = ModelSlot("models:/m@production")
    slot.swap(served("7", RGB))
    old = parse_images({"image": photo(32, 32).tolist()}, RGB)
    slot.swap(served("8", GRAY))  # promoted between the decoding and the forward pass
    new = parse_images({"image": np.zeros((28, 28), int).tolist()}, GRAY)

    async def scenario() -> None:
        batcher = MicroBatcher(slot)
        batcher.start()
        stale, fresh = batcher.predict(old), batcher.predict(new)
        results = await asyncio.gather(stale, fresh, return_exceptions=True)
        assert isinstance(results[0], ShapeChanged) and results[0].status == 409
        assert "expected 28x28 grayscale images for version 8" in str(results[0])
        probabilities, model = results[1]
        assert model.version == "8" and probabilities.shape == (1, 4)
        await batcher.stop()

    asyncio.run(scenario())
