"""Shards: a dataset over the memory budget gets its training split written as litdata shards,
which read back as the same arrays and stream as the same batches; under the budget nothing
changes."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from pipeline.config import AcquireConfig, PreprocessConfig
from pipeline.data.acquire import acquire
from pipeline.data.preprocess import preprocess
from pipeline.data.processed import load_processed_ref, load_split
from pipeline.data.profile import image_hashes
from pipeline.data.shards import INDEX, shards_key
from pipeline.refs import ProcessedDatasetRef
from pipeline.training.datamodule import ProcessedDataModule, epoch_images

#: The small cut (2,500 images of 28x28) decodes to 2 MB: over a budget of 1 MB.
OVER = PreprocessConfig(memory_budget_mb=1)


@pytest.fixture
def raw(small_dataset, storage):
    return acquire(AcquireConfig(source_uri=str(small_dataset)), storage)


def items(images: np.ndarray, labels: np.ndarray) -> Counter:
    return Counter(zip(image_hashes(images), labels.tolist(), strict=True))


def test_under_the_budget_every_split_is_an_npz(raw, storage):
    ref = preprocess(raw, storage, PreprocessConfig())
    assert ref.layout == "npz"
    assert not storage.exists(f"{shards_key(ref.processed_hash, 'train')}/{INDEX}")
    assert all(storage.exists(f"processed/{ref.processed_hash}/{split}.npz") for split in ("train", "val", "test"))


def test_over_the_budget_the_training_split_is_sharded_and_reads_back_the_same(raw, storage):
    held = preprocess(raw, storage, PreprocessConfig())
    sharded = preprocess(raw, storage, OVER)
    assert sharded.layout == "shards" and sharded.counts == held.counts and sharded.mean == held.mean
    assert storage.exists(f"{shards_key(sharded.processed_hash, 'train')}/{INDEX}")
    assert not storage.exists(f"processed/{sharded.processed_hash}/train.npz")
    assert load_processed_ref(storage, sharded.processed_hash) == sharded
    for split in ("train", "val", "test"):
        (images, labels), (expected_images, expected_labels) = (
            load_split(sharded, storage, split),
            load_split(held, storage, split),
        )
        assert images.dtype == expected_images.dtype and labels.dtype == np.int64
        np.testing.assert_array_equal(images, expected_images)
        np.testing.assert_array_equal(labels, expected_labels)
    # Run again: reused, not written twice.
    assert preprocess(raw, storage, OVER) == sharded


def test_a_reference_from_before_layouts_is_npz(raw, storage):
    data = preprocess(raw, storage, PreprocessConfig()).to_dict()
    del data["layout"]
    assert ProcessedDatasetRef.from_dict(data).layout == "npz"


def test_training_streams_the_whole_split_each_epoch_reshuffled(raw, storage):
    ref = preprocess(raw, storage, OVER)
    images, labels = load_split(ref, storage, "train")
    data = ProcessedDataModule(ref, storage, batch_size=128, seed=0)
    data.setup()
    loader = data.train_dataloader()
    assert "train" not in data.splits and epoch_images(loader) == len(labels)
    assert len(loader) == math.ceil(len(labels) / 128)
    orders = []
    for _ in range(2):
        batches = list(loader)
        assert len(batches) == len(loader)
        got_images, got_labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        assert got_images.dtype == torch.uint8 and got_labels.dtype == torch.int64
        assert got_images.shape == images.shape
        assert items(got_images.numpy(), got_labels.numpy()) == items(images, labels)
        orders.append(image_hashes(got_images.numpy()))
    assert orders[0] != orders[1]
