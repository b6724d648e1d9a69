"""Fuzzing the serving endpoint: hypothesis properties of the payload parser, the PNG decoder and
the binary array readers (every input parses to float32 pixels in [0, 1] of shape (n, 1, 28, 28) or raises RequestError,
never anything else), and schemathesis against the served OpenAPI on a real loopback server,
with realistic bodies (real Fashion-MNIST images as JSON integers, floats, PNG, .npy and raw
bytes, and mutations of them) besides the schema's own, and the batch and byte limits at their edges. Bounded to about
half a minute."""

from __future__ import annotations

import io
import json

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serve import bomb_png, npy_bytes, png_bytes
from test_serve_limits import live_server

from pipeline.config import ServingSettings
from pipeline.serving.arrays import NPY, RAW
from pipeline.serving.bodies import decode_body
from pipeline.serving.payload import (
    MAX_BATCH,
    MAX_BODY_BYTES,
    RequestError,
    load_json,
    parse_images,
    parse_png,
    request_schema,
)

pytestmark = pytest.mark.slow

SHAPE = (1, 28, 28)  # the served version's input_shape (Fashion-MNIST's)
IMAGE_SHAPE = SHAPE[1:]

FAST = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def real_images(small_splits) -> np.ndarray:
    return small_splits["t10k"][0][:64]


def well_formed(pixels: np.ndarray) -> None:
    assert pixels.dtype == np.float32 and pixels.ndim == 4 and pixels.shape[1:] == (1, 28, 28)
    assert len(pixels) >= 1 and float(pixels.min()) >= 0.0 and float(pixels.max()) <= 1.0


def mutate(data: st.DataObject, document: object) -> object:
    """One random change somewhere in a nested JSON document."""
    if isinstance(document, list) and document and data.draw(st.booleans()):
        index = data.draw(st.integers(0, len(document) - 1))
        return [*document[:index], mutate(data, document[index]), *document[index + 1 :]]
    if isinstance(document, dict) and document and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(document)))
        return {**document, key: mutate(data, document[key])}
    return data.draw(
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(-300, 300),
            st.floats(allow_nan=True),
            st.text(max_size=3),
            st.just([]),
            st.just({}),
            st.integers(10**18, 10**30),
            st.just(document[:-1] if isinstance(document, list) else document),
            st.just([document, document] if not isinstance(document, dict) else {**document, "extra": 1}),
        )
    )


BYTE_ACTIONS = ("flip", "cut", "extend")


def mutate_bytes(data: st.DataObject, body: bytearray, actions: list[str]) -> None:
    """Flip a byte, cut the tail or append random bytes, in place, once per action."""
    for action in actions:
        if action == "flip" and body:
            body[data.draw(st.integers(0, len(body) - 1))] = data.draw(st.integers(0, 255))
        elif action == "cut":
            del body[data.draw(st.integers(0, len(body))) :]
        else:
            body += data.draw(st.binary(max_size=64))


def json_images(data: st.DataObject, images: np.ndarray) -> tuple[dict, bool]:
    """A real body, ints or floats, batch or one image, sometimes mutated; and whether it is valid."""
    chosen = images[data.draw(st.lists(st.integers(0, len(images) - 1), min_size=1, max_size=4))]
    as_floats = data.draw(st.booleans())
    rows = [(image / 255.0).tolist() if as_floats else image.tolist() for image in chosen]
    body: dict = {"instances": rows} if len(rows) > 1 or data.draw(st.booleans()) else {"image": rows[0]}
    if data.draw(st.booleans()):
        return mutate(data, body), False
    return body, True


@FAST
@given(data=st.data())
def test_parse_images_gives_pixels_or_a_request_error(real_images, data):
    body, valid = json_images(data, real_images)
    try:
        well_formed(parse_images(body, SHAPE))
    except RequestError:
        assert not valid


@FAST
@given(
    raw=st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200).map(str.encode),
        st.text(max_size=50).map(lambda t: json.dumps({"image": t}).encode("utf-16")),
    )
)
def test_load_json_reads_json_or_raises_a_request_error(raw):
    try:
        payload = load_json(raw)
    except RequestError:
        return
    try:
        well_formed(parse_images(payload, SHAPE))
    except RequestError:
        pass


@FAST
@given(data=st.data())
def test_parse_png_gives_pixels_or_a_request_error(real_images, data):
    image = real_images[data.draw(st.integers(0, len(real_images) - 1))]
    png = bytearray(
        png_bytes(image)
        if data.draw(st.booleans())
        else bomb_png(*data.draw(st.tuples(st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1))))
    )
    mutate_bytes(data, png, data.draw(st.lists(st.sampled_from(BYTE_ACTIONS), max_size=4)))
    try:
        well_formed(parse_png(bytes(png), SHAPE))
    except RequestError:
        pass


def array_bodies(images: np.ndarray) -> dict[str, list[bytes]]:
    """Valid binary bodies of real images: .npy (uint8 and float32, one image and batches, with and
    without the channel axis) and raw uint8 bytes (a whole number of images)."""
    npy = [npy_bytes(images[:1, None]), npy_bytes(images[0]), npy_bytes(images[:5, None])]
    npy.append(npy_bytes((images[:3, None] / 255).astype(np.float32)))
    return {NPY: npy, RAW: [images[:count].tobytes() for count in (1, 2, 5)]}


@FAST
@given(data=st.data())
def test_binary_bodies_give_pixels_or_a_request_error(real_images, data):
    kind = data.draw(st.sampled_from([NPY, RAW]))
    body = bytearray(data.draw(st.sampled_from(array_bodies(real_images)[kind])))
    mutate_bytes(data, body, data.draw(st.lists(st.sampled_from(BYTE_ACTIONS), max_size=4)))
    declared = data.draw(
        st.one_of(st.none(), st.sampled_from(["1,28,28", "2,1,28,28", "5,28,28", "0,1,28,28", "-1,1,28,28"]), st.text())
    )
    try:
        well_formed(decode_body(kind, bytes(body), SHAPE, declared))
    except RequestError:
        pass


REJECTIONS = ["400", "413", "415", "422"]
"""What the server answers a body it refuses (not UTF-8 JSON, too large, not JSON nor PNG, wrong
content): the only statuses that count as a rejection. Schemathesis' defaults leave 413 out (so a
negated maxItems, 1,025 images over 8 MiB, read as "accepted") and count 5xx, 401, 404... as a
rejection; for valid data they count 5xx, 401, 404... as an acceptance, here only 200 (or 413 for
a body over the byte limit, which the check below holds to exactly that)."""


def refused_for_size_exactly_beyond_the_limit(ctx, response, case) -> None:
    """413 exactly for a body over MAX_BODY_BYTES. JSON Schema cannot bound a JSON body's bytes, so
    a schema-valid batch of long floats may be refused for its size: this is the only such case."""
    body = response.request.body or b""
    size = len(body.encode() if isinstance(body, str) else body)
    if (response.status_code == 413) != (size > MAX_BODY_BYTES):
        raise AssertionError(f"{response.status_code} for a body of {size} bytes (the limit is {MAX_BODY_BYTES})")


def encoded(image: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, fmt, quality=90)
    return buffer.getvalue()


def pillow_reads_one_gray_image(png: bytes) -> bool:
    """An oracle independent of the server: Pillow decodes all of ``png`` as one 28x28 grayscale image."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(png), formats=["PNG"]) as image:
            image.load()
            return image.size == (28, 28) and image.mode in ("L", "1")
    except Exception:  # noqa: BLE001 - any decoder error means "not readable"
        return False


def test_schemathesis_finds_no_accepted_invalid_or_rejected_valid_case(real_images, small_splits):
    import jsonschema_rs
    import requests
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.config import SchemathesisConfig
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import (
        negative_data_rejection,
        positive_data_acceptance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [
        not_a_server_error,
        status_code_conformance,
        response_schema_conformance,
        positive_data_acceptance,
        negative_data_rejection,
        refused_for_size_exactly_beyond_the_limit,
    ]
    config = SchemathesisConfig.from_dict(
        {
            "checks": {
                "positive_data_acceptance": {"expected-statuses": ["200", "413"]},  # 413: see the check above
                "negative_data_rejection": {"expected-statuses": REJECTIONS},
            }
        }
    )
    validator = jsonschema.Draft202012Validator(request_schema(SHAPE))
    # The same schema for 1,024-image bodies: jsonschema takes 10-45 s on each, its Rust port (a dependency
    # of schemathesis) 0.1 s.
    fast_validator = jsonschema_rs.Draft202012Validator(request_schema(SHAPE))
    # An image body's validity is beyond JSON Schema: schemathesis draws real 28x28 images for each type.
    schemathesis.openapi.media_type("image/png", st.sampled_from([png_bytes(image) for image in real_images]))
    for media_type, fmt in (("image/jpeg", "JPEG"), ("image/webp", "WEBP")):
        schemathesis.openapi.media_type(media_type, st.sampled_from([encoded(image, fmt) for image in real_images]))
    for media_type, bodies in array_bodies(real_images).items():
        schemathesis.openapi.media_type(media_type, st.sampled_from(bodies))
    with live_server(ServingSettings()) as port:
        base = f"http://127.0.0.1:{port}"
        schema = schemathesis.openapi.from_url(f"{base}/openapi.json", config=config)
        operation = schema["/predict"]["POST"]
        session = requests.Session()

        # 1. The schema's own cases, positive and negative, with every check. A negated maxItems is a
        # batch of 1,025 images, often over 8 MiB as JSON: 413, a rejection (ST201 before REJECTIONS).
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def schema_cases(case):
                case.call_and_validate(base_url=base, session=session, checks=checks)

            schema_cases()

        def check(response: requests.Response, media_type: str, body: object) -> None:
            assert response.status_code < 500, response.text[:300]
            operation.Case(media_type=media_type, body=body).validate_response(
                response,
                checks=[
                    response_schema_conformance,
                    status_code_conformance,
                    refused_for_size_exactly_beyond_the_limit,
                ],
            )

        # 2. The batch limit, with real images: MAX_BATCH is accepted, one more refused, by both.
        many = np.resize(small_splits["t10k"][0], (MAX_BATCH + 1, *IMAGE_SHAPE))
        for count, status in ((MAX_BATCH, 200), (MAX_BATCH + 1, 422)):
            body = {"instances": many[:count].tolist()}
            response = session.post(f"{base}/predict", json=body, timeout=60)
            assert len(response.request.body) < MAX_BODY_BYTES
            assert (response.status_code, fast_validator.is_valid(body)) == (status, status == 200), response.text[:300]
            check(response, "application/json", body)
        # ... and a valid batch of long floats over the byte limit is the one refusal for size (413).
        body = {"instances": (many[:MAX_BATCH] / 255.0).tolist()}
        response = session.post(f"{base}/predict", json=body, timeout=60)
        assert fast_validator.is_valid(body) and len(response.request.body) > MAX_BODY_BYTES
        assert response.status_code == 413, response.text[:300]
        check(response, "application/json", body)

        # 3. Realistic bodies: the schema and the server agree on each (valid <=> 200).
        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(data=st.data())
        def realistic(data):
            if data.draw(st.booleans()):
                body, _ = json_images(data, real_images)  # NaN and infinity sent as such (not JSON: 400)
                response = session.post(
                    f"{base}/predict",
                    data=json.dumps(body).encode(),
                    timeout=30,
                    headers={"content-type": "application/json"},
                )
                assert (response.status_code == 200) == validator.is_valid(body), (response.text[:300], body)
                check(response, "application/json", body)
                return
            image = real_images[data.draw(st.integers(0, len(real_images) - 1))]
            shape = data.draw(st.sampled_from([IMAGE_SHAPE, IMAGE_SHAPE, (1, 1), (28, 27), (56, 56)]))
            mode = data.draw(st.sampled_from(["L", "L", "RGB", "P"]))
            png = bytearray(png_bytes(np.resize(image, shape), mode))
            mutated = data.draw(st.booleans())
            if mutated:
                mutate_bytes(data, png, data.draw(st.lists(st.sampled_from(BYTE_ACTIONS), min_size=1, max_size=3)))
            response = session.post(
                f"{base}/predict", data=bytes(png), headers={"content-type": "image/png"}, timeout=30
            )
            expected = pillow_reads_one_gray_image(bytes(png)) if mutated else shape == IMAGE_SHAPE and mode == "L"
            assert response.status_code == (200 if expected else 422), (response.text[:300], shape, mode, mutated)
            check(response, "image/png", bytes(png))

        realistic()
