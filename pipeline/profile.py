"""Profile tables: what Great Expectations checks instead of raw pixels.

* :func:`profile_table`: one row per image (split, index, label, shape, pixel min/max/mean/std,
  fraction of non-zero pixels, height and width of the object's bounding box, content hash).
  It is also the reference for drift monitoring.
* :func:`dataset_facts`: one row per split with the dataset-level facts (class balance, exact
  duplicates, overlap between train and test).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd


def image_hashes(images: np.ndarray) -> list[str]:
    """A content hash per image (16 hex digits of sha256 over its bytes)."""
    flat = np.ascontiguousarray(images).reshape(len(images), -1)
    return [hashlib.sha256(row.tobytes()).hexdigest()[:16] for row in flat]


#: A pixel brighter than this belongs to the object (Fashion-MNIST backgrounds are 0).
OBJECT_THRESHOLD = 16


def bounding_box(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Height and width (pixels) of the box around each image's object; 0 for an empty image.

    Orientation-sensitive where pixel statistics are not: a 90-degree rotation swaps them."""
    mask = images > OBJECT_THRESHOLD
    sizes = []
    for axis in (2, 1):  # rows that hold object pixels, then columns
        present = mask.any(axis=axis)
        first = present.argmax(axis=1)
        last = present.shape[1] - 1 - present[:, ::-1].argmax(axis=1)
        sizes.append(np.where(present.any(axis=1), last - first + 1, 0))
    return sizes[0], sizes[1]


def profile_table(splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> pd.DataFrame:
    """One row per image of every split."""
    frames = []
    for split, (images, labels) in splits.items():
        flat = images.reshape(len(images), -1)
        pixels = flat.astype(np.float32)
        bbox_height, bbox_width = bounding_box(images)
        frames.append(
            pd.DataFrame(
                {
                    "split": split,
                    "index": np.arange(len(images)),
                    "label": labels.astype(np.int64),
                    "height": images.shape[1],
                    "width": images.shape[2],
                    "pixel_min": flat.min(axis=1).astype(np.int64),
                    "pixel_max": flat.max(axis=1).astype(np.int64),
                    "pixel_mean": pixels.mean(axis=1),
                    "pixel_std": pixels.std(axis=1),
                    "nonzero_fraction": (flat > 0).mean(axis=1),
                    "bbox_height": bbox_height,
                    "bbox_width": bbox_width,
                    "content_hash": image_hashes(images),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def dataset_facts(profile: pd.DataFrame) -> pd.DataFrame:
    """One row per split: size, class balance, duplicates, and overlap with the other splits."""
    rows = []
    for split, part in profile.groupby("split", sort=False):
        others = set(profile.loc[profile["split"] != split, "content_hash"])
        fractions = part["label"].value_counts(normalize=True)
        rows.append(
            {
                "split": split,
                "n_samples": len(part),
                "n_classes": int(part["label"].nunique()),
                "min_class_fraction": float(fractions.min()),
                "max_class_fraction": float(fractions.max()),
                "duplicate_fraction": float(part["content_hash"].duplicated().mean()),
                "overlap_fraction": float(part["content_hash"].isin(others).mean()),
            }
        )
    return pd.DataFrame(rows)
