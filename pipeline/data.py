"""The Lightning data module over a processed dataset.

Whole splits are held in memory as uint8 tensors (Fashion-MNIST is 55 MB) and batches are cut
by indexing, not by collating one sample at a time; the model normalises on the fly.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from pipeline.preprocess import load_split
from pipeline.refs import ProcessedDatasetRef
from pipeline.storage import Storage


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


def batch_loader(data: TensorBatches, batch_size: int, *, shuffle: bool, seed: int = 0) -> DataLoader:
    if shuffle:
        sampler = RandomSampler(data, generator=torch.Generator().manual_seed(seed))
    else:
        sampler = SequentialSampler(data)
    # batch_size=None: the BatchSampler already yields index lists and the dataset slices them.
    return DataLoader(data, sampler=BatchSampler(sampler, batch_size, drop_last=False), batch_size=None)


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
            if split not in self.splits:
                self.splits[split] = split_tensors(self.ref, self.storage, split)

    def train_dataloader(self) -> DataLoader:
        return batch_loader(self.splits["train"], self.batch_size, shuffle=True, seed=self.seed)

    def val_dataloader(self) -> DataLoader:
        return batch_loader(self.splits["val"], 1024, shuffle=False)
