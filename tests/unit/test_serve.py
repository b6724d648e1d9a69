"""The serving app's request parsing and readiness, without a model server process (infra
validation and tests/integration/test_deployment.py run the real one)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.serve import LoadedModel, RequestError, create_app, parse_images


def test_integers_and_floats_become_the_same_pixels():
    image = np.arange(784).reshape(28, 28) % 256
    from_ints = parse_images({"image": image.tolist()})
    from_floats = parse_images({"instances": [(image / 255.0).tolist()]})
    assert from_ints.shape == (1, 1, 28, 28) and from_ints.dtype == np.float32
    np.testing.assert_allclose(from_ints, from_floats, atol=1e-7)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([1, 2], "expected a JSON object"),
        ({"images": []}, 'with "instances"'),
        ({"instances": []}, "expected a non-empty list of 28x28 images, found an empty list"),
        ({"image": [[0] * 28] * 27}, "expected images of shape 28x28, found shape(s) (27, 28)"),
        ({"instances": [[[0] * 28] * 28, [[0] * 28] * 3]}, "expected images of shape 28x28"),
        ({"image": [[300] * 28] * 28}, "expected integers 0-255, found values from 300 to 300"),
        ({"image": [[1.5] * 28] * 28}, "expected floats in [0, 1]"),
        ({"image": [["x"] * 28] * 28}, "expected numbers"),
    ],
)
def test_malformed_requests_say_what_was_expected(payload, message):
    with pytest.raises(RequestError) as error:
        parse_images(payload)
    assert message in str(error.value)


def test_not_ready_before_a_model_is_loaded_and_requests_get_503():
    from fastapi.testclient import TestClient

    client = TestClient(create_app(LoadedModel("models:/m/1")))
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 503
    assert client.post("/predict", json={"image": [[0] * 28] * 28}).status_code == 503


def test_a_loaded_model_answers_and_bad_bodies_get_4xx():
    import torch
    from fastapi.testclient import TestClient

    loaded = LoadedModel("models:/m/4", model=lambda x: torch.softmax(x.flatten(1)[:, :10], dim=1),
                         metadata={"model_name": "m", "version": "4", "classes": [str(i) for i in range(10)]})
    loaded.ready.set()
    client = TestClient(create_app(loaded))
    answer = client.post("/predict", json={"instances": [[[255] * 28] * 28] * 2}).json()
    assert answer["model_version"] == "4" and len(answer["predictions"]) == 2
    assert abs(sum(answer["predictions"][0]["probabilities"]) - 1) < 1e-6
    broken = client.post("/predict", content=b"{not json", headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "expected JSON" in broken.json()["detail"]
    assert client.post("/predict", json={"image": [[0] * 28] * 5}).status_code == 422
    huge = client.post("/predict", content=b"0" * (9 * 1024 * 1024))
    assert huge.status_code == 413
    assert client.get("/health").status_code == 200
