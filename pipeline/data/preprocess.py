"""Preprocess: deduplicate, split and describe the data for training.

Drops exact duplicate training images and training images that also occur in the test set
(leakage), optionally caps the sample for quick runs, holds out a stratified validation split,
and computes the normalisation statistics of the training split. The ``processed_splits`` suite
checks the splits (every class in each, no duplicates, no image in two splits) before anything
is written. The result is stored under
``processed/<processed_hash>/`` where the hash covers the raw dataset's hash and the
preprocessing config, so the same inputs are processed once. Arrays stay uint8 (normalised on
the fly in training); ``MANIFEST.json`` marks the folder complete and is written last, with
:meth:`~pipeline.storage.Storage.put_folder`: a failure half-way (a full disk, an unreachable
endpoint) leaves no partial ``processed/<hash>/`` behind. A dataset whose decoded images are
over the memory budget (``memory_budget_mb``) has its training split written as litdata shards
instead, under ``shards/<hash>/train/`` and before the manifest (:mod:`pipeline.data.shards`),
for training to stream.

Returns a :class:`~pipeline.refs.ProcessedDatasetRef`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path

import numpy as np

from pipeline.config import PreprocessConfig
from pipeline.data.dataset import decoded_prefix, load_dataset
from pipeline.data.processed import MANIFEST, is_sharded
from pipeline.data.profile import image_hashes
from pipeline.data.shards import MB, SHARDED_SPLITS, chunk_bytes, decoded_bytes, shards_key, write_shards
from pipeline.refs import DatasetSpec, ProcessedDatasetRef, RawDatasetRef
from pipeline.storage import Storage, space_for

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def processed_hash(raw: RawDatasetRef, config: PreprocessConfig) -> str:
    """Of the raw data as read (:func:`~pipeline.data.dataset.decoded_prefix`: its hash and
    reading settings) and the preprocessing config."""
    return hashlib.sha256(f"{decoded_prefix(raw)}:{config.fingerprint()}".encode()).hexdigest()[:16]


def stratified_sample(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``size`` items with the class proportions of ``labels``, in sorted order."""
    if size >= len(labels):
        return np.arange(len(labels))
    picked = []
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts / len(labels) * size
    quotas = np.floor(exact).astype(int)
    # Largest remainders get the leftover places, so the sample has exactly `size` items.
    quotas[np.argsort(quotas - exact)[: size - quotas.sum()]] += 1
    for cls, quota in zip(classes, quotas, strict=True):
        members = np.flatnonzero(labels == cls)
        picked.append(rng.choice(members, size=quota, replace=False))
    return np.sort(np.concatenate(picked))


def stratified_split(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(keep, held_out) indices, holding out ``fraction`` of every class."""
    held = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        held.append(members[: max(1, round(len(members) * fraction))])
    held_out = np.sort(np.concatenate(held))
    keep = np.setdiff1d(np.arange(len(labels)), held_out)
    return rng.permutation(keep), held_out


def channel_statistics(images: np.ndarray, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Mean and standard deviation per channel, in [0, 1], of uint8 images ``(n, h, w)`` or
    ``(n, h, w, c)``: integer sums over chunks (exact, and no float copy of the split)."""
    planes = images.reshape(len(images), -1, 1 if images.ndim == 3 else images.shape[-1])
    total = np.zeros(planes.shape[-1], dtype=np.int64)
    squares = np.zeros(planes.shape[-1], dtype=np.int64)
    for start in range(0, len(planes), chunk):
        block = planes[start : start + chunk].astype(np.int64)
        total += block.sum(axis=(0, 1))
        squares += (block * block).sum(axis=(0, 1))
    count = max(1, planes.shape[0] * planes.shape[1])
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
    return [float(v) / 255.0 for v in mean], [float(v) / 255.0 for v in std]


def check_splits(arrays: dict[str, tuple[np.ndarray, np.ndarray]], spec: DatasetSpec | None = None) -> None:
    """The ``processed_splits`` suite (its bounds fitted to ``spec``) on the splits about to be
    written; raises if it fails."""
    import pandas as pd

    from pipeline.data.expectations import ephemeral_context, failure_error, load_suite, run_suite
    from pipeline.data.profile import dataset_facts

    table = pd.concat(
        pd.DataFrame({"split": split, "label": labels.astype(np.int64), "content_hash": image_hashes(images)})
        for split, (images, labels) in arrays.items()
    )
    facts = dataset_facts(table)
    result = run_suite(ephemeral_context(), load_suite("processed_splits", dataset=spec), facts, "processed_splits")
    if not result.success:
        raise failure_error("processed_splits", result, facts)


def preprocess(raw: RawDatasetRef, storage: Storage, config: PreprocessConfig) -> ProcessedDatasetRef:
    """Build (or reuse) the train/val/test splits of ``raw``."""
    digest = processed_hash(raw, config)
    prefix = f"processed/{digest}"
    if storage.exists(f"{prefix}/{MANIFEST}"):
        log.info("reusing %s", storage.uri(prefix))
        return ProcessedDatasetRef.from_dict(storage.get_json(f"{prefix}/{MANIFEST}"))

    dataset = load_dataset(raw, storage)
    (x_train, y_train), (x_test, y_test) = dataset.splits["train"], dataset.splits["test"]
    rng = np.random.default_rng(config.seed)
    removed = {"duplicates": 0, "leaked": 0}
    if config.drop_duplicates:
        train_hashes = np.array(image_hashes(x_train))
        first = np.zeros(len(train_hashes), dtype=bool)
        first[np.unique(train_hashes, return_index=True)[1]] = True
        leaked = np.isin(train_hashes, np.array(image_hashes(x_test)))
        removed = {"duplicates": int((~first).sum()), "leaked": int((first & leaked).sum())}
        keep = first & ~leaked
        x_train, y_train = x_train[keep], y_train[keep]
    if config.sample_cap:
        idx = stratified_sample(y_train, config.sample_cap, rng)
        x_train, y_train = x_train[idx], y_train[idx]
        idx = stratified_sample(y_test, config.sample_cap, rng)
        x_test, y_test = x_test[idx], y_test[idx]
    train_idx, val_idx = stratified_split(y_train, config.val_fraction, rng)
    arrays = {
        "train": (x_train[train_idx], y_train[train_idx]),
        "val": (x_train[val_idx], y_train[val_idx]),
        "test": (x_test, y_test),
    }
    check_splits(arrays, dataset.spec)
    mean, std = channel_statistics(arrays["train"][0])
    size = decoded_bytes(arrays)
    sharded = size > config.memory_budget_mb * MB
    ref = ProcessedDatasetRef(
        processed_hash=digest,
        dataset_hash=raw.dataset_hash,
        uri=storage.uri(prefix),
        counts={split: int(len(arrays[split][1])) for split in SPLITS},
        removed=removed,
        mean=mean,
        std=std,
        classes=list(dataset.spec.classes),
        image_shape=dataset.spec.shape,
        dataset_name=dataset.spec.name,
        layout="shards" if sharded else "npz",
    )
    if sharded:
        log.info(
            "%d MB decoded, over the %d MB budget: sharding %s", size // MB, config.memory_budget_mb, SHARDED_SPLITS
        )
        for split in SHARDED_SPLITS:
            write_shards(*arrays[split], storage, shards_key(digest, split), chunk_bytes(config.memory_budget_mb))
    with tempfile.TemporaryDirectory(prefix="preprocess-") as tmp:
        with space_for(tmp):
            for split, (images, labels) in arrays.items():
                if not is_sharded(ref, split):
                    np.savez(Path(tmp) / f"{split}.npz", images=images, labels=labels)
            (Path(tmp) / MANIFEST).write_text(json.dumps(ref.to_dict(), indent=2, sort_keys=True))
        # Whole or not at all: a full disk or an unreachable endpoint half-way leaves no
        # processed/<hash>/ that a later run could take for complete.
        storage.put_folder(Path(tmp), prefix, last=MANIFEST)
    log.info("processed %s: %s, removed %s", ref.uri, ref.counts, removed)
    return ref
