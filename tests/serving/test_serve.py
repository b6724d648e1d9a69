"""The serving app in-process (FastAPI's TestClient, a small real torch model): input safety,
readiness, micro-batching, metrics and the OpenAPI schema. The served process itself, following
a promotion under load, is tested in tests/integration/test_deployment.py."""

from __future__ import annotations

import io
import json
import threading

import numpy as np
import pytest
import torch

from pipeline.serving.app import create_app
from pipeline.serving.metrics import Metrics
from pipeline.serving.openapi import PredictResponse
from pipeline.serving.payload import RequestError, load_json, parse_images, parse_png
from pipeline.serving.slot import ModelSlot, ServedModel

CLASSES = [f"class {i}" for i in range(10)]
IMAGE = (np.arange(784).reshape(28, 28) % 256).tolist()
SHAPE = (1, 28, 28)  # the served version's input_shape
#: Every media type /predict takes, written out: the OpenAPI document must list exactly these.
BODY_TYPES = {
    "application/json",
    "image/png",
    "image/jpeg",
    "image/webp",
    "application/x-npy",
    "application/octet-stream",
}


def served(version: str, scale: float = 1.0) -> ServedModel:
    torch.manual_seed(int(version))
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10), torch.nn.Softmax(dim=1)).eval()
    with torch.no_grad():
        net[1].weight.mul_(scale)
    return ServedModel(
        net,
        {"model_name": "m", "version": version, "alias": "production", "classes": CLASSES, "input_shape": [1, 28, 28]},
    )


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict[str, bytes]:
    """Version 4's network as ONNX float32 and INT8 (calibrated on test-like images), as the
    export stage makes them."""
    from pipeline.models.onnx_variants import export_onnx, quantize_int8

    folder = tmp_path_factory.mktemp("variants")
    pixels = np.random.default_rng(0).integers(0, 256, (64, 1, 28, 28)).astype(np.float32) / 255
    onnx = export_onnx(served("4").model, pixels[:4], folder / "model.onnx")
    int8 = quantize_int8(onnx, pixels, folder / "model.int8.onnx")
    return {"onnx": onnx.read_bytes(), "onnx-int8": int8.read_bytes()}


def served_in(runtime: str, variants: dict[str, bytes]) -> ServedModel:
    """Version 4 in ``runtime``: the torch module, or its ONNX variant on ONNX Runtime."""
    from pipeline.models.onnx_runtime import OnnxClassifier

    model = served("4")
    if runtime == "torch":
        return model
    return ServedModel(OnnxClassifier(variants[runtime]), {**model.metadata, "runtime": runtime}, runtime=runtime)


#: Every test on ``client`` runs once per serving runtime: the same routes, checks and errors.
@pytest.fixture(params=["torch", "onnx", "onnx-int8"])
def client(request, variants):
    from fastapi.testclient import TestClient

    slot = ModelSlot("models:/m@production")
    slot.swap(served_in(request.param, variants))
    with TestClient(create_app(slot)) as test_client:
        test_client.slot = slot
        yield test_client


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=array.dtype == object)
    return buffer.getvalue()


def png_bytes(pixels: np.ndarray, mode: str = "L") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode=mode if mode != "RGB" else None).convert(mode).save(buffer, "PNG")
    return buffer.getvalue()


def test_integers_floats_and_png_become_the_same_pixels():
    image = np.asarray(IMAGE)
    from_ints = parse_images({"image": IMAGE}, SHAPE)
    from_floats = parse_images({"instances": [(image / 255.0).tolist()]}, SHAPE)
    from_png = parse_png(png_bytes(image), SHAPE)
    assert from_ints.shape == (1, 1, 28, 28) and from_ints.dtype == np.float32
    np.testing.assert_allclose(from_ints, from_floats, atol=1e-7)
    np.testing.assert_allclose(from_ints, from_png, atol=1e-7)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([1, 2], "expected a JSON object"),
        ({"images": []}, 'with one key, "instances"'),
        ({"instances": []}, "expected a non-empty list of 28x28 grayscale images, found an empty list"),
        ({"image": [[0] * 28] * 27}, "expected images of shape (28, 28), found (27, 28)"),
        ({"instances": [[[0] * 28] * 28, [[0] * 28] * 3]}, "expected images of shape (28, 28)"),
        ({"image": [[0] * 28] * 27 + [[0] * 27]}, "found (28, rows of [27, 28] lengths)"),  # ragged rows
        ({"image": [[10**30] * 28] * 28}, "found other values"),
        ({"image": [[float("nan")] * 28] * 28}, "found NaN or infinity"),
        ({"image": [[300] * 28] * 28}, "expected integers 0-255, found values from 300 to 300"),
        ({"image": [[-1] * 28] * 28}, "expected integers 0-255, found values from -1 to -1"),
        ({"image": [[1.5] * 28] * 28}, "expected floats in [0, 1]"),
        ({"image": [["x"] * 28] * 28}, "expected numbers"),
        ({"image": [[True] * 28] * 28}, "expected numbers"),
        ({"instances": [IMAGE] * 1025}, "expected at most 1024 images, found 1025"),
    ],
)
def test_malformed_json_requests_say_what_was_expected(payload, message):
    with pytest.raises(RequestError) as error:
        parse_images(payload, SHAPE)
    assert message in str(error.value)


def test_malformed_png_requests_say_what_was_expected():
    with pytest.raises(RequestError, match="expected PNG bytes"):
        parse_png(b"GIF89a....", SHAPE)
    with pytest.raises(RequestError, match=r"expected a 28x28 grayscale PNG, found 28x28 mode RGB"):
        parse_png(png_bytes(np.zeros((28, 28)), "RGB"), SHAPE)
    with pytest.raises(RequestError, match="mode P"):
        parse_png(png_bytes(np.zeros((28, 28)), "P"), SHAPE)
    with pytest.raises(RequestError, match="found 32x28"):
        parse_png(png_bytes(np.zeros((28, 32))), SHAPE)
    with pytest.raises(RequestError, match="expected a readable PNG"):
        parse_png(png_bytes(np.zeros((28, 28)))[:40], SHAPE)


def test_not_ready_before_a_model_is_loaded():
    from fastapi.testclient import TestClient

    with TestClient(create_app(ModelSlot("models:/m@production"))) as client:
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/ready").status_code == 503
        assert client.get("/metadata").status_code == 503
        assert client.post("/predict", json={"image": IMAGE}).status_code == 503


def test_answers_json_and_png_with_the_version(client):
    answer = client.post("/predict", json={"instances": [IMAGE, IMAGE]}).json()
    assert answer["model_version"] == "4" and len(answer["predictions"]) == 2
    first = answer["predictions"][0]
    assert abs(sum(first["probabilities"]) - 1) < 1e-5 and first["class_name"] == CLASSES[first["class_id"]]
    png = client.post("/predict", content=png_bytes(np.asarray(IMAGE)), headers={"content-type": "image/png"}).json()
    np.testing.assert_allclose(png["predictions"][0]["probabilities"], first["probabilities"], atol=1e-6)
    assert client.get("/ready").json() == {"ready": True, "version": "4"}


def test_npy_and_raw_bodies_answer_as_json_does(client):
    """One image or a batch, as numpy.save bytes (uint8, float32) or raw uint8 with its shape."""
    image = np.asarray(IMAGE, dtype=np.uint8)
    expected = client.post("/predict", json={"instances": [IMAGE, IMAGE[::-1]]}).json()["predictions"]
    batch = np.stack([image, image[::-1]])[:, None]  # (2, 1, 28, 28)
    bodies = [
        ("application/x-npy", npy_bytes(batch), {}),
        ("application/x-npy", npy_bytes(batch[:, 0]), {}),  # grayscale without the channel axis
        ("application/x-npy", npy_bytes(batch.astype(np.float32) / 255), {}),
        ("application/octet-stream", batch.tobytes(), {"x-image-shape": "2,1,28,28"}),
        ("application/octet-stream", batch.tobytes(), {}),  # no X-Image-Shape: a whole number of images
    ]
    for kind, body, headers in bodies:
        answer = client.post("/predict", content=body, headers={"content-type": kind, **headers})
        assert answer.status_code == 200, (kind, answer.text)
        for got, want in zip(answer.json()["predictions"], expected, strict=True):
            assert got["class_id"] == want["class_id"]
            np.testing.assert_allclose(got["probabilities"], want["probabilities"], atol=1e-6)
    one = client.post("/predict", content=npy_bytes(image), headers={"content-type": "application/x-npy"}).json()
    np.testing.assert_allclose(one["predictions"][0]["probabilities"], expected[0]["probabilities"], atol=1e-6)


@pytest.mark.parametrize(
    ("headers", "body", "message"),
    [
        ({}, b"\x00" * 1000, "expected a whole number of 28x28 grayscale uint8 images (784 bytes each), found 1000"),
        ({}, b"", "expected a whole number of 28x28 grayscale uint8 images (784 bytes each), found 0"),
        ({"x-image-shape": "28x28"}, b"\x00" * 784, "X-Image-Shape: expected integers separated by commas"),
        (
            {"x-image-shape": "1,28,28"},
            b"\x00" * 783,
            "expected 784 bytes of uint8 pixels for X-Image-Shape 1,28,28, found 783",
        ),
        ({"x-image-shape": "2,3,28,28"}, b"\x00" * 4704, "X-Image-Shape: expected 28x28 grayscale images of shape"),
        ({"x-image-shape": "99999999999,1,28,28"}, b"\x00" * 784, "expected 1 to 1024 images, found 99999999999"),
    ],
    ids=["no-shape-partial", "empty", "not-integers", "short", "wrong-channels", "huge-batch"],
)
def test_bad_raw_bodies_say_what_was_expected(client, headers, body, message):
    response = client.post("/predict", content=body, headers={"content-type": "application/octet-stream", **headers})
    assert response.status_code == 422 and message in response.json()["detail"]


def test_npy_bodies_are_never_unpickled(tmp_path):
    """An object array's pickle inside an .npy body is refused from the header alone."""
    from pipeline.serving.arrays import parse_npy

    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (marker.write_text, ("pwned",))

    body = npy_bytes(np.array([Payload()] * 784, dtype=object).reshape(1, 28, 28))
    with pytest.raises(RequestError, match="found |O"):
        parse_npy(body, SHAPE)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("body", "content_type", "status", "message"),
    [
        (b"{not json", "application/json", 400, "expected JSON"),
        (b"[" * 5000, "application/json", 400, "expected JSON, found RecursionError"),
        (b'{"image": 1' + b"0" * 5000 + b"}", "application/json", 400, "expected JSON, found ValueError"),
        (b'{"image": [[NaN]]}', "application/json", 400, "expected finite numbers, found NaN"),
        (b'{"image": [[true, 2]]}', "application/json", 400, "found the JSON literal true"),
        (b'{"image": [' + b"[0]," * 27 + b"[0, 0]]}", "application/json", 422, "expected images of shape"),
        (b'{"image": [[0, 1], [2, 3]]}', "application/json", 422, "expected images of shape (28, 28), found (2, 2)"),
        (
            b'{"image": ' + str([[0.5] * 28] * 28).replace("0.5", '"a"').encode() + b"}",
            "application/json",
            422,
            "expected numbers",
        ),
        (b'{"image": ' + str([[999] * 28] * 28).encode() + b"}", "application/json", 422, "expected integers 0-255"),
        (b'{"instances": []}', "application/json", 422, "found an empty list"),
        (b"0" * (10 * 1024 * 1024), "application/json", 413, "expected at most 8388608 bytes"),
        (
            b"hello",
            "text/plain",
            415,
            "expected one of application/json, image/png, image/jpeg, image/webp, application/x-npy, "
            "application/octet-stream, found text/plain",
        ),
        (b"\x89PNG\r\n\x1a\nbroken", "image/png", 422, "expected a readable PNG"),
        (b"\x93NUMPY\x01\x00" + b"\xff" * 20, "application/x-npy", 422, "expected .npy bytes"),
        (npy_bytes(np.zeros((28, 28), dtype=object)), "application/x-npy", 422, "found |O"),
        (npy_bytes(np.zeros((1, 28, 28), dtype=np.int64)), "application/x-npy", 422, "found <i8"),
        (npy_bytes(np.zeros((1, 28, 28), dtype=">f4")), "application/x-npy", 422, "found >f4"),
        (
            npy_bytes(np.zeros((28, 28, 1), dtype=np.uint8)),
            "application/x-npy",
            422,
            "channels first, found (28, 28, 1)",
        ),
        (npy_bytes(np.zeros((1025, 28, 28), dtype=np.uint8)), "application/x-npy", 422, "1 to 1024 images, found 1025"),
        (npy_bytes(np.zeros((0, 28, 28), dtype=np.uint8)), "application/x-npy", 422, "1 to 1024 images, found 0"),
        (npy_bytes(np.zeros((2, 28, 28), dtype=np.uint8))[:-1], "application/x-npy", 422, "expected 1568 bytes"),
        (npy_bytes(np.full((28, 28), 1.5, dtype=np.float32)), "application/x-npy", 422, "found values from 1.5"),
        (npy_bytes(np.full((28, 28), np.nan, dtype=np.float32)), "application/x-npy", 422, "NaN or infinity"),
        (npy_bytes(np.asfortranarray(np.zeros((2, 28, 28), dtype=np.uint8))), "application/x-npy", 422, "C order"),
        (b"\x00" * 785, "application/octet-stream", 422, "expected a whole number of 28x28 grayscale uint8 images"),
    ],
    ids=[
        "malformed-json",
        "deep-nesting",
        "huge-integer",
        "nan",
        "boolean",
        "ragged",
        "wrong-shape",
        "wrong-dtype",
        "out-of-range",
        "empty-batch",
        "10-MB",
        "text",
        "bad-png",
        "npy-bad-header",
        "npy-object-dtype",
        "npy-int64",
        "npy-big-endian",
        "npy-channels-last",
        "npy-too-many",
        "npy-none",
        "npy-truncated",
        "npy-out-of-range",
        "npy-nan",
        "npy-fortran",
        "raw-partial-image",
    ],
)
def test_bad_requests_get_a_4xx_with_a_message_and_health_stays_up(client, body, content_type, status, message):
    response = client.post("/predict", content=body, headers={"content-type": content_type})
    assert response.status_code == status and message in response.json()["detail"]
    assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 200


def test_a_10_mb_body_without_content_length_is_cut_off(client):
    """A chunked upload declares no size: it is refused once it passes the limit."""

    def chunks():
        for _ in range(10):
            yield b"0" * (1024 * 1024)

    response = client.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and "found more" in response.json()["detail"]
    assert client.get("/health").status_code == 200


def test_concurrent_requests_share_forward_passes():
    results, barrier = [], threading.Barrier(16)

    def call() -> None:
        barrier.wait()
        results.append(client.post("/predict", json={"image": IMAGE}).status_code)  # noqa: F821 (set below)

    from fastapi.testclient import TestClient

    slow = served("4")
    forward = slow.model.forward

    def slow_forward(x):  # a forward pass long enough for the others to queue behind it
        import time

        time.sleep(0.05)
        return forward(x)

    slow.model.forward = slow_forward
    slot = ModelSlot("models:/m@production")
    slot.swap(slow)
    with TestClient(create_app(slot)) as client:
        threads = [threading.Thread(target=call) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        metrics = client.get("/metrics").text
    assert results == [200] * 16
    passes = float(
        next(line.split()[-1] for line in metrics.splitlines() if line.startswith("serve_batch_images_count"))
    )
    images = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("serve_batch_images_sum")))
    assert images == 16 and passes < 16  # some requests rode along in another's forward pass


def test_metrics_count_requests_by_status_and_name_the_version():
    from fastapi.testclient import TestClient

    metrics = Metrics()
    slot = ModelSlot("models:/m@production", on_swap=metrics.served)
    slot.swap(served("4"))
    with TestClient(create_app(slot, metrics)) as client:
        client.post("/predict", json={"image": IMAGE})
        client.post("/predict", content=b"{", headers={"content-type": "application/json"})
        slot.swap(served("5"))
        text = client.get("/metrics").text
    assert 'serve_requests_total{code="200",route="/predict"} 1.0' in text
    assert 'serve_requests_total{code="400",route="/predict"} 1.0' in text
    assert 'serve_model_version{alias="production",model_name="m",version="5"} 1.0' in text
    assert 'version="4"' not in text
    assert "serve_request_seconds_bucket" in text


def test_after_a_swap_the_next_request_names_the_new_version(client):
    assert client.post("/predict", json={"image": IMAGE}).json()["model_version"] == "4"
    client.slot.swap(served("5", scale=2.0))
    assert client.post("/predict", json={"image": IMAGE}).json()["model_version"] == "5"


def test_openapi_schema_describes_what_the_service_does(client):
    schema = client.get("/openapi.json").json()
    predict = schema["paths"]["/predict"]["post"]
    assert set(predict["requestBody"]["content"]) == BODY_TYPES
    assert (
        "(1, 28, 28) or (n, 1, 28, 28)"
        in predict["requestBody"]["content"]["application/x-npy"]["schema"]["description"]
    )
    assert "X-Image-Shape" in predict["requestBody"]["content"]["application/octet-stream"]["schema"]["description"]
    assert {"200", "400", "413", "415", "422", "503"} <= set(predict["responses"])
    response = predict["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert response.endswith("/PredictResponse")
    assert predict["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/Problem")
    assert {"/health", "/ready", "/metadata", "/metrics"} <= set(schema["paths"])
    # What the schema says is what the service takes and gives.
    import jsonschema

    body = jsonschema.Draft202012Validator(predict["requestBody"]["content"]["application/json"]["schema"])
    assert body.is_valid({"instances": [IMAGE]}) and not body.is_valid({"image": [[0] * 28] * 27})
    PredictResponse.model_validate(client.post("/predict", json={"image": IMAGE}).json())


def test_a_dead_inference_loop_fails_waiting_requests_instead_of_hanging():
    import asyncio

    from pipeline.serving.batching import MicroBatcher

    slot = ModelSlot("models:/m/4")
    slot.swap(served("4"))
    pixels = parse_images({"image": IMAGE}, SHAPE)

    async def scenario() -> None:
        batcher = MicroBatcher(slot)
        batcher.start()
        waiting = [asyncio.ensure_future(batcher.predict(pixels)) for _ in range(3)]
        await asyncio.sleep(0)  # queued, one perhaps already in a forward pass
        batcher._task.cancel()  # the loop ends, as a bug would end it
        for request in waiting:
            with pytest.raises(RuntimeError, match="the inference loop stopped"):
                await asyncio.wait_for(request, 5)
        assert not batcher.alive()
        with pytest.raises(RuntimeError, match="stopped"):
            await batcher.predict(pixels)
        await batcher.stop()

    asyncio.run(scenario())


def bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid PNG header declaring ``width`` x ``height`` pixels, with a tiny IDAT (a few bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def test_finding_png_decompression_bomb_gets_a_4xx_not_a_500(client):
    """400 M declared pixels (Pillow refuses beyond about 179 M with DecompressionBombError)."""
    response = client.post("/predict", content=bomb_png(), headers={"content-type": "image/png"})
    assert response.status_code in (413, 422)
    detail = response.json()["detail"]
    assert "28x28" in detail and "20000x20000" in detail and "\n" not in detail
    with pytest.raises(RequestError):
        parse_png(bomb_png(30_000, 30_000), SHAPE)
    assert client.get("/health").status_code == 200


def test_finding_utf16_body_slips_past_the_boolean_check(client):
    image = [row[:] for row in IMAGE]
    image[0][0] = True
    for text in (json.dumps({"image": image}), json.dumps({"image": IMAGE})):
        for encoding in ("utf-16", "utf-16-le", "utf-32"):
            response = client.post(
                "/predict", content=text.encode(encoding), headers={"content-type": "application/json"}
            )
            assert response.status_code == 400, (encoding, response.text)
            assert "UTF-8" in response.json()["detail"]
    response = client.post(
        "/predict", content=json.dumps({"image": image}).encode(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "literal true" in response.json()["detail"]
    with pytest.raises(RequestError, match="UTF-8"):
        load_json(b"\xef\xbb\xbf" + json.dumps({"image": IMAGE}).encode())  # a BOM is not UTF-8 JSON either


TOKEN = "test-token-0123456789abcdef"


def test_finding_predict_metadata_and_metrics_need_no_authentication():
    from fastapi.testclient import TestClient

    from pipeline.config import ServingSettings

    slot = ModelSlot("models:/m@production")
    slot.swap(served("4"))
    with TestClient(create_app(slot, serving=ServingSettings(token=TOKEN))) as client:
        for method, path, kwargs in (
            ("post", "/predict", {"json": {"image": IMAGE}}),
            ("get", "/metadata", {}),
            ("get", "/metrics", {}),
        ):
            for headers in (
                {},
                {"authorization": "Bearer wrong"},
                {"authorization": TOKEN},
                {"authorization": f"Basic {TOKEN}"},
            ):
                response = getattr(client, method)(path, headers=headers, **kwargs)
                assert response.status_code == 401, (path, headers)
                assert response.headers["www-authenticate"].startswith("Bearer")
            good = getattr(client, method)(path, headers={"authorization": f"Bearer {TOKEN}"}, **kwargs)
            assert good.status_code == 200, path
        assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 200
        schema = client.get("/openapi.json").json()
        assert schema["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
        assert schema["paths"]["/predict"]["post"]["security"] == [{"bearer": []}]
        assert "401" in schema["paths"]["/predict"]["post"]["responses"]
        assert "security" not in schema["paths"]["/health"]["get"]
    with TestClient(create_app(slot, serving=ServingSettings(token=TOKEN, metrics_open=True))) as client:
        assert client.get("/metrics").status_code == 200 and client.get("/metadata").status_code == 401


def test_serving_token_comes_from_the_environment_or_a_private_file(tmp_path):
    from pipeline.config import ServingSettings
    from pipeline.errors import ConfigError

    assert ServingSettings.from_env({}).token is None
    assert ServingSettings.from_env({"PIPELINE_SERVE_TOKEN": TOKEN}).token == TOKEN
    assert TOKEN not in repr(ServingSettings.from_env({"PIPELINE_SERVE_TOKEN": TOKEN}))
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    assert ServingSettings.from_env({"PIPELINE_SERVE_TOKEN_FILE": str(path)}).token == TOKEN
    path.chmod(0o666)
    with pytest.raises(ConfigError, match="PIPELINE_SERVE_TOKEN_FILE"):
        ServingSettings.from_env({"PIPELINE_SERVE_TOKEN_FILE": str(path)})
    for environ in (
        {"PIPELINE_SERVE_TOKEN": "short"},
        {"PIPELINE_SERVE_TOKEN_FILE": str(tmp_path / "missing")},
        {"PIPELINE_SERVE_TOKEN": TOKEN, "PIPELINE_SERVE_TOKEN_FILE": str(path)},
        {"PIPELINE_SERVE_MAX_IN_FLIGHT": "0"},
        {"PIPELINE_SERVE_METRICS_OPEN": "maybe"},
    ):
        with pytest.raises(ConfigError):
            ServingSettings.from_env(environ)
    assert ServingSettings.from_env({"PIPELINE_SERVE_METRICS_OPEN": "true"}).metrics_open


def request_schema(client) -> dict:
    return client.get("/openapi.json").json()["paths"]["/predict"]["post"]["requestBody"]["content"]


def test_finding_openapi_schema_accepts_what_the_server_refuses(client):
    import jsonschema

    content = request_schema(client)
    validator = jsonschema.Draft202012Validator(content["application/json"]["schema"])
    floats = (np.asarray(IMAGE) / 255.0).tolist()
    refused = [
        {},
        {"image": [[200.5] * 28] * 28},
        {"image": IMAGE, "instances": [IMAGE]},
        {"image": None},
        {"instances": None, "image": IMAGE},
        {"image": IMAGE, "other": 1},
        {"image": [[0] * 28] * 27},
        {"image": [[0.5] * 28] * 27 + [[200] * 28]},
        {"instances": []},
    ]
    for body in refused:
        assert not validator.is_valid(body), body
        assert client.post("/predict", json=body).status_code in (400, 422), body
    for body in (
        {"image": IMAGE},
        {"image": floats},
        {"instances": [IMAGE, floats]},
        {"image": (np.asarray(IMAGE, dtype=float)).tolist()},
    ):  # 200.0 is an integer in JSON Schema
        assert validator.is_valid(body)
        assert client.post("/predict", json=body).status_code == 200, body
    png = content["image/png"]["schema"]
    assert png["format"] == "binary" and "28x28" in png["description"] and png["maxLength"] == 8 * 1024 * 1024
    tiny = client.post("/predict", content=png_bytes(np.zeros((1, 1))), headers={"content-type": "image/png"})
    assert tiny.status_code == 422 and "found 1x1" in tiny.json()["detail"]
