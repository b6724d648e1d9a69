"""Binary request bodies: pixel arrays as NumPy ``.npy`` bytes or as raw uint8 bytes.

The cheapest way to send images: no number is parsed, the bytes become the array. Both carry
one image ``(channels, height, width)`` or a batch ``(n, channels, height, width)`` in the served
version's input shape, channels first, as the model takes them (a grayscale image may leave the
channel out: ``(height, width)`` or ``(n, height, width)``).

* ``application/x-npy``: what ``numpy.save`` writes, format 1.0 or 2.0, of dtype ``uint8``
  (0-255), ``float32`` or ``float64`` (0-1), little-endian, C order. The header is read as text
  by NumPy's own header parser (``ast.literal_eval`` of a dict, bounded in size), never
  ``numpy.load``: nothing is unpickled, and the byte count is checked against the header before
  a pixel is read.
* ``application/octet-stream``: uint8 pixels, C order. The ``X-Image-Shape`` header
  (``1,28,28`` or ``16,1,28,28``) states the shape, and the body must have exactly that many
  bytes; without it, the body must be a whole number of images.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

from pipeline.serving.payload import MAX_BATCH, MAX_BODY_BYTES, InputShape, RequestError, describe

NPY = "application/x-npy"
RAW = "application/octet-stream"
ARRAY_TYPES = (NPY, RAW)
SHAPE_HEADER = "x-image-shape"
"""The header that gives a raw body's shape (``X-Image-Shape: 16,1,28,28``)."""
NPY_DTYPES = {"|u1": "uint8", "<f4": "float32", "<f8": "float64"}
"""``.npy`` element types accepted (the header's ``descr``), and their names."""
MAX_NPY_HEADER = 1024
"""Bytes an ``.npy`` header may have (``numpy.save`` writes 128 for any array taken here)."""


def _batch(dims: tuple[int, ...], shape: InputShape, where: str) -> int:
    """How many images an array of ``dims`` holds for ``shape``, or a :class:`RequestError`."""
    channels = shape[0]
    forms = [shape, (-1, *shape)] + ([shape[1:], (-1, *shape[1:])] if channels == 1 else [])
    for form in forms:
        if len(dims) == len(form) and all(want in (-1, got) for want, got in zip(form, dims, strict=True)):
            n = dims[0] if form[0] == -1 else 1
            if not 1 <= n <= MAX_BATCH:
                raise RequestError(f"{where}: expected 1 to {MAX_BATCH} images, found {n}")
            return n
    wanted = f"{shape} or (n, {', '.join(map(str, shape))})"
    raise RequestError(f"{where}: expected {describe(shape)} images of shape {wanted}, channels first, found {dims}")


def _pixels(array: np.ndarray, n: int, shape: InputShape, where: str) -> np.ndarray:
    """uint8 0-255 or floats 0-1 -> float32 in [0, 1], ``(n, *shape)``."""
    if array.dtype == np.uint8:
        return (array.astype(np.float32) * np.float32(1 / 255)).reshape(n, *shape)
    if not np.isfinite(array).all():
        raise RequestError(f"{where}: expected finite floats in [0, 1], found NaN or infinity")
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        raise RequestError(f"{where}: expected floats in [0, 1] (or uint8 0-255), found values from {low} to {high}")
    return array.astype(np.float32, copy=False).reshape(n, *shape)


def parse_npy(body: bytes, shape: InputShape) -> np.ndarray:
    """An ``.npy`` body -> float32 pixels in [0, 1], ``(n, *shape)``."""
    stream = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(stream)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"format {version[0]}.{version[1]} (1.0 or 2.0 expected)")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        dims, fortran, dtype = read_header(stream, max_header_size=MAX_NPY_HEADER)
    except Exception as exc:  # noqa: BLE001 - NumPy raises ValueError, SyntaxError, EOFError... on bad headers
        text = str(exc).splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise RequestError(f"body: expected .npy bytes (application/x-npy), found {len(body)} bytes: {text}") from None
    descr = dtype.str if dtype.fields is None else repr(dtype.descr)  # '|O' for objects, never read
    if descr not in NPY_DTYPES:
        raise RequestError(
            f"body: expected an .npy array of dtype {', '.join(NPY_DTYPES.values())} (little-endian), found {descr}"
        )
    if fortran and len(dims) > 1:
        raise RequestError("body: expected an .npy array in C order, found Fortran order")
    n = _batch(tuple(dims), shape, "body")
    offset = stream.tell()
    expected = math.prod(dims) * dtype.itemsize
    if len(body) - offset != expected:
        raise RequestError(
            f"body: expected {expected} bytes of pixels after the .npy header for shape {tuple(dims)}, "
            f"found {len(body) - offset}"
        )
    return _pixels(np.frombuffer(body, dtype=dtype, offset=offset), n, shape, "pixels")


def parse_raw(body: bytes, shape: InputShape, declared: str | None) -> np.ndarray:
    """uint8 bytes of the shape ``declared`` (the ``X-Image-Shape`` header) -> float32 pixels in
    [0, 1], ``(n, *shape)``."""
    example = ",".join(map(str, shape))
    if not declared:
        size = math.prod(shape)
        if not body or len(body) % size:
            raise RequestError(
                f"body: expected a whole number of {describe(shape)} uint8 images ({size} bytes each), found "
                f"{len(body)} bytes; X-Image-Shape (e.g. 16,{example}) states a batch's shape"
            )
        declared = f"{len(body) // size},{example}"
    try:
        dims = tuple(int(part) for part in declared.split(","))
    except ValueError:
        raise RequestError(
            f"X-Image-Shape: expected integers separated by commas, e.g. {example}, found {declared[:100]!r}"
        ) from None
    n = _batch(dims, shape, "X-Image-Shape")
    expected = math.prod(dims)
    if len(body) != expected:
        raise RequestError(
            f"body: expected {expected} bytes of uint8 pixels for X-Image-Shape {declared}, found {len(body)}"
        )
    return _pixels(np.frombuffer(body, dtype=np.uint8), n, shape, "pixels")


def array_schema(kind: str, shape: InputShape) -> dict[str, Any]:
    """The OpenAPI schema of a binary body (``kind`` one of :data:`ARRAY_TYPES`) for ``shape``."""
    dims = ", ".join(map(str, shape))
    what = (
        f"numpy.save bytes of a uint8 (0-255), float32 or float64 (0-1) array of shape ({dims}) or (n, {dims})"
        if kind == NPY
        else f"uint8 pixels (0-255) of shape ({dims}) or (n, {dims}), C order; the X-Image-Shape header (e.g. "
        f"16,{','.join(map(str, shape))}) may state the shape, which the byte count must then match"
    )
    return {
        "type": "string",
        "format": "binary",
        "maxLength": MAX_BODY_BYTES,
        "description": f"{what}, channels first, n from 1 to {MAX_BATCH}.",
    }
