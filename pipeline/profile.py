"""Profile tables: what Great Expectations checks instead of raw pixels.

* :func:`profile_table`: one row per image (split, index, label, shape, pixel min/max/mean/std,
  fraction of non-zero pixels, content hash). It is also the reference for drift monitoring.
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


def profile_table(splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> pd.DataFrame:
    """One row per image of every split."""
    frames = []
    for split, (images, labels) in splits.items():
        flat = images.reshape(len(images), -1)
        pixels = flat.astype(np.float32)
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
