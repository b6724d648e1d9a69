"""Every kind of ``POST /predict`` body, by media type, and the one function that turns any of
them into pixels: JSON (:mod:`pipeline.serving.payload`), an image file (PNG, JPEG, WebP) and the
binary arrays (:mod:`pipeline.serving.arrays`)."""

from __future__ import annotations

import numpy as np

from pipeline.serving.arrays import ARRAY_TYPES, NPY, parse_npy, parse_raw
from pipeline.serving.payload import IMAGE_TYPES, InputShape, load_json, parse_image_file, parse_images

JSON = "application/json"
MEDIA_TYPES = (JSON, *IMAGE_TYPES, *ARRAY_TYPES)
"""What ``/predict`` takes (415 for anything else; no ``Content-Type`` is JSON)."""
PARSED_INLINE = frozenset(ARRAY_TYPES)
"""Kinds decoded on the event loop whatever their size: no number is parsed (a copy, at most a
few milliseconds for the largest body)."""


def decode_body(kind: str, body: bytes, shape: InputShape, declared_shape: str | None = None) -> np.ndarray:
    """A request body of media type ``kind`` -> float32 pixels in [0, 1], ``(n, *shape)``;
    ``declared_shape`` is a raw body's ``X-Image-Shape`` header.

    A plain function of bytes, so that the server can run it in a worker process for big bodies.
    """
    if kind in IMAGE_TYPES:
        return parse_image_file(kind, body, shape)
    if kind == NPY:
        return parse_npy(body, shape)
    if kind in ARRAY_TYPES:
        return parse_raw(body, shape, declared_shape)
    return parse_images(load_json(body), shape)
