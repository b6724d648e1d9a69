"""Typed configuration: where things live (:class:`Settings`) and how each stage behaves.

``Settings`` is read from the environment, standard variable names first
(``MLFLOW_TRACKING_URI``, ``AWS_ENDPOINT_URL``), so the same code runs embedded on one machine
and against real services. Stage configs are plain dataclasses whose fields are documented and
checked in ``__post_init__``; Airflow ``Param``s and CLI flags are turned into them by
:func:`run_config_from_params`, the one place where that conversion happens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

#: The Fashion-MNIST file set; any dataset in the same IDX layout (MNIST included) works.
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

#: Where Debian's ``dataset-fashion-mnist`` package puts the files.
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

ARCHITECTURES = ("simple_cnn", "seed_cnn")


def project_root() -> Path:
    """The checkout that holds ``pipeline/`` (editable install), else the working directory."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "pyproject.toml").is_file() else Path.cwd()


@dataclass(frozen=True)
class Settings:
    """Where the pipeline keeps data, runs and models. Read with :meth:`from_env`."""

    home: Path
    """``PIPELINE_HOME``: the one git-ignored folder of the embedded mode (default ``.runtime/``
    in the checkout). Holds the default storage, MLflow store and Airflow home."""

    storage_uri: str
    """``PIPELINE_STORAGE_URI``: a folder or ``s3://bucket/prefix`` for raw data, processed
    splits, reports and checkpoints (default ``<home>/storage``)."""

    tracking_uri: str
    """``MLFLOW_TRACKING_URI``: MLflow tracking and registry (default ``sqlite:///<home>/mlflow.db``)."""

    artifact_root: str
    """``PIPELINE_ARTIFACT_ROOT``: artifact location given to a new experiment when the
    tracking URI is a database (default ``<home>/mlartifacts``); an MLflow server decides its own."""

    model_name: str = "fashion-mnist-classifier"
    """``PIPELINE_MODEL_NAME``: the registered model every run adds versions to."""

    experiment_name: str = "training_pipeline"
    """``PIPELINE_EXPERIMENT``: the MLflow experiment of the training DAG."""

    source_uri: str = DEBIAN_FASHION_MNIST
    """``PIPELINE_SOURCE_URI``: the default dataset source (folder, ``file://``, ``http(s)://``
    prefix or ``s3://`` prefix)."""

    incoming_uri: str = ""
    """``PIPELINE_INCOMING_URI``: where new images arrive for drift monitoring (default
    ``<home>/new-data``): ``images-idx3-ubyte.gz`` and, optionally, ``labels-idx1-ubyte.gz``."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        home = Path(env.get("PIPELINE_HOME") or project_root() / ".runtime").resolve()
        return cls(
            home=home,
            storage_uri=env.get("PIPELINE_STORAGE_URI") or str(home / "storage"),
            tracking_uri=env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}",
            artifact_root=env.get("PIPELINE_ARTIFACT_ROOT") or (home / "mlartifacts").as_uri(),
            model_name=env.get("PIPELINE_MODEL_NAME") or cls.model_name,
            experiment_name=env.get("PIPELINE_EXPERIMENT") or cls.experiment_name,
            source_uri=env.get("PIPELINE_SOURCE_URI") or cls.source_uri,
            incoming_uri=env.get("PIPELINE_INCOMING_URI") or str(home / "new-data"),
        )


def _fingerprint(obj: Any) -> str:
    blob = json.dumps(dataclasses.asdict(obj), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(name, f"a value in [{low}, {high}]", repr(value))


@dataclass(frozen=True)
class AcquireConfig:
    """How to fetch the four IDX files."""

    source_uri: str = DEBIAN_FASHION_MNIST
    """Folder, ``file://`` URI, ``http(s)://`` URL prefix or ``s3://bucket/prefix``."""

    expected_sha256: dict[str, str] = field(default_factory=dict)
    """Optional ``{file name: sha256}``; each value may be the hash of the decompressed IDX
    content (stable across recompression, e.g. Debian's ``.gz``) or of the bytes as served."""

    def __post_init__(self) -> None:
        if not self.source_uri:
            raise ConfigError("source_uri", "a folder, file://, http(s):// or s3:// URI", "''")
        unknown = set(self.expected_sha256) - set(IDX_FILES.values())
        if unknown:
            raise ConfigError("expected_sha256", f"keys among {sorted(IDX_FILES.values())}", sorted(unknown))
        for name, digest in self.expected_sha256.items():
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
                raise ConfigError(f"expected_sha256[{name}]", "64 hex digits", repr(digest))


@dataclass(frozen=True)
class PreprocessConfig:
    """How raw data becomes train/validation/test splits. Part of the processed data's hash."""

    val_fraction: float = 0.1
    """Share of the (deduplicated) training images held out for validation, per class."""

    sample_cap: int | None = None
    """Keep at most this many training and this many test images (stratified); for quick runs."""

    drop_duplicates: bool = True
    """Drop exact duplicate training images, and training images that also occur in the test
    set (leakage)."""

    seed: int = 42
    """Seed of the split and of the sample cap."""

    def __post_init__(self) -> None:
        _check_range("val_fraction", self.val_fraction, 0.01, 0.5)
        if self.sample_cap is not None and self.sample_cap < 100:
            raise ConfigError("sample_cap", "an integer >= 100 or None", repr(self.sample_cap))

    def fingerprint(self) -> str:
        return _fingerprint(self)


@dataclass(frozen=True)
class TrainConfig:
    """How the model is trained. Part of the idempotence key: same data + same config = same run."""

    architecture: str = "simple_cnn"
    """``simple_cnn`` (two conv blocks with batch norm, the default) or ``seed_cnn`` (the
    original design: one 3x3 conv with 32 filters, 2x2 max-pool, 128-unit dense layer)."""

    epochs: int = 8
    """Maximum number of epochs; early stopping may end sooner."""

    batch_size: int = 128
    """Images per optimizer step."""

    learning_rate: float = 2e-3
    """Adam's learning rate."""

    weight_decay: float = 1e-4
    """L2 penalty, as in the original design (Adam's ``weight_decay``)."""

    early_stopping_patience: int = 3
    """Epochs without validation-loss improvement before training stops."""

    seed: int = 42
    """Seed for weights, shuffling and dropout: same seed and config give the same metrics on CPU."""

    accelerator: str = "auto"
    """Lightning accelerator: ``auto`` takes a GPU when there is one."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError("architecture", f"one of {list(ARCHITECTURES)}", repr(self.architecture))
        # The same bounds as the DAG's Params, so the CLI accepts what the trigger form accepts.
        _check_range("epochs", self.epochs, 1, 200)
        _check_range("batch_size", self.batch_size, 8, 8192)
        _check_range("learning_rate", self.learning_rate, 1e-7, 1.0)
        _check_range("weight_decay", self.weight_decay, 0.0, 1.0)
        _check_range("early_stopping_patience", self.early_stopping_patience, 1, 500)

    def fingerprint(self) -> str:
        return _fingerprint(self)


@dataclass(frozen=True)
class RunConfig:
    """Everything one pipeline run needs, as built from DAG Params or CLI flags."""

    acquire: AcquireConfig
    preprocess: PreprocessConfig
    train: TrainConfig
    force: bool = False
    """Retrain and register a new version even if this data and config were trained before."""


def _typed(params: Mapping[str, Any], name: str, kind: type, default: Any) -> Any:
    """``params[name]`` converted to ``kind`` (``default`` when absent); a bad value names the field."""
    if name not in params:
        return default
    value = params[name]
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(name, "true or false", repr(value))
    try:
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(name, {int: "an integer", float: "a number", str: "a string"}[kind], repr(value)) from exc


def run_config_from_params(params: Mapping[str, Any], settings: Settings | None = None) -> RunConfig:
    """Build a :class:`RunConfig` from Airflow Params or CLI flags (missing keys take defaults)."""
    settings = settings or Settings.from_env()
    p = {k: v for k, v in params.items() if v is not None and v != ""}
    train, prep = TrainConfig(), PreprocessConfig()
    checksums = p.get("expected_sha256") or {}
    if not isinstance(checksums, Mapping):
        raise ConfigError("expected_sha256", '{"file name": "sha256"}', repr(checksums))
    return RunConfig(
        acquire=AcquireConfig(
            source_uri=_typed(p, "source_uri", str, settings.source_uri), expected_sha256=dict(checksums)
        ),
        preprocess=PreprocessConfig(
            val_fraction=_typed(p, "val_fraction", float, prep.val_fraction),
            sample_cap=_typed(p, "sample_cap", int, None),
            seed=_typed(p, "seed", int, prep.seed),
        ),
        train=TrainConfig(
            architecture=_typed(p, "architecture", str, train.architecture),
            epochs=_typed(p, "epochs", int, train.epochs),
            batch_size=_typed(p, "batch_size", int, train.batch_size),
            learning_rate=_typed(p, "learning_rate", float, train.learning_rate),
            weight_decay=_typed(p, "weight_decay", float, train.weight_decay),
            seed=_typed(p, "seed", int, train.seed),
        ),
        force=_typed(p, "force", bool, False),
    )
