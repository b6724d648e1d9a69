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
import re
from collections.abc import Mapping, Sequence
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

ARCHITECTURES = ("resnet_deep", "resnet_small", "resnet_wide", "resnet_large", "simple_cnn", "seed_cnn")
OPTIMIZERS = ("adamw", "adam", "sgd")
ACCELERATORS = ("auto", "cpu", "gpu")
LR_SCHEDULES = ("onecycle", "cosine", "constant")
STRATEGIES = ("auto", "ddp", "ddp_spawn")
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed")

#: The batch size at which ``TrainConfig.learning_rate`` is given (linear scaling rule).
REFERENCE_BATCH = 128


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

    def ensure_home(self) -> Path:
        """Create the embedded home, readable by its owner only: it holds the MLflow and Airflow
        databases and the data. A home that others could read is tightened."""
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.home.stat().st_mode & 0o077:
            self.home.chmod(0o700)
        return self.home

    def to_env(self) -> dict[str, str]:
        """The environment that makes :meth:`from_env` in a child process give these settings."""
        return {
            "PIPELINE_HOME": str(self.home), "PIPELINE_STORAGE_URI": self.storage_uri,
            "MLFLOW_TRACKING_URI": self.tracking_uri, "PIPELINE_ARTIFACT_ROOT": self.artifact_root,
            "PIPELINE_MODEL_NAME": self.model_name, "PIPELINE_EXPERIMENT": self.experiment_name,
            "PIPELINE_SOURCE_URI": self.source_uri, "PIPELINE_INCOMING_URI": self.incoming_uri,
        }


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


def _env_limit(env: Mapping[str, str], name: str, kind: type, default: Any) -> Any:
    """``env[name]`` as an int or float (``default`` when unset); a bad value names the variable."""
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        return kind(text)
    except ValueError as exc:
        raise ConfigError(name, "an integer" if kind is int else "a number", repr(text)) from exc


@dataclass(frozen=True)
class SourceLimits:
    """What reading a dataset source may cost: operator settings read by :meth:`from_env`, never
    trigger-form Params (whoever can trigger a DAG must not be able to lift them). Every source
    and reader takes ``SourceLimits.from_env()`` when not given limits."""

    max_dataset_bytes: int = 4 << 30
    """``PIPELINE_MAX_DATASET_BYTES``: uncompressed bytes of one dataset (all its files
    together, headers included; default 4 GiB). An IDX header declaring more is refused before
    anything is allocated; a stream that decompresses to more is stopped."""

    max_download_bytes: int = 4 << 30
    """``PIPELINE_MAX_DOWNLOAD_BYTES``: bytes of one file as served (compressed; default 4 GiB).
    A larger announced size is refused before the download; a body that runs past it is stopped."""

    download_deadline_s: float = 1800.0
    """``PIPELINE_DOWNLOAD_DEADLINE_S``: seconds one file's download may take from the request to
    its last byte (default 30 min), however steadily the server trickles bytes."""

    redirect_hosts: tuple[str, ...] = ()
    """``PIPELINE_REDIRECT_HOSTS``: comma-separated host names (or ``host:port``) an HTTP source
    may redirect to besides its own scheme, host and port (default none)."""

    def __post_init__(self) -> None:
        for name in ("max_dataset_bytes", "max_download_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"PIPELINE_{name.upper()}", "a positive integer number of bytes", repr(value))
        if not 0 < self.download_deadline_s < float("inf"):
            raise ConfigError("PIPELINE_DOWNLOAD_DEADLINE_S", "a positive number of seconds", repr(self.download_deadline_s))
        for host in self.redirect_hosts:
            if not host or not re.fullmatch(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?", host):
                raise ConfigError("PIPELINE_REDIRECT_HOSTS", "host names or host:port, comma-separated", repr(host))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SourceLimits:
        env = os.environ if environ is None else environ
        hosts = tuple(h.strip().lower() for h in env.get("PIPELINE_REDIRECT_HOSTS", "").split(",") if h.strip())
        return cls(
            max_dataset_bytes=_env_limit(env, "PIPELINE_MAX_DATASET_BYTES", int, cls.max_dataset_bytes),
            max_download_bytes=_env_limit(env, "PIPELINE_MAX_DOWNLOAD_BYTES", int, cls.max_download_bytes),
            download_deadline_s=_env_limit(env, "PIPELINE_DOWNLOAD_DEADLINE_S", float, cls.download_deadline_s),
            redirect_hosts=hosts,
        )


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
    """How the model is trained. Part of the idempotence key: same data + same config = same run.

    The defaults are the project's recipe for all of Fashion-MNIST on 2 CPU cores (see
    docs/BENCHMARKS.md). The original design's recipe is ``architecture="seed_cnn", epochs=10,
    optimizer="adam", lr_schedule="constant", augment=False, learning_rate=0.001``.
    """

    architecture: str = "resnet_deep"
    """``resnet_deep`` (a residual CNN with batch norm, stages of 32, 64 and 128 channels at
    14x14, 7x7 and 4x4; the default), ``resnet_small`` (its first two stages), ``resnet_wide``
    (``resnet_small`` with 48 and 96 channels), ``resnet_large`` (for a GPU: two blocks per stage
    of 64, 128 and 256 channels at 28x28, 14x14 and 7x7), ``simple_cnn`` (two conv blocks with
    batch norm) or ``seed_cnn`` (the original design: one 3x3 conv with 32 filters, 2x2 max-pool, 128-unit
    dense layer)."""

    epochs: int = 15
    """Number of epochs (the learning-rate schedule spans them all)."""

    batch_size: int = 64
    """Images per optimizer step on each device. 64 rather than 128 on the CPU: the smaller
    batch's extra optimizer steps cost 10% more time per epoch and gave 0.2 points more
    flip-averaged test accuracy in two plain-loop runs (bench/recipe_bench.py,
    docs/BENCHMARKS.md). On a GPU, raise it with the device's memory; ``learning_rate`` follows."""

    learning_rate: float = 0.1
    """Peak learning rate for a global batch of 128 images; scaled linearly with the global
    batch (``batch_size`` x devices x nodes), so a larger batch on a GPU keeps the recipe."""

    weight_decay: float = 5e-4
    """Decoupled weight decay for ``adamw``, L2 penalty for ``adam`` and ``sgd``."""

    optimizer: str = "sgd"
    """``adamw``, ``adam`` (the original design's) or ``sgd`` (Nesterov momentum 0.9)."""

    label_smoothing: float = 0.1
    """Share of each training label's probability spread over the other classes (0: none).
    Validation and test losses are always against the plain labels."""

    lr_schedule: str = "onecycle"
    """``onecycle`` (warm-up, then cosine decay to ~0 over all epochs), ``cosine`` or ``constant``."""

    augment: bool = True
    """Random crop (zero padding of 2 pixels) and horizontal flip of training images. Both keep
    the label of every Fashion-MNIST class; vertical flips and rotations would not."""

    test_time_flip: bool = True
    """Predict (in validation, evaluation and the served model) the mean of the class
    probabilities for the image and for its mirror image. Costs a second forward pass per
    prediction; added 0.3 points of test accuracy to the default recipe (docs/BENCHMARKS.md)."""

    early_stopping_patience: int = 0
    """Epochs without validation-loss improvement before training stops; 0 turns early
    stopping off (a one-cycle schedule needs its whole run)."""

    seed: int = 42
    """Seed for weights, shuffling, augmentation and dropout: same seed and config give the
    same metrics on CPU."""

    accelerator: str = "auto"
    """Lightning accelerator: ``auto`` takes a GPU when there is one, ``cpu`` forces the CPU."""

    devices: str = "auto"
    """Lightning ``devices``: ``auto``, a count (``"2"``) or a list of ids (``"0,1"``)."""

    num_nodes: int = 1
    """Machines taking part in one training (each runs ``devices`` processes)."""

    strategy: str = "auto"
    """``auto``, ``ddp`` (one process per device; the default for several devices) or
    ``ddp_spawn``."""

    precision: str = "auto"
    """``auto`` is bf16 mixed precision on a GPU that supports it or on a CPU that multiplies
    bf16 in hardware (Intel AMX), else 32-bit."""

    compile: bool = False
    """``torch.compile`` the network for training (pays off on a GPU for long runs)."""

    num_threads: int = 0
    """CPU threads for torch; 0 means the CPUs this process may use (affinity and cgroup
    quota, so a container limited to 2 CPUs does not start one thread per host core)."""

    def __post_init__(self) -> None:
        for name, allowed in (
            ("architecture", ARCHITECTURES),
            ("optimizer", OPTIMIZERS),
            ("accelerator", ACCELERATORS),
            ("lr_schedule", LR_SCHEDULES),
            ("strategy", STRATEGIES),
            ("precision", PRECISIONS),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(name, f"one of {list(allowed)}", repr(getattr(self, name)))
        if not re.fullmatch(r"auto|-1|\d+|\d+(,\d+)+", str(self.devices)):
            raise ConfigError("devices", "auto, a count or a comma-separated list of device ids", repr(self.devices))
        # The same bounds as the DAG's Params, so the CLI accepts what the trigger form accepts.
        _check_range("epochs", self.epochs, 1, 200)
        _check_range("batch_size", self.batch_size, 8, 8192)
        _check_range("learning_rate", self.learning_rate, 1e-7, 1.0)
        _check_range("weight_decay", self.weight_decay, 0.0, 1.0)
        _check_range("label_smoothing", self.label_smoothing, 0.0, 0.5)
        _check_range("early_stopping_patience", self.early_stopping_patience, 0, 500)
        _check_range("num_nodes", self.num_nodes, 1, 1024)
        _check_range("num_threads", self.num_threads, 0, 1024)

    def fingerprint(self) -> str:
        return _fingerprint(self)

    def trainer_devices(self) -> int | str | list[int]:
        """``devices`` as Lightning takes it."""
        if self.devices == "auto":
            return "auto"
        if "," in self.devices:
            return [int(d) for d in self.devices.split(",")]
        return int(self.devices)


#: TrainConfig fields a search may vary: what changes the model, not where or how fast it runs.
TUNABLE = ("architecture", "batch_size", "learning_rate", "weight_decay", "optimizer", "label_smoothing", "lr_schedule",
           "augment", "test_time_flip")


@dataclass(frozen=True)
class TuneConfig:
    """A hyperparameter search. Off unless ``enabled``."""

    enabled: bool = False
    """Run the search before the full training (DAG Param ``tune``)."""

    space: dict[str, list[Any]] = field(
        default_factory=lambda: {"learning_rate": [0.05, 0.1, 0.2], "weight_decay": [0.0001, 0.0005]}
    )
    """``{TrainConfig field: [values to try]}``; fields outside :data:`TUNABLE` are refused."""

    method: str = "grid"
    """``grid`` (every combination) or ``random`` (``trials`` distinct combinations)."""

    trials: int = 4
    """How many combinations ``random`` draws (``grid`` tries them all)."""

    sample_cap: int = 6000
    """Training (and test) images per trial, a stratified sample of the processed data."""

    trial_epochs: int = 3
    """Epochs per trial (the schedule is compressed into them)."""

    seed: int = 42

    def __post_init__(self) -> None:
        if self.method not in ("grid", "random"):
            raise ConfigError("tune_method", "grid or random", repr(self.method))
        if not isinstance(self.space, Mapping) or not self.space:
            raise ConfigError("tune_space", '{"field": [values, ...]} with at least one field', repr(self.space))
        for name, values in self.space.items():
            if name not in TUNABLE:
                raise ConfigError("tune_space", f"fields among {list(TUNABLE)}", repr(name))
            if not isinstance(values, Sequence) or isinstance(values, str) or not values:
                raise ConfigError(f"tune_space.{name}", "a non-empty list of values", repr(values))
        if not 1 <= self.trials <= 256:
            raise ConfigError("tune_trials", "an integer in [1, 256]", repr(self.trials))
        if self.sample_cap < 100:
            raise ConfigError("tune_sample_cap", "an integer >= 100", repr(self.sample_cap))
        if not 1 <= self.trial_epochs <= 200:
            raise ConfigError("tune_epochs", "an integer in [1, 200]", repr(self.trial_epochs))

    def fingerprint(self) -> str:
        return _fingerprint(self)


@dataclass(frozen=True)
class GatePolicy:
    """When a registered candidate may replace ``production`` (the gate of ``pipeline.gate``).

    Both models are evaluated on the same held-out test split in the same run. With no
    production version yet, only ``min_accuracy`` applies.
    """

    min_accuracy: float = 0.90
    """Absolute floor on the candidate's test accuracy (DAG Param ``gate_min_accuracy``)."""

    max_accuracy_drop: float = 0.005
    """Largest tolerated fall in overall test accuracy against production, e.g. 0.005 = half a
    point: about the noise of a 10,000-image test set (``gate_max_accuracy_drop``)."""

    max_class_drop: float = 0.02
    """Largest tolerated fall in any one class's recall against production; a class has about
    1,000 test images, so 0.02 is a little over one standard error (``gate_max_class_drop``)."""

    min_improvement: float = 0.0
    """Required gain in overall accuracy over production (0: none; ``gate_min_improvement``)."""

    def __post_init__(self) -> None:
        for name in ("min_accuracy", "max_accuracy_drop", "max_class_drop", "min_improvement"):
            _check_range(f"gate_{name}", getattr(self, name), 0.0, 1.0)


@dataclass(frozen=True)
class RunConfig:
    """Everything one pipeline run needs, as built from DAG Params or CLI flags."""

    acquire: AcquireConfig
    preprocess: PreprocessConfig
    train: TrainConfig
    tune: TuneConfig = field(default_factory=TuneConfig)
    gate: GatePolicy = field(default_factory=GatePolicy)
    auto_promote: bool = False
    """Move ``production`` to the new version when it passes the gate and infra validation
    (off: the run stops at ``staging`` and a person promotes)."""
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
    train, prep, tune, gate = TrainConfig(), PreprocessConfig(), TuneConfig(), GatePolicy()
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
            optimizer=_typed(p, "optimizer", str, train.optimizer),
            label_smoothing=_typed(p, "label_smoothing", float, train.label_smoothing),
            lr_schedule=_typed(p, "lr_schedule", str, train.lr_schedule),
            augment=_typed(p, "augment", bool, train.augment),
            test_time_flip=_typed(p, "test_time_flip", bool, train.test_time_flip),
            early_stopping_patience=_typed(p, "early_stopping_patience", int, train.early_stopping_patience),
            seed=_typed(p, "seed", int, train.seed),
            accelerator=_typed(p, "accelerator", str, train.accelerator),
            devices=_typed(p, "devices", str, train.devices),
            num_nodes=_typed(p, "num_nodes", int, train.num_nodes),
            strategy=_typed(p, "strategy", str, train.strategy),
            precision=_typed(p, "precision", str, train.precision),
            compile=_typed(p, "compile", bool, train.compile),
            num_threads=_typed(p, "num_threads", int, train.num_threads),
        ),
        tune=TuneConfig(
            enabled=_typed(p, "tune", bool, tune.enabled),
            space=p.get("tune_space", tune.space),
            method=_typed(p, "tune_method", str, tune.method),
            trials=_typed(p, "tune_trials", int, tune.trials),
            sample_cap=_typed(p, "tune_sample_cap", int, tune.sample_cap),
            trial_epochs=_typed(p, "tune_epochs", int, tune.trial_epochs),
            seed=_typed(p, "seed", int, tune.seed),
        ),
        gate=GatePolicy(
            min_accuracy=_typed(p, "gate_min_accuracy", float, gate.min_accuracy),
            max_accuracy_drop=_typed(p, "gate_max_accuracy_drop", float, gate.max_accuracy_drop),
            max_class_drop=_typed(p, "gate_max_class_drop", float, gate.max_class_drop),
            min_improvement=_typed(p, "gate_min_improvement", float, gate.min_improvement),
        ),
        auto_promote=_typed(p, "auto_promote", bool, False),
        force=_typed(p, "force", bool, False),
    )


def _env_number(env: Mapping[str, str], name: str, kind: type, default: Any, low: float, high: float) -> Any:
    text = env.get(name)
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(name, f"a {kind.__name__} in [{low}, {high}]", repr(text)) from None
    _check_range(name, value, low, high)
    return value


def _env_flag(env: Mapping[str, str], name: str) -> bool:
    text = env.get(name, "").strip().lower()
    if text not in ("", "true", "false", "1", "0", "yes", "no"):
        raise ConfigError(name, "true or false", repr(env[name]))
    return text in ("true", "1", "yes")


@dataclass(frozen=True)
class ServingSettings:
    """What an operator sets for ``pipeline serve``: authentication and the limits that keep the
    endpoint up under hostile or broken clients. Read with :meth:`from_env`; never from a DAG Param
    (whoever triggers a DAG must not lift a limit)."""

    token: str | None = field(default=None, repr=False)
    """``PIPELINE_SERVE_TOKEN``, or the contents of the file ``PIPELINE_SERVE_TOKEN_FILE`` (read at
    start; at least 16 characters; a file that others may write is refused): when set, every route
    but ``/health``, ``/ready`` and the OpenAPI document needs ``Authorization: Bearer <token>``
    (401 otherwise). Unset: no authentication (the default, on loopback)."""

    metrics_open: bool = False
    """``PIPELINE_SERVE_METRICS_OPEN``: ``true`` serves ``/metrics`` without the token (for a
    Prometheus scraper that cannot send one)."""

    max_connections: int = 512
    """``PIPELINE_SERVE_MAX_CONNECTIONS``: open connections at once; a connection beyond gets 503
    with ``Retry-After`` and is closed (``/health`` included: probes compete for connections)."""

    max_in_flight: int = 128
    """``PIPELINE_SERVE_MAX_IN_FLIGHT``: requests being handled at once, ``/health`` and ``/ready``
    not counted; beyond, 503 with ``Retry-After``."""

    max_buffered_bytes: int = 256 * 1024 * 1024
    """``PIPELINE_SERVE_MAX_BUFFERED_BYTES``: request-body bytes held in memory at once, over all
    requests (a body reserves its declared length on arrival: 32 bodies of the largest size);
    beyond, 503 with ``Retry-After``."""

    body_timeout_s: float = 30.0
    """``PIPELINE_SERVE_BODY_TIMEOUT_S``: seconds a whole request body may take to arrive (a floor
    of about 280 KB/s for the largest body); a slower one gets 408 and the connection is closed."""

    header_timeout_s: float = 10.0
    """``PIPELINE_SERVE_HEADER_TIMEOUT_S``: seconds a new connection (or the next request on a
    kept-alive one) may take to send its request line and headers; then it is closed."""

    keep_alive_s: float = 5.0
    """``PIPELINE_SERVE_KEEP_ALIVE_S``: seconds an idle kept-alive connection stays open."""

    retry_after_s: int = 1
    """``PIPELINE_SERVE_RETRY_AFTER_S``: the ``Retry-After`` a refused client is told to wait."""

    def __post_init__(self) -> None:
        if self.token is not None and (len(self.token) < 16 or any(c.isspace() for c in self.token)):
            raise ConfigError("PIPELINE_SERVE_TOKEN", "at least 16 characters without spaces",
                              f"{len(self.token)} characters")
        for name, low, high in (("max_connections", 1, 1_000_000), ("max_in_flight", 1, 1_000_000),
                                ("max_buffered_bytes", 1024 * 1024, 1 << 40), ("body_timeout_s", 0.1, 3600),
                                ("header_timeout_s", 0.1, 3600), ("keep_alive_s", 0.1, 3600),
                                ("retry_after_s", 0, 3600)):
            _check_range(f"PIPELINE_SERVE_{name.upper()}", getattr(self, name), low, high)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServingSettings:
        env = os.environ if environ is None else environ
        token, token_file = env.get("PIPELINE_SERVE_TOKEN") or None, env.get("PIPELINE_SERVE_TOKEN_FILE")
        if token and token_file:
            raise ConfigError("PIPELINE_SERVE_TOKEN_FILE", "one of PIPELINE_SERVE_TOKEN and PIPELINE_SERVE_TOKEN_FILE",
                              "both set")
        if token_file:
            token = _read_token_file(Path(token_file))
        return cls(
            token=token,
            metrics_open=_env_flag(env, "PIPELINE_SERVE_METRICS_OPEN"),
            **{name: _env_number(env, f"PIPELINE_SERVE_{name.upper()}", type(getattr(cls, name)), getattr(cls, name),
                                 -1e18, 1e18)
               for name in ("max_connections", "max_in_flight", "max_buffered_bytes", "body_timeout_s",
                            "header_timeout_s", "keep_alive_s", "retry_after_s")},
        )


def _read_token_file(path: Path) -> str:
    import stat

    where = f"PIPELINE_SERVE_TOKEN_FILE {path}"
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(where, "a regular file holding the token", "something else")
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(where, "a file only its owner may write", f"mode {stat.S_IMODE(mode):o}")
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(where, "a readable UTF-8 file holding the token", type(exc).__name__) from None
