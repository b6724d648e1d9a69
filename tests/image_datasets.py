"""Real image datasets in the layouts teams keep, written for tests: the Fashion-MNIST cut as PNG
(or JPEG, RGB, resized) class folders, scikit-learn's digits as a CSV manifest with PNG files."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

#: Fashion-MNIST's classes as folder names ("/" cannot be in one).
FOLDERS = ["T-shirt-top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, fmt, quality=95)
    return buffer.getvalue()


def fashion_folders(root: Path, splits, rgb_size: int | None = None, fmt: str = "PNG") -> Path:
    """``train/<class>/<n>.png`` and ``test/<class>/<n>.png`` of the real images of ``splits``
    (``{"train": (x, y), "t10k": (x, y)}``); ``rgb_size``: resized to that size, in RGB."""
    from PIL import Image

    for split, (images, labels) in (("train", splits["train"]), ("test", splits["t10k"])):
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / FOLDERS[label]
            folder.mkdir(parents=True, exist_ok=True)
            pixels = image
            if rgb_size:
                gray = np.asarray(Image.fromarray(image).resize((rgb_size, rgb_size), Image.Resampling.BILINEAR))
                pixels = np.stack([gray, gray // 2, 255 - gray], axis=-1)
            (folder / f"{index:05d}.{fmt.lower()}").write_bytes(encode(pixels, fmt))
    return root


def cut(splits, train: int, test: int):
    return {"train": tuple(a[:train] for a in splits["train"]), "t10k": tuple(a[:test] for a in splits["t10k"])}


def rgb_archive(folder: Path, splits, name: str = "fashion-rgb", size: int = 32) -> Path:
    """``<folder>/<name>.tar.gz``: the images of ``splits`` as ``size``x``size`` RGB JPEGs in class
    folders under one top folder."""
    images = fashion_folders(folder / "work" / name, splits, rgb_size=size, fmt="JPEG")
    archive = folder / f"{name}.tar.gz"
    with tarfile.open(archive, "w:gz") as out:
        out.add(images, name)
    return archive


def digits_manifest(root: Path) -> Path:
    """scikit-learn's 1,797 8x8 digits as ``images/<n>.png`` and ``labels.csv`` (path,label)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    (root / "images").mkdir(parents=True)
    rows = ["path,label"]
    for index, (image, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        (root / f"images/{index:04d}.png").write_bytes(encode(image * 255 / 16))
        rows.append(f"images/{index:04d}.png,{target}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root
