"""What a client may send to the serving endpoint, checked before it reaches the model.

Every image must have the served version's input shape (``input_shape`` in ``/metadata``:
channels, height, width, from the data it was trained on). JSON (``{"instances": [image, ...]}``
or ``{"image": image}``, each image ``height`` rows of ``width`` pixels, a pixel an integer 0-255
or a float in [0, 1] when grayscale, a list of ``channels`` of them in colour) or the bytes of one
PNG, JPEG or WebP image of that size (grayscale, or RGB for a 3-channel model; EXIF orientation
honoured). Anything else is a :class:`RequestError` whose message says what was expected and
what came. Nothing here touches the filesystem or unpickles anything: bodies are parsed as JSON
or decoded in memory, and an image's size is checked from its header before a pixel is decoded.
"""

from __future__ import annotations

import io
import json
import re
import struct
from typing import Any

import numpy as np
import orjson

InputShape = tuple[int, int, int]
"""``(channels, height, width)`` of the served version's images."""
IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
"""Media types of an image body, and Pillow's name of the only decoder each may use."""
MODES = {1: ("L", "1"), 3: ("RGB",)}
"""Pillow modes accepted for a model of 1 or 3 channels: no silent colour conversion (but WebP,
which has no grayscale mode, is taken as RGB by a grayscale model and converted to its luma)."""
MAX_BODY_BYTES = 8 * 1024 * 1024
"""Bytes a request body may have (413 beyond). 1,024 images fit as integers (about 3.6 KB each);
as full-precision floats (up to about 16 KB each) this limit binds first, at about 500."""
MAX_BATCH = 1024
# JSON literals no image holds; json.loads would turn true/false into 1/0 inside a number array.
_LITERALS = re.compile(r"\b(true|false|null)\b")
_NOT_IN_PIXELS = (b"true", b"false", b"null", b"\x00")
"""Bytes whose presence sends a body down the careful path of :func:`load_json`."""
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SIGNATURES = {"PNG": (PNG_SIGNATURE,), "JPEG": (b"\xff\xd8\xff",), "WEBP": (b"RIFF",)}


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

    A body without a BOM, NUL or a literal's letters is parsed by orjson (20 times faster than
    ``json``: 17 µs for an image of 784 floats); if orjson refuses it, the careful path below
    reads it again to say what is wrong. (orjson reads an integer beyond 64 bits as a float,
    which the pixel checks then refuse as out of range.)
    """
    if not body.startswith(b"\xef\xbb\xbf") and not any(token in body for token in _NOT_IN_PIXELS):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
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


def json_shape(shape: InputShape) -> tuple[int, ...]:
    """The nesting of one image in JSON: ``(height, width)`` in grayscale, ``(height, width,
    channels)`` in colour (rows of pixels, as images are written everywhere else)."""
    channels, height, width = shape
    return (height, width) if channels == 1 else (height, width, channels)


def describe(shape: InputShape) -> str:
    """``28x28 grayscale`` or ``32x32 RGB`` (width x height)."""
    channels, height, width = shape
    return f"{width}x{height} " + {1: "grayscale", 3: "RGB"}.get(channels, f"{channels}-channel")


def parse_images(payload: Any, shape: InputShape) -> np.ndarray:
    """``{"instances": [...]}`` or ``{"image": ...}`` -> float32 pixels in [0, 1], ``(n, *shape)``.

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
        raise RequestError(
            f"instances: expected a non-empty list of {describe(shape)} images, found {_describe(images)}"
        )
    if len(images) > MAX_BATCH:
        raise RequestError(f"instances: expected at most {MAX_BATCH} images, found {len(images)}")
    pixels = np.empty((len(images), *shape), dtype=np.float32)
    nesting = json_shape(shape)
    for index, image in enumerate(images):
        plane = _image_pixels(image, f"instances[{index}]" if "instances" in payload else "image", nesting)
        pixels[index] = plane[None] if plane.ndim == 2 else plane.transpose(2, 0, 1)  # rows of pixels -> planes
    return pixels


def _image_pixels(image: Any, where: str, nesting: tuple[int, ...]) -> np.ndarray:
    """One image's nested lists -> float32 in [0, 1]: integers are 0-255, floats 0-1, and an image
    whose values are all integral (200.0 is an integer to JSON Schema and JavaScript) is 0-255."""
    try:
        array = np.asarray(image)
    except (ValueError, TypeError, OverflowError):
        array = np.empty(0, dtype=object)
    if array.dtype == object or array.shape != nesting:
        if _shape(image) == str(nesting):
            raise RequestError(
                f"{where}: expected numbers (integers 0-255 or floats 0-1), found other values "
                "(strings, objects or integers beyond 64 bits)"
            )
        raise RequestError(f"{where}: expected images of shape {nesting}, found {_shape(image)}")
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


def parse_image_file(kind: str, body: bytes, shape: InputShape) -> np.ndarray:
    """The bytes of one PNG, JPEG or WebP image (media type ``kind``) of ``shape`` -> float32
    pixels in [0, 1], ``(1, *shape)``.

    Only the decoder of the declared type runs. The size is read from the header before any pixel
    is decoded, so a header that declares a huge image (a decompression bomb) costs nothing; a
    grayscale model takes mode L (or 1-bit), an RGB model mode RGB, nothing converted silently;
    whatever else the decoder raises on hostile bytes is the client's error (422), never ours.
    """
    from PIL import Image, ImageOps

    fmt = IMAGE_TYPES[kind]
    channels, height, width = shape
    wanted = f"a {describe(shape)} {fmt}"
    if not body.startswith(_SIGNATURES[fmt]) or (fmt == "WEBP" and body[8:12] != b"WEBP"):
        raise RequestError(f"body: expected {fmt} bytes ({kind}), found {len(body)} bytes starting {body[:8]!r}")
    if fmt == "PNG":
        if len(body) < 33 or body[12:16] != b"IHDR":
            raise RequestError(f"body: expected a readable PNG (IHDR first), found {len(body)} bytes without one")
        declared = struct.unpack(">II", body[16:24])
        if sorted(declared) != sorted((width, height)):
            raise RequestError(f"image: expected {wanted}, found {declared[0]}x{declared[1]}")
    try:
        with Image.open(io.BytesIO(body), formats=[fmt]) as image:
            # Before load(): the header's size (either way round, as EXIF orientation may turn it).
            modes = MODES.get(channels, ()) + (("RGB",) if fmt == "WEBP" and channels == 1 else ())
            if sorted(image.size) != sorted((width, height)) or image.mode not in modes:
                raise RequestError(f"image: expected {wanted}, found {image.size[0]}x{image.size[1]} mode {image.mode}")
            upright = ImageOps.exif_transpose(image)
            if upright.size != (width, height):
                raise RequestError(
                    f"image: expected {wanted}, found {upright.size[0]}x{upright.size[1]} once turned upright (EXIF)"
                )
            pixels = np.asarray(upright.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    except RequestError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, struct.error, EOFError... on bad bytes
        text = str(exc).splitlines()[0][:200] if str(exc).strip() else ""
        raise RequestError(f"body: expected a readable {fmt}, found {type(exc).__name__}: {text}") from None
    planes = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    if planes.shape != shape:
        raise RequestError(f"image: expected {shape} pixels, found {planes.shape}")
    return np.ascontiguousarray(planes)[None]


def parse_png(body: bytes, shape: InputShape) -> np.ndarray:
    """One PNG image of ``shape`` -> float32 pixels in [0, 1], ``(1, *shape)``."""
    return parse_image_file("image/png", body, shape)


def request_schema(shape: InputShape) -> dict[str, Any]:
    """The JSON Schema of a JSON ``/predict`` body: exactly what :func:`parse_images` accepts for
    ``shape`` (within the :data:`MAX_BODY_BYTES` that the server checks first)."""
    channels, height, width = shape

    def image(pixel: dict[str, Any], title: str) -> dict[str, Any]:
        if channels > 1:
            pixel = {"type": "array", "items": pixel, "minItems": channels, "maxItems": channels}
        row = {"type": "array", "items": pixel, "minItems": width, "maxItems": width}
        return {"title": title, "type": "array", "items": row, "minItems": height, "maxItems": height}

    pixel_text = "pixels" if channels == 1 else f"pixels of {channels} channels"
    one_image = {
        "description": f"{height} rows of {width} {pixel_text}: all integers 0-255, or all numbers in [0, 1].",
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


def image_schema(kind: str, shape: InputShape) -> dict[str, Any]:
    """The schema of an image body (``kind`` one of :data:`IMAGE_TYPES`) for ``shape``."""
    webp_gray = ("RGB",) if kind == "image/webp" and shape[0] == 1 else ()
    modes = " or ".join(MODES.get(shape[0], ("none",)) + webp_gray)
    return {
        "type": "string",
        "format": "binary",
        "minLength": 33 if kind == "image/png" else 3,
        "maxLength": MAX_BODY_BYTES,
        "description": f"One {describe(shape)} {IMAGE_TYPES[kind]} image (Pillow mode {modes}), at most "
        f"{MAX_BODY_BYTES} bytes; any other size or mode gets 422.",
    }
