"""New data arrives as images, not only as IDX files: the drift monitor and batch inference read
a batch of class folders (or a manifest, or an archive of either) through acquisition, in the
colour of the model's data, with its class folders mapped to the model's class ids by name. A
size or a class the model does not know is refused in one line naming the batch."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from image_datasets import FOLDERS, encode
from recipes import log_model
from torch import nn

from pipeline.data.profile import image_hashes
from pipeline.errors import DatasetLayoutError
from pipeline.monitoring.monitor import fetch_batch, model_spec, monitor
from pipeline.registry.register import register_version

BATCH = slice(500, 700)  # 200 real test images the small training cut did not hold


def class_folders(root: Path, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> Path:
    """``<root>/<class name>/<n>.png``: one folder per class, no split folders."""
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index:04d}.png").write_bytes(encode(image))
    return root


@pytest.fixture
def batch(tmp_path, real_splits):
    images, labels = real_splits["t10k"]
    return images[BATCH], labels[BATCH].astype(np.int64)


def test_class_folders_are_read_as_the_model_s_images_and_class_ids(tmp_path, storage, small_processed, batch):
    # Fashion-MNIST's names: their folders sort (Ankle boot, Bag, Coat, ...) unlike the class ids
    # (T-shirt-top, Trouser, ...), so a label right here was mapped by name, not by folder order.
    spec = replace(model_spec(small_processed.processed), classes=FOLDERS)
    images, labels = batch
    folder = class_folders(tmp_path / "incoming", images, labels, FOLDERS)
    read, read_labels, digest = fetch_batch(str(folder), storage, like=spec)
    assert read.dtype == np.uint8 and read.shape == images.shape
    assert Counter(zip(image_hashes(read), read_labels.tolist(), strict=True)) == Counter(
        zip(image_hashes(images), labels.tolist(), strict=True)
    )
    assert fetch_batch(str(folder), storage, like=spec)[2] == digest  # stored once, by content


def test_the_drift_monitor_measures_a_batch_of_class_folders(tmp_path, settings, storage, small_processed, batch):
    net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10), nn.Softmax(dim=1)).eval()
    run_id, model_uri = log_model(settings, net, "pt2")
    processed = small_processed.processed
    tags = {"dataset_hash": small_processed.raw.dataset_hash, "processed_hash": processed.processed_hash}
    register_version(settings, run_id, model_uri, "test", tags=tags)
    folder = class_folders(tmp_path / "incoming", *batch, processed.classes)
    result = monitor(str(folder), storage, settings)
    assert result.batch_size == 200 and result.model_alias == "candidate"
    report = storage.get_json(f"drift/{result.batch_hash}/v{result.model_version}/report.json")
    assert report["labels"]  # the folders' labels were read, and compared with the training split's


def test_a_class_the_model_does_not_know_is_refused_naming_it(tmp_path, storage, small_processed, batch):
    spec = model_spec(small_processed.processed)
    names = [*spec.classes[:9], "Umbrella"]
    folder = class_folders(tmp_path / "incoming", *batch, names)
    with pytest.raises(DatasetLayoutError, match=f"{folder}: expected classes among the model's .*found Umbrella"):
        fetch_batch(str(folder), storage, like=spec)


def test_images_of_another_size_are_refused_naming_both_sizes(tmp_path, storage, small_processed, batch):
    spec = model_spec(small_processed.processed)
    images, labels = batch
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    folder = class_folders(tmp_path / "incoming", padded, labels, spec.classes)
    with pytest.raises(DatasetLayoutError, match=f"{folder}: expected 28x28 images like the model's .*found 32x32"):
        fetch_batch(str(folder), storage, like=spec)
