"""References that travel between stages (and through Airflow XCom): URIs, hashes, run ids,
model versions and small metric dicts, never arrays.

Each reference is a frozen dataclass with ``to_dict``/``from_dict`` so that an Airflow task can
return it as plain JSON and the next task, or a CLI subcommand, can rebuild it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pipeline.config.settings import FASHION_MNIST_SHAPE

T = TypeVar("T", bound="Ref")


class Ref:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class DatasetSpec(Ref):
    """What a dataset holds, found once (when it is first read, at validation) and read by
    everything downstream instead of constants: the networks' input, the serving schema, the
    suites' bounds, the model card."""

    name: str
    """The dataset's name (the setting, else the source's last path part): the per-dataset
    suites folder ``expectations/<name>/``, the model card."""
    layout: str
    """``idx``, ``folders`` or ``manifest`` (:mod:`pipeline.data.layouts`)."""
    channels: int
    height: int
    width: int
    classes: list[str]
    """Class names in class-id order."""
    counts: dict[str, dict[str, int]]
    """``{split: {class name: images}}`` for ``train`` and ``test``, quarantined images excluded."""
    quarantined: int = 0
    """Images set aside as unreadable (under ``max_invalid_fraction``); listed in the data report."""

    @property
    def shape(self) -> list[int]:
        """``[channels, height, width]``."""
        return [self.channels, self.height, self.width]


@dataclass(frozen=True)
class RawDatasetRef(Ref):
    """A dataset's files as stored under ``raw/<dataset_hash>/``: the four IDX files, the
    source's archive as served, or the images of a folder packed into one ``images.tar``."""

    dataset_hash: str
    """First 16 hex digits of the sha256 over the files' decompressed content hashes."""
    uri: str
    """Storage URI of the ``raw/<dataset_hash>/`` folder."""
    source_uri: str
    files: dict[str, dict[str, Any]]
    """``{file name: {"sha256", "content_sha256", "size"}}``."""
    fetched: list[str] = field(default_factory=list)
    """Files downloaded by this call; empty when the source was unchanged."""
    layout: str = "idx"
    """The layout of the files (:mod:`pipeline.data.layouts`)."""
    read: dict[str, Any] = field(default_factory=dict)
    """How to read them (:class:`~pipeline.config.AcquireConfig`'s reading settings: name,
    class names, channels, size policy, test share, invalid share); part of what is decoded's
    identity, not of the dataset's."""


@dataclass(frozen=True)
class ValidationRef(Ref):
    """The outcome of a validation gate; only a passing one is ever returned."""

    dataset_hash: str
    report_uri: str
    """HTML report a person reads (expectations, observed values)."""
    results_uri: str
    """GX's own validation results as JSON."""
    profile_uri: str
    """Per-sample profile table (Parquet): the reference for drift monitoring."""
    suites: dict[str, bool]
    """``{suite name: success}``."""
    statistics: dict[str, Any]
    report_prefix: str = ""
    """Storage key of the report folder (``reports/<dataset_hash>/suites-<hash>``)."""
    spec: dict[str, Any] = field(default_factory=dict)
    """The :class:`DatasetSpec` the suites checked, as a dict (empty from before it existed)."""


@dataclass(frozen=True)
class ProcessedDatasetRef(Ref):
    """Deduplicated, split data under ``processed/<processed_hash>/``."""

    processed_hash: str
    """Hash of (raw dataset hash, preprocessing config)."""
    dataset_hash: str
    uri: str
    counts: dict[str, int]
    """Images per split: ``train``, ``val``, ``test``."""
    removed: dict[str, int]
    """Images dropped: ``duplicates`` inside train, ``leaked`` (train images found in test)."""
    mean: list[float]
    """Pixel mean of the training split per channel, in [0, 1]."""
    std: list[float]
    """Pixel standard deviation of the training split per channel, in [0, 1]."""
    classes: list[str]
    image_shape: list[int] = dataclasses.field(default_factory=lambda: list(FASHION_MNIST_SHAPE))
    """``[channels, height, width]`` of every image (processed data written before this field
    existed is Fashion-MNIST's)."""
    dataset_name: str = ""
    """The dataset's name (:attr:`DatasetSpec.name`)."""
    layout: str = "npz"
    """How the splits are stored: ``npz``, every split one ``<split>.npz``; or ``shards``, the
    training split as litdata shards under ``shards/<processed_hash>/train/`` (the dataset was
    over the memory budget), validation and test still ``.npz`` (:mod:`pipeline.data.shards`)."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProcessedDatasetRef:
        # Written before the statistics were per channel: one number for the one channel.
        per_channel = {k: [data[k]] if isinstance(data.get(k), (int, float)) else data[k] for k in ("mean", "std")}
        return super().from_dict({**data, **per_channel})


@dataclass(frozen=True)
class TrainResult(Ref):
    run_id: str
    checkpoint_uri: str
    processed_hash: str
    dataset_hash: str
    config_hash: str
    metrics: dict[str, float]
    """Final validation metrics (``val_accuracy``, ``val_loss``) and ``epochs`` trained."""
    reused: bool = False
    """True when an earlier run with the same data and config was reused instead of training."""


@dataclass(frozen=True)
class EvaluationResult(Ref):
    run_id: str
    test_accuracy: float
    macro_f1: float
    per_class: dict[str, dict[str, float]]
    """``{class name: {"precision", "recall", "f1", "support"}}``."""
    artifacts: list[str]
    """Artifact paths in the MLflow run: the report, per-class table, figures and model card."""
    ece: float = 0.0
    """Expected calibration error over 15 equal-width confidence bins (0 is perfectly calibrated)."""
    worst_class: str = ""
    """The class with the lowest recall."""
    worst_class_gap: float = 0.0
    """Best per-class recall minus the worst: how unevenly the classes are served."""


@dataclass(frozen=True)
class ModelVersionRef(Ref):
    model_name: str
    version: str
    alias: str
    run_id: str
    model_uri: str
    """``models:/<name>/<version>``."""
    created: bool
    """False when the run already had a registered version (idempotent rerun)."""
