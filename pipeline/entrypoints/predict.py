"""``pipeline predict``: classify image files with a version's ONNX or INT8 variant, offline.

The edge package: this imports ``onnxruntime``, ``numpy`` and ``pillow`` and nothing else that
is heavy (no torch, no MLflow, no Airflow), so it runs on a device that has only those. Its
input is what export stored with the version's run (``onnx/`` among the run's artifacts): a
model file, ``model.onnx`` or ``model.int8.onnx``, with the ``signature.json`` beside it (the
image shape and the class names). Images are files or folders of them (PNG, JPEG, BMP, GIF,
TIFF, WebP; folders searched recursively, in name order), decoded to the model's channels; an
image of another size is refused with one line naming it, never resized behind the user's back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import BadImageError, ReferenceNotFoundError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
SIGNATURE = "signature.json"


def read_signature(model: Path) -> dict[str, Any]:
    """The ``signature.json`` beside ``model``: input shape and class names."""
    path = model.parent / SIGNATURE
    try:
        signature = json.loads(path.read_text())
        _, channels, height, width = signature["inputs"][0]["shape"]
        classes = list(signature["classes"])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise ReferenceNotFoundError(
            str(path), "the signature.json that export stores beside the model", type(exc).__name__
        ) from None
    return {"shape": (int(channels), int(height), int(width)), "classes": classes}


def image_files(paths: list[Path]) -> list[Path]:
    """The image files named, and those under the folders named."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise ReferenceNotFoundError(str(path), "an image file or a folder of them", "nothing there")
    if not found:
        raise ReferenceNotFoundError(", ".join(map(str, paths)), "image files", "none")
    return found


def read_image(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """uint8 pixels ``(h, w)`` (one channel) or ``(h, w, 3)`` of the image file ``path``."""
    from PIL import Image, UnidentifiedImageError

    channels, height, width = shape
    try:
        with Image.open(path) as image:
            image.load()
            size = image.size
            pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise BadImageError(str(path), "an image file the model can read", f"{type(exc).__name__}: {exc}") from None
    if size != (width, height):
        raise BadImageError(str(path), f"a {width}x{height} image (the model's input)", f"{size[0]}x{size[1]}")
    return pixels


def predict_files(model: Path, paths: list[Path], batch_size: int = 256) -> dict[str, Any]:
    """Each image's class and probability under ``model`` (an exported ``.onnx`` file)."""
    from pipeline.models.onnx_runtime import OnnxClassifier

    if not model.is_file():
        raise ReferenceNotFoundError(str(model), "an ONNX model file (model.onnx or model.int8.onnx)", "nothing there")
    signature = read_signature(model)
    files = image_files(paths)
    classifier = OnnxClassifier(model)
    predictions = []
    for start in range(0, len(files), batch_size):
        batch = files[start : start + batch_size]
        images = np.stack([read_image(path, signature["shape"]) for path in batch])
        for path, probabilities in zip(batch, classifier.predict_probabilities(images), strict=True):
            class_id = int(probabilities.argmax())
            predictions.append(
                {
                    "file": str(path),
                    "class_id": class_id,
                    "class_name": signature["classes"][class_id],
                    "probability": float(probabilities[class_id]),
                }
            )
    return {"model": str(model), "predictions": predictions}
