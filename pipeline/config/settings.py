"""Where things live: the dataset's defaults and the stores (:class:`Settings`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import Literal, get_args
from urllib.parse import unquote, urlparse

from pipeline.errors import ConfigError

#: The Fashion-MNIST file set; any dataset in the same IDX layout (MNIST included) works.
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

#: sha256 of the decompressed content of Fashion-MNIST's two label files: IDX files carry no class
#: names, so these say when the names above apply (other IDX datasets get their label ids).
FASHION_MNIST_LABEL_DIGESTS = frozenset(
    {
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",  # train-labels-idx1-ubyte
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",  # t10k-labels-idx1-ubyte
    }
)

#: ``(channels, height, width)`` of Fashion-MNIST's images: what processed data and registered
#: versions from before the dataset spec held.
FASHION_MNIST_SHAPE = (1, 28, 28)

#: Where Debian's ``dataset-fashion-mnist`` package puts the files.
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

#: The file names a manifest dataset's table may have (any other ``*.parquet`` also is one).
MANIFEST_NAMES = ("labels.csv", "labels.parquet")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")


def dataset_name(source_uri: str) -> str:
    """The source's last path part without an archive suffix; a manifest's, its folder's:
    ``fashion-mnist`` for ``/usr/share/datasets/fashion-mnist`` or ``s3://b/fashion-mnist.tar.gz``."""
    parsed = urlparse(source_uri)
    remote = parsed.scheme not in ("", "file") and len(parsed.scheme) > 1  # not C:\
    path = PurePosixPath(unquote(parsed.path)) if remote or parsed.scheme == "file" else PurePosixPath(source_uri)
    name = path.name
    if name in MANIFEST_NAMES or name.endswith(".parquet"):
        name = path.parent.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or "dataset"
    return name or (parsed.hostname or "" if remote else "") or "dataset"  # s3://bucket: the bucket


Architecture = Literal["resnet_deep", "resnet_small", "resnet_wide", "resnet_large", "simple_cnn", "seed_cnn"]
Optimizer = Literal["adamw", "adam", "sgd"]
Accelerator = Literal["auto", "cpu", "gpu"]
LrSchedule = Literal["onecycle", "cosine", "constant"]
Promotion = Literal["manual", "approval", "auto"]
Strategy = Literal["auto", "ddp", "ddp_spawn"]
Precision = Literal["auto", "32-true", "bf16-mixed", "16-mixed"]
SearchMethod = Literal["grid", "random"]
DatasetFormat = Literal["auto", "idx", "folders", "manifest"]
ColourMode = Literal["auto", "grayscale", "rgb"]
MixedSizes = Literal["reject", "resize"]

ARCHITECTURES: tuple[str, ...] = get_args(Architecture)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
ACCELERATORS: tuple[str, ...] = get_args(Accelerator)
LR_SCHEDULES: tuple[str, ...] = get_args(LrSchedule)
STRATEGIES: tuple[str, ...] = get_args(Strategy)
PRECISIONS: tuple[str, ...] = get_args(Precision)

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

    model_name: str = ""
    """``PIPELINE_MODEL_NAME``: the registered model every run adds versions to. Empty: named
    after the dataset, ``<dataset name>-classifier``: a run registers under its own dataset's
    name, and the commands that act on the registry outside a run (promote, serve, monitor)
    use the default source's (``fashion-mnist-classifier``). See :meth:`model_for`."""

    experiment_name: str = "training_pipeline"
    """``PIPELINE_EXPERIMENT``: the MLflow experiment of the training DAG."""

    source_uri: str = DEBIAN_FASHION_MNIST
    """``PIPELINE_SOURCE_URI``: the default dataset source (folder, ``file://``, ``http(s)://``
    prefix or ``s3://`` prefix)."""

    incoming_uri: str = ""
    """``PIPELINE_INCOMING_URI``: where new images arrive for drift monitoring (default
    ``<home>/new-data``): ``images-idx3-ubyte.gz`` and, optionally, ``labels-idx1-ubyte.gz``."""

    mlflow_ui_url: str = ""
    """``PIPELINE_MLFLOW_UI_URL``: the MLflow UI as a person's browser reaches it, for the links
    from Airflow's task instances (default: the tracking URI when it is an MLflow server, else
    ``make mlflow-ui``'s ``http://127.0.0.1:5000``). See :meth:`mlflow_ui`."""

    alert_to: str = ""
    """``PIPELINE_ALERT_TO``: who hears of a failed task, detected drift, a failed gate and a
    pending approval (e-mail addresses, comma-separated). Empty: no alerts."""

    alert_smtp_conn_id: str = "smtp_default"
    """``PIPELINE_ALERT_SMTP_CONN_ID``: the Airflow SMTP connection alerts go through; none by
    that id: no alerts, and nothing fails."""

    alert_from: str = ""
    """``PIPELINE_ALERT_FROM``: the alerts' sender (default: the connection's ``from_email``)."""

    alert_apprise_conn_id: str = ""
    """``PIPELINE_ALERT_APPRISE_CONN_ID``: an Airflow Apprise connection (its ``config`` extra
    names the services: a webhook, Slack, Teams, ...) that gets every alert too. Empty, or no
    connection by that id: no second channel."""

    approvers: str = ""
    """``PIPELINE_APPROVERS``: who may answer a promotion's approval (Airflow user ids,
    comma-separated; the user name with the simple auth manager). Empty: whoever Airflow lets
    answer it. Read when the DAG is parsed."""

    approval_timeout_hours: str = "72"
    """``PIPELINE_APPROVAL_TIMEOUT_HOURS``: how long a promotion's approval waits for an answer;
    then it counts as **Reject** (production stays; the history says no one answered in time),
    and the runs queued behind it go on. ``0``: it waits until someone answers. Read when the DAG
    is parsed."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        home = Path(env.get("PIPELINE_HOME") or project_root() / ".runtime").resolve()
        return cls(
            home=home,
            storage_uri=env.get("PIPELINE_STORAGE_URI") or str(home / "storage"),
            tracking_uri=env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}",
            artifact_root=env.get("PIPELINE_ARTIFACT_ROOT") or (home / "mlartifacts").as_uri(),
            model_name=env.get("PIPELINE_MODEL_NAME") or "",
            experiment_name=env.get("PIPELINE_EXPERIMENT") or cls.experiment_name,
            source_uri=env.get("PIPELINE_SOURCE_URI") or cls.source_uri,
            incoming_uri=env.get("PIPELINE_INCOMING_URI") or str(home / "new-data"),
            mlflow_ui_url=env.get("PIPELINE_MLFLOW_UI_URL") or "",
            alert_to=env.get("PIPELINE_ALERT_TO") or "",
            alert_smtp_conn_id=env.get("PIPELINE_ALERT_SMTP_CONN_ID") or cls.alert_smtp_conn_id,
            alert_from=env.get("PIPELINE_ALERT_FROM") or "",
            alert_apprise_conn_id=env.get("PIPELINE_ALERT_APPRISE_CONN_ID") or "",
            approvers=env.get("PIPELINE_APPROVERS") or "",
            approval_timeout_hours=env.get("PIPELINE_APPROVAL_TIMEOUT_HOURS") or cls.approval_timeout_hours,
        )

    def approval_timeout(self) -> timedelta | None:
        """:attr:`approval_timeout_hours` as a duration; None: no limit."""
        try:
            hours = float(self.approval_timeout_hours)
        except ValueError:
            hours = -1.0
        if not 0 <= hours <= 24 * 365:
            raise ConfigError(
                "PIPELINE_APPROVAL_TIMEOUT_HOURS", "hours in [0, 8760] (0: no limit)", repr(self.approval_timeout_hours)
            )
        return timedelta(hours=hours) if hours else None

    def mlflow_ui(self) -> str:
        """The MLflow UI's base URL, without a trailing slash or credentials: the setting, else
        the tracking server's, else the local ``make mlflow-ui``."""
        url = self.mlflow_ui_url or (
            self.tracking_uri if self.tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
        )
        parsed = urlparse(url)
        return parsed._replace(netloc=parsed.netloc.rpartition("@")[2], query="", fragment="").geturl().rstrip("/")

    def model_for(self, dataset: str = "") -> str:
        """The registered model's name: ``PIPELINE_MODEL_NAME``, else ``<dataset>-classifier``
        for ``dataset`` (a run's dataset name), else for the default source."""
        return self.model_name or f"{dataset or dataset_name(self.source_uri)}-classifier"

    def for_model(self, name: str) -> Settings:
        """These settings acting on the registered model ``name`` (a run's own, once registered)."""
        return replace(self, model_name=name)

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
            "PIPELINE_HOME": str(self.home),
            "PIPELINE_STORAGE_URI": self.storage_uri,
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "PIPELINE_ARTIFACT_ROOT": self.artifact_root,
            "PIPELINE_MODEL_NAME": self.model_name,
            "PIPELINE_EXPERIMENT": self.experiment_name,
            "PIPELINE_SOURCE_URI": self.source_uri,
            "PIPELINE_INCOMING_URI": self.incoming_uri,
            "PIPELINE_MLFLOW_UI_URL": self.mlflow_ui_url,
            "PIPELINE_ALERT_TO": self.alert_to,
            "PIPELINE_ALERT_SMTP_CONN_ID": self.alert_smtp_conn_id,
            "PIPELINE_ALERT_FROM": self.alert_from,
            "PIPELINE_ALERT_APPRISE_CONN_ID": self.alert_apprise_conn_id,
            "PIPELINE_APPROVERS": self.approvers,
            "PIPELINE_APPROVAL_TIMEOUT_HOURS": self.approval_timeout_hours,
        }
