"""A raw dataset as arrays, with its :class:`~pipeline.refs.DatasetSpec`: decoded once.

:func:`load_dataset` reads the raw files in their layout (:mod:`pipeline.data.layouts`; IDX by
:mod:`pipeline.data.idx`), decodes the images in parallel (:mod:`pipeline.data.images`) into
the uint8 arrays training uses (``(n, h, w)`` grayscale, ``(n, h, w, 3)`` RGB) and finds the
spec: channels, size, class names in a stable order, counts per split and class. The result is
stored under ``decoded/<dataset_hash>-<hash of the reading settings>/`` (``spec.json`` written
last), so validation decodes and preprocessing, or a rerun on an unchanged source, decodes
nothing. IDX files are read again instead (under a second for Fashion-MNIST: a stored copy
would only double the bytes).

An image that cannot be used (:class:`~pipeline.errors.BadImageError`'s cases) stops the read
with one line naming the file and the problem, unless the reading setting
``max_invalid_fraction`` allows that many: then the bad images are quarantined, listed in
``quarantine.json`` (and in the data report), and left out of every split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import FASHION_MNIST_CLASSES, FASHION_MNIST_LABEL_DIGESTS, AcquireConfig, SourceLimits
from pipeline.errors import BadImageError, DatasetLayoutError
from pipeline.refs import DatasetSpec, RawDatasetRef
from pipeline.storage import Storage, space_for

log = logging.getLogger(__name__)

SPEC = "spec.json"
QUARANTINE = "quarantine.json"
SPLITS = ("train", "test")
CHANNELS = {"auto": None, "grayscale": 1, "rgb": 3}


@dataclass(frozen=True)
class Dataset:
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    """``{"train": (images, labels), "test": (images, labels)}``; labels int64 class ids."""
    spec: DatasetSpec
    quarantined: list[dict[str, Any]]
    """``{"path", "split", "class", "problem"}`` of each image left out."""


def reading_of(raw: RawDatasetRef) -> dict[str, Any]:
    """The raw dataset's reading settings, the defaults filling what it does not say."""
    return {**AcquireConfig().reading(), **raw.read}


def decoded_prefix(raw: RawDatasetRef) -> str:
    settings = json.dumps({**reading_of(raw), "layout": raw.layout}, sort_keys=True)
    return f"decoded/{raw.dataset_hash}-{hashlib.sha256(settings.encode()).hexdigest()[:12]}"


def load_dataset(raw: RawDatasetRef, storage: Storage, limits: SourceLimits | None = None) -> Dataset:
    """The dataset of ``raw`` as arrays with its spec, decoded at most once per reading settings."""
    prefix = decoded_prefix(raw)
    if storage.exists(f"{prefix}/{SPEC}"):
        return _stored(storage, prefix)
    reading = reading_of(raw)
    if raw.layout == "idx":  # read in well under a second: not stored twice
        return _idx(raw, storage, reading, limits)
    dataset = _images(raw, storage, reading)
    with tempfile.TemporaryDirectory(prefix="decoded-") as tmp:
        with space_for(tmp):
            for split, (images, labels) in dataset.splits.items():
                np.save(Path(tmp) / f"{split}-images.npy", images)
                np.save(Path(tmp) / f"{split}-labels.npy", labels)
            (Path(tmp) / QUARANTINE).write_text(json.dumps(dataset.quarantined, indent=1))
            (Path(tmp) / SPEC).write_text(json.dumps(dataset.spec.to_dict(), indent=2, sort_keys=True))
        storage.put_folder(Path(tmp), prefix, last=SPEC)
    spec = dataset.spec
    log.info(
        "decoded %s: %s images of %dx%dx%d in %d classes, %d quarantined",
        storage.uri(prefix),
        sum(sum(c.values()) for c in spec.counts.values()),
        spec.channels,
        spec.height,
        spec.width,
        len(spec.classes),
        spec.quarantined,
    )
    return dataset


def _stored(storage: Storage, prefix: str) -> Dataset:
    splits = {
        split: (
            np.load(storage.local_path(f"{prefix}/{split}-images.npy")),
            np.load(storage.local_path(f"{prefix}/{split}-labels.npy")),
        )
        for split in SPLITS
    }
    spec = DatasetSpec.from_dict(storage.get_json(f"{prefix}/{SPEC}"))
    return Dataset(splits, spec, storage.get_json(f"{prefix}/{QUARANTINE}"))


def _spec(
    reading: dict[str, Any], layout: str, splits: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str], bad: int
) -> DatasetSpec:
    images = splits["train"][0]
    channels = 1 if images.ndim == 3 else images.shape[3]
    counts = {
        split: {name: int((labels == i).sum()) for i, name in enumerate(classes)}
        for split, (_, labels) in splits.items()
    }
    return DatasetSpec(
        name=reading["dataset_name"] or "dataset",
        layout=layout,
        channels=int(channels),
        height=int(images.shape[1]),
        width=int(images.shape[2]),
        classes=classes,
        counts=counts,
        quarantined=bad,
    )


def idx_classes(raw: RawDatasetRef, labels: np.ndarray) -> list[str]:
    """IDX files carry no class names: Fashion-MNIST's for its label files (by content digest),
    else the label ids as names."""
    digests = {info.get("content_sha256") for name, info in raw.files.items() if "labels" in name}
    count = int(labels.max()) + 1 if len(labels) else 0
    if digests and digests <= FASHION_MNIST_LABEL_DIGESTS and count <= len(FASHION_MNIST_CLASSES):
        return list(FASHION_MNIST_CLASSES)
    return [str(i) for i in range(count)]


def _idx(raw: RawDatasetRef, storage: Storage, reading: dict[str, Any], limits: SourceLimits | None) -> Dataset:
    from pipeline.data.acquire import load_raw_splits

    splits = load_raw_splits(raw, storage, limits)
    if reading["colour"] == "rgb":  # the same gray in every channel
        splits = {s: (np.repeat(x[..., None], 3, axis=3), y) for s, (x, y) in splits.items()}
    splits = {s: (x, y.astype(np.int64)) for s, (x, y) in splits.items()}
    classes = idx_classes(raw, np.concatenate([y for _, y in splits.values()]))
    return Dataset(splits, _spec(reading, "idx", splits, classes, 0), [])


def _show_as(members: Any, stored: str, source: str) -> None:
    """Name ``source`` where ``members`` (and the archive it reads, if rooted) would name the
    stored copy: a packed folder is its folder, an archive the archive at its URI."""
    for store in (members, getattr(members, "inner", None)):
        if store is not None:
            store.where = store.where.replace(stored, source, 1)


def _images(raw: RawDatasetRef, storage: Storage, reading: dict[str, Any]) -> Dataset:
    from pipeline.data.images import ImagePolicy, decode_all
    from pipeline.data.layouts import list_images, open_members

    (stored,) = raw.files
    path = storage.local_path(f"raw/{raw.dataset_hash}/{stored}")
    tolerant = reading["max_invalid_fraction"] > 0
    layout_problems: list[dict[str, str]] = []
    with open_members(path) as members:
        if raw.source_uri:  # messages name the source, not the copy in storage
            _show_as(members, str(path), raw.source_uri.rstrip("/"))
        where = members.where
        listing = list_images(
            members,
            raw.layout,  # type: ignore[arg-type]
            reading["test_fraction"],
            reading["seed"],
            problems=layout_problems if tolerant else None,
        )
        items = list(members.read_many(listing.names))
    policy = ImagePolicy(channels=CHANNELS[reading["colour"]], mixed_sizes=reading["mixed_sizes"])
    images, good, bad, _ = decode_all(items, policy)
    del items
    invalid = len(bad) + len(layout_problems)
    total = len(listing.names) + len(layout_problems)
    allowed = math.floor(reading["max_invalid_fraction"] * total)
    if invalid > allowed:
        first = bad[0] if bad else None
        share = f"; {invalid} of {total} images are invalid, max_invalid_fraction allows {allowed}" if tolerant else ""
        if first is None:
            expected, _, found = layout_problems[0]["problem"].removeprefix("expected ").partition(", found ")
            raise DatasetLayoutError(f"{where}/{layout_problems[0]['path']}", expected, f"{found}{share}")
        expected, _, found = first.problem.removeprefix("expected ").partition(", found ")
        raise BadImageError(f"{where}/{first.path}", expected, f"{found or 'an unusable image'}{share}")
    labels, splits_of = listing.labels[good], listing.splits[good]
    splits = {split: (images[splits_of == split], labels[splits_of == split]) for split in SPLITS}
    spec = _spec(reading, raw.layout, splits, listing.classes, invalid)
    for name in listing.classes:
        if spec.counts["test"][name] and not spec.counts["train"][name]:
            raise DatasetLayoutError(
                f"{where}: class {name!r}",
                "training images for every class that the test split holds",
                "none left once its invalid images were quarantined",
            )
    index = {name: i for i, name in enumerate(listing.names)}
    quarantined = [
        {
            "path": b.path,
            "split": str(listing.splits[index[b.path]]),
            "class": listing.classes[listing.labels[index[b.path]]],
            "problem": b.problem,
        }
        for b in bad
    ] + [{"path": p["path"], "split": "", "class": "", "problem": p["problem"]} for p in layout_problems]
    for entry in quarantined:
        log.warning("quarantined %s/%s: %s", where, entry["path"], entry["problem"])
    return Dataset(splits, spec, quarantined)
