"""Reading a processed dataset back: its reference and its splits (every stage after
preprocessing reads them through here)."""

from __future__ import annotations

import numpy as np

from pipeline.data.shards import SHARDED_SPLITS, read_shards
from pipeline.errors import ReferenceNotFoundError
from pipeline.refs import ProcessedDatasetRef
from pipeline.storage import Storage

MANIFEST = "MANIFEST.json"
"""Written last into ``processed/<hash>/``: its presence marks the folder complete."""


def is_sharded(ref: ProcessedDatasetRef, split: str) -> bool:
    """Whether ``split`` is stored as litdata shards (:mod:`pipeline.data.shards`), not ``.npz``."""
    return ref.layout == "shards" and split in SHARDED_SPLITS


def load_split(ref: ProcessedDatasetRef, storage: Storage, split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images ``(n, h, w)`` (or ``(n, h, w, c)`` in colour) and labels ``(n,)`` of one
    processed split, in memory (a sharded split too: training streams those instead)."""
    if is_sharded(ref, split):
        return read_shards(ref, storage, split)
    with np.load(storage.local_path(f"processed/{ref.processed_hash}/{split}.npz")) as data:
        return data["images"], data["labels"]


def load_processed_ref(storage: Storage, digest: str) -> ProcessedDatasetRef:
    if not storage.exists(f"processed/{digest}/{MANIFEST}"):
        raise ReferenceNotFoundError("--processed", f"a processed hash under {storage.uri('processed')}", repr(digest))
    return ProcessedDatasetRef.from_dict(storage.get_json(f"processed/{digest}/{MANIFEST}"))
