"""What a client may send to the serving endpoint, checked before it reaches the model.

JSON (``{"instances": [image, ...]}`` or ``{"image": image}``, each image 28x28 integers 0-255 or
floats in [0, 1]) or PNG bytes (one 28x28 grayscale image). Anything else is a
:class:`RequestError` whose message says what was expected and what came. Nothing here touches
the filesystem or unpickles anything: bodies are parsed as JSON or decoded as PNG in memory.
"""

from __future__ import annotations

import io
import json
import re
import struct
from typing import Any

import numpy as np

IMAGE_SHAPE = (28, 28)
"""Height and width of every image a request may hold (the JSON schema and the PNG check use it)."""
MAX_BODY_BYTES = 8 * 1024 * 1024
"""Bytes a request body may have (413 beyond). 1,024 images fit as integers (about 3.6 KB each);
as full-precision floats (up to about 16 KB each) this limit binds first, at about 500."""
MAX_BATCH = 1024
# JSON literals no image holds; json.loads would turn true/false into 1/0 inside a number array.
_LITERALS = re.compile(r"\b(true|false|null)\b")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class RequestError(ValueError):
    """A client's request is malformed; the message says what was expected and what came."""

    status = 422


class NotJSONError(RequestError):
    """The body is not a UTF-8 JSON document at all."""

    status = 400


def _reject_constant(name: str) -> float:
    raise RequestError(f"pixels: expected finite numbers, found {name}")


def load_json(body: bytes) -> Any:
    """The JSON document in ``body``; any failure to read it is a :class:`NotJSONError` (400).

    JSON must be UTF-8 (RFC 8259): ``json.loads`` would also read UTF-16 and UTF-32 bytes, which
    the literal check below, made on the text, must not be bypassed by.
    """
    if body.startswith(b"\xef\xbb\xbf"):
        raise NotJSONError("body: expected UTF-8 JSON without a byte order mark, found a UTF-8 BOM")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NotJSONError(
            f"body: expected UTF-8 JSON, found a byte that is not UTF-8 at offset {exc.start} "
            f"({body[exc.start : exc.start + 1]!r})"
        ) from None
    if "\x00" in text:
        raise NotJSONError("body: expected UTF-8 JSON, found NUL characters (UTF-16 or UTF-32?)")
    literal = _LITERALS.search(text)
    if literal:
        raise NotJSONError(f"pixels: expected numbers, found the JSON literal {literal.group()}")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RequestError as exc:
        raise NotJSONError(str(exc)) from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, a 5,000-digit integer, deep nesting
        raise NotJSONError(f"body: expected JSON, found {type(exc).__name__}: {str(exc)[:200]}") from None


def _shape(value: Any, depth: int = 0) -> str:
    """A list nesting's shape, e.g. ``(27, 28)``, or where it stops being rectangular."""
    if not isinstance(value, list):
        return "()" if depth else type(value).__name__
    lengths = {len(item) if isinstance(item, list) else -1 for item in value}
    if len(lengths) > 1:
        return f"({len(value)}, rows of {sorted(n for n in lengths if n >= 0) or 'no'} lengths)"
    inner = _shape(value[0], depth + 1) if value and depth < 3 else "()"
    return f"({len(value)}{', ' + inner[1:-1] if inner not in ('()', '') else ''})"


def parse_images(payload: Any) -> np.ndarray:
    """``{"instances": [...]}`` or ``{"image": ...}`` -> float32 pixels in [0, 1], ``(n, 1, 28, 28)``.

    JSON integers are read as 0-255, JSON floats as 0-1 (an image of all-integral values written
    as integers, as JavaScript does, is therefore 0-255).
    """
    if not isinstance(payload, dict) or len(payload) != 1 or not ({"instances", "image"} & payload.keys()):
        keys = f" with keys {sorted(payload)[:8]}" if isinstance(payload, dict) else ""
        raise RequestError(
            'body: expected a JSON object with one key, "instances" (a list of images) or "image", '
            f"found {type(payload).__name__}{keys}"
        )
    images = payload["instances"] if "instances" in payload else [payload["image"]]
    if not isinstance(images, list) or not images:
        raise RequestError(f"instances: expected a non-empty list of 28x28 images, found {_describe(images)}")
    if len(images) > MAX_BATCH:
        raise RequestError(f"instances: expected at most {MAX_BATCH} images, found {len(images)}")
    pixels = np.empty((len(images), 1, *IMAGE_SHAPE), dtype=np.float32)
    for index, image in enumerate(images):
        pixels[index, 0] = _image_pixels(image, f"instances[{index}]" if "instances" in payload else "image")
    return pixels


def _image_pixels(image: Any, where: str) -> np.ndarray:
    """One image's nested lists -> float32 in [0, 1]: integers are 0-255, floats 0-1, and an image
    whose values are all integral (200.0 is an integer to JSON Schema and JavaScript) is 0-255."""
    try:
        array = np.asarray(image)
    except (ValueError, TypeError, OverflowError):
        array = np.empty(0, dtype=object)
    if array.dtype == object or array.shape != IMAGE_SHAPE:
        if _shape(image) == str(IMAGE_SHAPE):
            raise RequestError(
                f"{where}: expected numbers (integers 0-255 or floats 0-1), found other values "
                "(strings, objects or integers beyond 64 bits)"
            )
        raise RequestError(f"{where}: expected images of shape {IMAGE_SHAPE}, found {_shape(image)}")
    if array.dtype.kind in "iu":
        if array.min() < 0 or array.max() > 255:
            raise RequestError(f"{where}: expected integers 0-255, found values from {array.min()} to {array.max()}")
        return array.astype(np.float32) / 255.0
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise RequestError(f"{where}: expected finite floats in [0, 1], found NaN or infinity")
        if array.min() < 0.0 or array.max() > 1.0:
            if array.min() >= 0.0 and array.max() <= 255.0 and (array == np.round(array)).all():
                return array.astype(np.float32) / 255.0
            raise RequestError(
                f"{where}: expected floats in [0, 1] (or integers 0-255), found values from "
                f"{array.min()} to {array.max()}"
            )
        return array.astype(np.float32)
    raise RequestError(
        f"{where}: expected numbers (integers 0-255 or floats 0-1), found {array.dtype.kind!r} values "
        f"such as {array.flat[0]!r}"
    )


def _describe(value: Any) -> str:
    return f"an empty {type(value).__name__}" if value == [] else type(value).__name__


def parse_png(body: bytes) -> np.ndarray:
    """One PNG image (28x28, grayscale) -> float32 pixels in [0, 1], ``(1, 1, 28, 28)``.

    The size is read from the IHDR chunk before Pillow sees the bytes, so a header that declares
    a huge image (a decompression bomb) costs nothing; whatever else the decoder raises on hostile
    bytes is the client's error (422), never ours.
    """
    from PIL import Image

    if not body.startswith(PNG_SIGNATURE):
        raise RequestError(f"body: expected PNG bytes (image/png), found {len(body)} bytes starting {body[:8]!r}")
    if len(body) < 33 or body[12:16] != b"IHDR":
        raise RequestError(f"body: expected a readable PNG (IHDR first), found {len(body)} bytes without one")
    width, height = struct.unpack(">II", body[16:24])
    if (height, width) != IMAGE_SHAPE:
        raise RequestError(f"image: expected a {IMAGE_SHAPE[1]}x{IMAGE_SHAPE[0]} grayscale PNG, found {width}x{height}")
    try:
        with Image.open(io.BytesIO(body), formats=["PNG"]) as image:
            if image.size != IMAGE_SHAPE[::-1] or image.mode not in ("L", "1"):
                raise RequestError(
                    f"image: expected a {IMAGE_SHAPE[1]}x{IMAGE_SHAPE[0]} grayscale PNG (mode L), found "
                    f"{image.size[0]}x{image.size[1]} mode {image.mode}"
                )
            pixels = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    except RequestError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, struct.error, EOFError... on bad bytes
        text = str(exc).splitlines()[0][:200] if str(exc).strip() else ""
        raise RequestError(f"body: expected a readable PNG, found {type(exc).__name__}: {text}") from None
    if pixels.shape != IMAGE_SHAPE:
        raise RequestError(f"image: expected {IMAGE_SHAPE} pixels, found {pixels.shape}")
    return pixels[None, None]


def decode_body(kind: str, body: bytes) -> np.ndarray:
    """A request body of media type ``kind`` (``image/png`` or JSON) -> pixels ``(n, 1, 28, 28)``.

    A plain function of bytes, so that the server can run it in a worker process for big bodies.
    """
    return parse_png(body) if kind == "image/png" else parse_images(load_json(body))


def request_schema() -> dict[str, Any]:
    """The JSON Schema of a JSON ``/predict`` body: exactly what :func:`parse_images` accepts
    (within the :data:`MAX_BODY_BYTES` that the server checks first)."""
    height, width = IMAGE_SHAPE

    def image(pixel: dict[str, Any], title: str) -> dict[str, Any]:
        row = {"type": "array", "items": pixel, "minItems": width, "maxItems": width}
        return {"title": title, "type": "array", "items": row, "minItems": height, "maxItems": height}

    one_image = {
        "description": f"{height} rows of {width} pixels: all integers 0-255, or all numbers in [0, 1].",
        "anyOf": [
            image({"type": "integer", "minimum": 0, "maximum": 255}, "Integers 0-255"),
            image({"type": "number", "minimum": 0, "maximum": 1}, "Numbers in [0, 1]"),
        ],
    }
    batch = {
        "type": "array",
        "items": one_image,
        "minItems": 1,
        "maxItems": MAX_BATCH,
        "description": f"1 to {MAX_BATCH} images (and at most {MAX_BODY_BYTES} bytes of JSON).",
    }
    return {
        "title": "PredictRequest",
        "description": 'Exactly one of "instances" (a batch) and "image" (one image). UTF-8 JSON; true, false and '
        "null appear nowhere.",
        "oneOf": [
            {
                "type": "object",
                "properties": {"instances": batch},
                "required": ["instances"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {"image": one_image},
                "required": ["image"],
                "additionalProperties": False,
            },
        ],
    }


def png_schema() -> dict[str, Any]:
    """The schema of an ``image/png`` ``/predict`` body."""
    height, width = IMAGE_SHAPE
    return {
        "type": "string",
        "format": "binary",
        "minLength": 33,
        "maxLength": MAX_BODY_BYTES,
        "description": f"One {width}x{height} grayscale PNG (color type 0: mode L or 1-bit), at most "
        f"{MAX_BODY_BYTES} bytes; any other size or color type gets 422.",
    }
