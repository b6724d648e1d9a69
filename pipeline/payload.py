"""What a client may send to the serving endpoint, checked before it reaches the model.

JSON (``{"instances": [image, ...]}`` or ``{"image": image}``, each image 28x28 integers 0-255 or
floats in [0, 1]) or PNG bytes (one 28x28 grayscale image). Anything else is a
:class:`RequestError` whose message says what was expected and what came. Nothing here touches
the filesystem or unpickles anything: bodies are parsed as JSON or decoded as PNG in memory.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

IMAGE_SHAPE = (28, 28)
MAX_BODY_BYTES = 8 * 1024 * 1024
"""A batch of 256 images as JSON integers is about 1 MB; anything far larger is refused (413)."""
MAX_BATCH = 1024

class RequestError(ValueError):
    """A client's request is malformed; the message says what was expected and what came."""


def parse_images(payload: Any) -> np.ndarray:
    """``{"instances": [...]}`` or ``{"image": ...}`` -> float32 pixels in [0, 1], ``(n, 1, 28, 28)``."""
    if not isinstance(payload, dict) or not ({"instances", "image"} & payload.keys()):
        raise RequestError('body: expected a JSON object with "instances" (a list of images) or "image", '
                           f"found {type(payload).__name__}{' with keys ' + str(sorted(payload)) if isinstance(payload, dict) else ''}")
    images = payload["instances"] if "instances" in payload else [payload["image"]]
    if not isinstance(images, list) or not images:
        raise RequestError(f"instances: expected a non-empty list of 28x28 images, found {_describe(images)}")
    if len(images) > MAX_BATCH:
        raise RequestError(f"instances: expected at most {MAX_BATCH} images, found {len(images)}")
    try:
        array = np.asarray(images)
    except ValueError:
        array = np.empty(0, dtype=object)
    if array.dtype == object or array.shape[1:] != IMAGE_SHAPE:
        shapes = sorted({str(np.shape(img)) for img in images[:8]})
        raise RequestError(f"instances: expected images of shape 28x28, found shape(s) {', '.join(shapes)}")
    if array.dtype.kind in "iu":
        if array.min() < 0 or array.max() > 255:
            raise RequestError(f"pixels: expected integers 0-255, found values from {array.min()} to {array.max()}")
        return (array.astype(np.float32) / 255.0)[:, None]
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise RequestError(f"pixels: expected floats in [0, 1], found values from {np.nanmin(array)} to {np.nanmax(array)}")
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
            if image.size != IMAGE_SHAPE or image.mode not in ("L", "P", "1"):
                raise RequestError(f"image: expected a 28x28 grayscale PNG, found {image.size[0]}x{image.size[1]} "
                                   f"mode {image.mode}")
            pixels = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise RequestError(f"body: expected a readable PNG, found {type(exc).__name__}: {exc}") from exc
    return pixels[None, None]
