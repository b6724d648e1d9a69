"""The Lightning data module over a processed dataset.

Whole splits are held in memory as uint8 tensors (Fashion-MNIST is 55 MB) and batches are cut
by indexing, not by collating one sample at a time; the model normalises and augments on the
device. So the loader runs in the training process (``num_workers=0``): cutting a batch is a
single gather, and worker processes would only add a copy through shared memory per batch.

Under DDP each rank trains on its own shard of every epoch (``DistributedSampler``, reshuffled
per epoch with the run's seed); validation runs on the whole split on every rank, so that
validation metrics need no gathering and are the same on all ranks.

A training split stored as litdata shards (the dataset was over the memory budget,
:mod:`pipeline.data.shards`) is streamed instead (:func:`shard_loader`): the same uint8 images
and int64 labels per batch, a few chunks in memory at a time, each rank (and node) its own
share of every epoch, reshuffled per epoch with the run's seed by litdata.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytorch_lightning as pl
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from pipeline.config import FASHION_MNIST_SHAPE
from pipeline.data.processed import is_sharded, load_split
from pipeline.data.shards import streaming_dataset
from pipeline.refs import ProcessedDatasetRef
from pipeline.storage import Storage

if TYPE_CHECKING:
    from litdata import StreamingDataset


class TensorBatches(Dataset):
    """Indexed by a list of indices, returns a whole batch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[indices], self.labels[indices]


def split_tensors(ref: ProcessedDatasetRef, storage: Storage, split: str) -> TensorBatches:
    images, labels = load_split(ref, storage, split)
    return TensorBatches(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype("int64")))


class EpochBatches(BatchSampler):
    """Index batches that Lightning can reseed per epoch: it calls ``set_epoch`` on the
    loader's sampler, which here is this BatchSampler, so the call is passed on."""

    def set_epoch(self, epoch: int) -> None:
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)


def batch_loader(
    data: TensorBatches,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    ranks: tuple[int, int] = (0, 1),
    pin_memory: bool = False,
) -> DataLoader:
    """Batches of ``data``; ``ranks`` is (this rank, world size) for a sharded training loader.

    Shuffling is a function of (seed, epoch) only, on one process as under DDP, so a training
    resumed from a checkpoint sees the same order in its remaining epochs as one that ran through.
    """
    sampler: Sampler[int]
    if shuffle:
        rank, world = ranks
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    else:
        sampler = SequentialSampler(data)
    # batch_size=None: the BatchSampler already yields index lists and the dataset slices them.
    return DataLoader(
        data, sampler=EpochBatches(sampler, batch_size, drop_last=False), batch_size=None, pin_memory=pin_memory
    )


#: Pixels per validation (and calibration) batch: 1,024 images of the default dataset's size,
#: fewer of larger images, so that a batch's activations take about the same memory whatever
#: the image size.
EVAL_BATCH_PIXELS = 1024 * FASHION_MNIST_SHAPE[1] * FASHION_MNIST_SHAPE[2]


def eval_batch_size(image_shape: list[int]) -> int:
    """Images per batch when predicting without gradients, for ``[channels, height, width]``."""
    return max(1, EVAL_BATCH_PIXELS // (image_shape[1] * image_shape[2]))


def shard_loader(data: StreamingDataset, batch_size: int, *, pin_memory: bool = False) -> DataLoader:
    """Batches ``[images, labels]`` of the streamed ``(image, label)`` items of ``data``.

    In the training process (``num_workers=0``), as the in-memory path: litdata downloads the
    next chunks in a thread of its own, and a worker process would add a copy per batch."""
    from litdata import StreamingDataLoader

    return StreamingDataLoader(data, batch_size=batch_size, num_workers=0, pin_memory=pin_memory)


def epoch_images(loader: DataLoader) -> int:
    """Images this rank trains on per epoch through ``loader`` (:func:`batch_loader`'s or
    :func:`shard_loader`'s, whose dataset has this rank's length)."""
    if isinstance(loader.sampler, EpochBatches):
        return len(loader.sampler.sampler)  # type: ignore[arg-type]
    return len(loader.dataset)  # type: ignore[arg-type]


class ProcessedDataModule(pl.LightningDataModule):
    def __init__(self, ref: ProcessedDatasetRef, storage: Storage, batch_size: int, seed: int) -> None:
        super().__init__()
        self.ref = ref
        self.storage = storage
        self.batch_size = batch_size
        self.seed = seed
        self.splits: dict[str, TensorBatches] = {}

    def setup(self, stage: str | None = None) -> None:
        for split in ("train", "val"):
            if split not in self.splits and not is_sharded(self.ref, split):
                self.splits[split] = split_tensors(self.ref, self.storage, split)

    def _pin(self) -> bool:
        from pytorch_lightning.accelerators import CUDAAccelerator

        return self.trainer is not None and isinstance(self.trainer.accelerator, CUDAAccelerator)

    def train_dataloader(self) -> DataLoader:
        if is_sharded(self.ref, "train"):
            # Made here, once the process group is up: the dataset takes its rank when made.
            data = streaming_dataset(self.ref, self.storage, "train", shuffle=True, seed=self.seed)
            return shard_loader(data, self.batch_size, pin_memory=self._pin())
        trainer = self.trainer
        ranks = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return batch_loader(
            self.splits["train"], self.batch_size, shuffle=True, seed=self.seed, ranks=ranks, pin_memory=self._pin()
        )

    def val_dataloader(self) -> DataLoader:
        return batch_loader(
            self.splits["val"], eval_batch_size(self.ref.image_shape), shuffle=False, pin_memory=self._pin()
        )
