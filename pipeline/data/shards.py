"""The training split of a dataset over the memory budget, as litdata shards.

A dataset whose decoded images take more than
:attr:`~pipeline.config.PreprocessConfig.memory_budget_mb` has its training split written with
``litdata.optimize`` as chunks of ``(image, label)`` items (uint8 arrays as decoded, int labels)
plus litdata's ``index.json``, under ``shards/<processed_hash>/train/``, beside the
``processed/<processed_hash>/`` folder that holds the other splits and the manifest. The chunks
are written into a local folder and put into storage whole (``index.json`` last), before the
manifest that marks the processed dataset complete.

Training reads them with :func:`streaming_dataset`: a ``litdata.StreamingDataset`` that fetches
chunks as it goes (from S3 into a cache under the pipeline's home, or straight from a local
folder), shuffles per epoch with the run's seed and gives each DDP rank, and each node, its own
share. :func:`read_shards` reads the whole split into memory instead, for a consumer that wants
arrays.

litdata is installed without its declared dependencies (see the Makefile): it imports
torchvision only to decode JPEG and video, and obstore only as a faster S3 path, and neither
applies to uint8 arrays.
"""

from __future__ import annotations

import multiprocessing
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.refs import ProcessedDatasetRef
from pipeline.storage import S3Storage, Storage, space_for

if TYPE_CHECKING:
    from litdata import StreamingDataset

INDEX = "index.json"
"""litdata's index of the chunks, put last: its presence marks the shards complete."""
MB = 1024 * 1024
#: Bounds of a chunk's size: litdata's recommended 64 MB, less under a small budget.
CHUNK_BYTES = (1 * MB, 64 * MB)
BLOCK = 4096
"""Items per input of ``optimize`` (one input per item would make the list of inputs as long as
the split)."""
SHARDED_SPLITS = ("train",)
"""The splits written as shards when over budget: training's is the big one, and validation and
test stay ``.npz`` for every stage that reads them whole (evaluation, calibration, the gate)."""


def require_litdata() -> None:
    """Refuse in one line, before anything is written, where litdata is not installed (a plain
    ``pip install`` of the package: it is installed apart, without its declared dependencies)."""
    import importlib.util

    if importlib.util.find_spec("litdata") is None:
        from pipeline.errors import ConfigError

        raise ConfigError(
            "memory_budget_mb",
            "litdata installed to shard a dataset over the budget (pip install --no-deps litdata==0.2.76)",
            "it is not installed; raise the budget, or install it",
        )


def shards_key(processed_hash: str, split: str) -> str:
    """Storage key of a split's shards folder."""
    return f"shards/{processed_hash}/{split}"


def decoded_bytes(arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> int:
    """Bytes the splits' images and labels take in memory."""
    return sum(images.nbytes + labels.nbytes for images, labels in arrays.values())


def chunk_bytes(budget_mb: int) -> int:
    """A chunk's size under a memory budget: a sixteenth of it, within :data:`CHUNK_BYTES`."""
    low, high = CHUNK_BYTES
    return int(min(high, max(low, budget_mb * MB // 16)))


class ImageItems:
    """``optimize``'s function: the ``(image, label)`` items of a block ``(start, stop)``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = images
        self.labels = labels

    def __call__(self, block: tuple[int, int]) -> Iterator[tuple[np.ndarray, int]]:
        for i in range(*block):
            yield self.images[i], int(self.labels[i])


def write_shards(images: np.ndarray, labels: np.ndarray, storage: Storage, key: str, chunk_size: int) -> str:
    """Write ``images`` and ``labels`` as shards of about ``chunk_size`` bytes under ``key``,
    whole or not at all; return the folder's URI. The items keep their order."""
    require_litdata()
    from litdata import optimize

    blocks = [(start, min(start + BLOCK, len(labels))) for start in range(0, len(labels), BLOCK)]
    # optimize sets the start method for the whole process; fork shares the arrays with its
    # worker (spawn would pickle them), and the previous setting is put back after.
    previous = multiprocessing.get_start_method(allow_none=True)
    with tempfile.TemporaryDirectory(prefix="shards-") as tmp:
        folder = Path(tmp) / "shards"
        try:
            with space_for(tmp):
                optimize(
                    fn=ImageItems(images, labels),
                    inputs=blocks,
                    output_dir=str(folder),
                    chunk_bytes=chunk_size,
                    num_workers=1,
                    reorder_files=False,
                    keep_data_ordered=True,
                    start_method="fork",
                    verbose=False,
                )
        finally:
            multiprocessing.set_start_method(previous, force=True)
        return storage.put_folder(folder, key, last=INDEX)


def _reading_options(storage: Storage) -> dict[str, Any]:
    """How litdata reaches the shards in ``storage``: for S3, the pipeline's bounded retries and
    timeouts (instead of litdata's 1,000 attempts) and a chunk cache under the storage's cache
    folder, which is the pipeline's home (:func:`~pipeline.storage.storage_for`)."""
    if isinstance(storage, S3Storage):
        return {
            "cache_dir": str(storage.cache_dir / "shards"),
            "storage_options": {"config": storage.client.meta.config},
        }
    return {}  # a local folder is read in place


def streaming_dataset(
    ref: ProcessedDatasetRef, storage: Storage, split: str, *, shuffle: bool, seed: int = 0
) -> StreamingDataset:
    """The ``(image, label)`` items of a sharded split, streamed. Build it where it is used: it
    takes this process's DDP rank and world size (``torch.distributed``, else the environment)
    when constructed, and under DDP drops the last items so that every rank gets as many."""
    from litdata import StreamingDataset

    return StreamingDataset(
        storage.uri(shards_key(ref.processed_hash, split)), shuffle=shuffle, seed=seed, **_reading_options(storage)
    )


def read_shards(ref: ProcessedDatasetRef, storage: Storage, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A sharded split in memory, in the order it was written: uint8 images and int64 labels."""
    dataset = streaming_dataset(ref, storage, split, shuffle=False)
    images = np.empty((len(dataset), *dataset[0][0].shape), dtype=np.uint8)
    labels = np.empty(len(dataset), dtype=np.int64)
    for i, (image, label) in enumerate(dataset):
        images[i], labels[i] = image, label
    return images, labels
