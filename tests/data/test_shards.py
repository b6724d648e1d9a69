"""Shards: a dataset over the memory budget gets its training split written as litdata shards,
which read back as the same arrays and stream as the same batches; under the budget nothing
changes."""

from __future__ import annotations

import math
import os
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


#: One DDP rank of :func:`test_ddp_ranks_stream_disjoint_equal_shares`: joins a gloo group of
#: two on loopback, builds the data module as Lightning would once the group is up, and writes
#: the image hashes of each of two epochs it is given.
RANK = """
import json, sys
import torch.distributed as dist
from pipeline.data.profile import image_hashes
from pipeline.refs import ProcessedDatasetRef
from pipeline.storage import open_storage
from pipeline.training.datamodule import ProcessedDataModule, epoch_images

rank, port, root, ref, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
data = ProcessedDataModule(ProcessedDatasetRef.from_dict(json.loads(ref)), open_storage(root), 64, seed=0)
data.setup()
loader = data.train_dataloader()
epochs = [[h for images, _ in loader for h in image_hashes(images.numpy())] for _ in range(2)]
json.dump({"per_epoch": epoch_images(loader), "epochs": epochs}, open(out, "w"))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_ddp_ranks_stream_disjoint_equal_shares(raw, storage, settings, tmp_path):
    """Two DDP processes (gloo, CPU) on one sharded split: each epoch, each rank streams its own
    share, as many images as the other, none of them the other's, together the whole split but
    less than a batch per rank (litdata deals out whole batches under DDP); and the next epoch
    deals them out again."""
    import json
    import subprocess
    import sys

    from services import free_port

    ref = preprocess(raw, storage, OVER)
    images, labels = load_split(ref, storage, "train")
    port, outs = str(free_port()), [tmp_path / f"rank{rank}.json" for rank in (0, 1)]
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", RANK, str(rank), port, settings.storage_uri, json.dumps(ref.to_dict()), str(out)],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for rank, out in enumerate(outs)
    ]
    assert [process.wait(timeout=300) for process in ranks] == [0, 0]
    seen = [json.loads(out.read_text()) for out in outs]
    share = seen[0]["per_epoch"]
    assert seen[1]["per_epoch"] == share and share % 64 == 0 and len(labels) - 2 * 64 < 2 * share <= len(labels)
    everything = Counter(image_hashes(images))
    for epoch in (0, 1):
        first, second = (rank["epochs"][epoch] for rank in seen)
        assert len(first) == len(second) == share
        assert not set(first) & set(second)
        assert not Counter(first + second) - everything  # only the split's images, each at most once
    assert seen[0]["epochs"][0] != seen[0]["epochs"][1]
