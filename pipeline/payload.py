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
from typing import Any

import numpy as np

IMAGE_SHAPE = (28, 28)
MAX_BODY_BYTES = 8 * 1024 * 1024
"""Bytes a request body may have (413 beyond). 1,024 images fit as integers (about 3.6 KB each);
as full-precision floats (up to about 16 KB each) this limit binds first, at about 500."""
MAX_BATCH = 1024
# JSON literals no image holds; json.loads would turn true/false into 1/0 inside a number array.
_LITERALS = re.compile(rb"\b(true|false|null)\b")


class RequestError(ValueError):
    """A client's request is malformed; the message says what was expected and what came."""


def _reject_constant(name: str) -> float:
    raise RequestError(f"pixels: expected finite numbers, found {name}")


def load_json(body: bytes) -> Any:
    """The JSON document in ``body``; any failure to read it is a :class:`RequestError` (400)."""
    literal = _LITERALS.search(body)
    if literal:
        raise RequestError(f"pixels: expected numbers, found the JSON literal {literal.group().decode()}")
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except RequestError:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, a 5,000-digit integer, deep nesting
        raise RequestError(f"body: expected JSON, found {type(exc).__name__}: {str(exc)[:200]}") from exc


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
    if not isinstance(payload, dict) or not ({"instances", "image"} & payload.keys()):
        keys = f" with keys {sorted(payload)}" if isinstance(payload, dict) else ""
        raise RequestError('body: expected a JSON object with "instances" (a list of images) or "image", '
                           f"found {type(payload).__name__}{keys}")
    images = payload["instances"] if "instances" in payload else [payload["image"]]
    if not isinstance(images, list) or not images:
        raise RequestError(f"instances: expected a non-empty list of 28x28 images, found {_describe(images)}")
    if len(images) > MAX_BATCH:
        raise RequestError(f"instances: expected at most {MAX_BATCH} images, found {len(images)}")
    try:
        array = np.asarray(images)
    except (ValueError, TypeError, OverflowError):
        array = np.empty(0, dtype=object)
    if array.dtype == object or array.shape[1:] != IMAGE_SHAPE:
        shapes = sorted({_shape(img) for img in images[:8]})
        if shapes == ["(28, 28)"]:
            raise RequestError("pixels: expected numbers (integers 0-255 or floats 0-1), found other values "
                               "(strings, objects or integers beyond 64 bits)")
        raise RequestError(f"instances: expected images of shape (28, 28), found {', '.join(shapes)}")
    if array.dtype.kind in "iu":
        if array.min() < 0 or array.max() > 255:
            raise RequestError(f"pixels: expected integers 0-255, found values from {array.min()} to {array.max()}")
        return (array.astype(np.float32) / 255.0)[:, None]
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise RequestError("pixels: expected finite floats in [0, 1], found NaN or infinity")
        if array.min() < 0.0 or array.max() > 1.0:
            raise RequestError(f"pixels: expected floats in [0, 1], found values from {array.min()} to {array.max()}")
        return array.astype(np.float32)[:, None]
    raise RequestError(f"pixels: expected numbers (integers 0-255 or floats 0-1), found {array.dtype.kind!r} values "
                       f"such as {array.flat[0]!r}")


def _describe(value: Any) -> str:
    return f"an empty {type(value).__name__}" if value == [] else type(value).__name__


def parse_png(body: bytes) -> np.ndarray:
    """One PNG image (28x28, grayscale) -> float32 pixels in [0, 1], ``(1, 1, 28, 28)``."""
    from PIL import Image, UnidentifiedImageError

    if not body.startswith(b"\x89PNG\r\n\x1a\n"):
        raise RequestError(f"body: expected PNG bytes (image/png), found {len(body)} bytes starting {body[:8]!r}")
    try:
        with Image.open(io.BytesIO(body), formats=["PNG"]) as image:
            if image.size != IMAGE_SHAPE or image.mode not in ("L", "1"):
                raise RequestError(f"image: expected a 28x28 grayscale PNG (mode L), found {image.size[0]}x"
                                   f"{image.size[1]} mode {image.mode}")
            pixels = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    except RequestError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise RequestError(f"body: expected a readable PNG, found {type(exc).__name__}: {exc}") from exc
    return pixels[None, None]
