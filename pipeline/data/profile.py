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
    if mask.ndim == 4:  # colour: a pixel is the object's when any channel is
        mask = np.asarray(mask.any(axis=3))
    sizes = []
    for axis in (2, 1):  # rows that hold object pixels, then columns
        present = np.asarray(mask.any(axis=axis))
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


#: Two images are near-duplicates when their 7x7 average-pooled versions differ by less than this
#: root-mean-square (0-255 scale). A copy with +-8 grey levels of noise lands within 2.2; on the
#: real files, 0.09% of test images (9 of 10,000) have a training image this close.
NEAR_DUPLICATE_RADIUS = 3.0


def pool_factor(height: int, width: int) -> int:
    """4x4 average pooling for images of 16 pixels a side or more (28 -> 7: a small shift or noise
    stays close), none below (8x8 digits pooled to 2x2 would all look alike); 0: the size does
    not divide, no near-duplicate search."""
    if min(height, width) < 16:
        return 1
    return 4 if height % 4 == 0 and width % 4 == 0 else 0


def _pooled(images: np.ndarray) -> np.ndarray:
    """Each image average-pooled (each colour channel on its own), as one row of floats."""
    n, rows, cols = images.shape[:3]
    f = pool_factor(rows, cols)
    planes = images.reshape(n, rows // f, f, cols // f, f, -1)
    return planes.astype(np.float32).mean(axis=(2, 4)).reshape(n, -1)


def near_duplicates(
    a: np.ndarray, b: np.ndarray, radius: float = NEAR_DUPLICATE_RADIUS
) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the images of ``a`` with a near-duplicate in ``b``, and of ``b`` with one in ``a``.

    Exact nearest neighbours on downsampled images, in chunks through one matrix product each
    (about 2.5 s for 10,000 against 60,000 on 2 cores)."""
    if a.shape[1:] != b.shape[1:] or not pool_factor(a.shape[1], a.shape[2]):
        return np.zeros(len(a), bool), np.zeros(len(b), bool)
    pa, pb = _pooled(a), _pooled(b)
    norm_b = (pb * pb).sum(axis=1)
    limit = radius * radius * pa.shape[1]
    in_a, in_b = np.zeros(len(a), bool), np.zeros(len(b), bool)
    for start in range(0, len(pa), 512):
        chunk = pa[start : start + 512]
        close = (chunk * chunk).sum(axis=1)[:, None] + norm_b[None, :] - 2.0 * chunk @ pb.T < limit
        in_a[start : start + 512] = close.any(axis=1)
        in_b |= close.any(axis=0)
    return in_a, in_b


def near_duplicate_fraction(images: np.ndarray, sample: int = 2000, radius: float = NEAR_DUPLICATE_RADIUS) -> float:
    """Estimated share of a split's images that have a near-duplicate (or a duplicate) elsewhere
    in the same split, from a fixed random sample of ``sample`` images against all of them.

    An exact search of 60,000 against 60,000 would cost about 13 s; the sample keeps it near 1 s
    with a standard error of 0.3 points at a 2% share. The real files: 0.08% (train), 0.02% (test)."""
    if len(images) < 2 or not pool_factor(images.shape[1], images.shape[2]):
        return 0.0
    picked = np.sort(np.random.default_rng(0).choice(len(images), min(sample, len(images)), replace=False))
    everything = _pooled(images)
    norms = (everything * everything).sum(axis=1)
    limit = radius * radius * everything.shape[1]
    found = 0
    for start in range(0, len(picked), 512):
        rows = picked[start : start + 512]
        distances = norms[rows][:, None] + norms[None, :] - 2.0 * everything[rows] @ everything.T
        distances[np.arange(len(rows)), rows] = np.inf  # an image is not its own duplicate
        found += int((distances < limit).any(axis=1).sum())
    return found / len(picked)


def dataset_facts(profile: pd.DataFrame, extra: dict[str, dict[str, float]] | None = None) -> pd.DataFrame:
    """One row per split: size, class balance, duplicates, and overlap with the other splits.

    ``extra`` adds columns per split, such as ``near_overlap_fraction`` (share of the split's
    images with a near-duplicate in another split, :func:`near_duplicates`) and
    ``near_duplicate_fraction`` (:func:`near_duplicate_fraction`)."""
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
                **(extra or {}).get(split, {}),
            }
        )
    return pd.DataFrame(rows)
