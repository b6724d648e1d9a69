"""MLflow set-up shared by the stages: the client, the experiment, lineage lookups.

Nothing here runs at import time; each stage calls :func:`tracking_client` with its settings.
"""

from __future__ import annotations

import os
import subprocess
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from pipeline import __version__
from pipeline.config import Settings, project_root

# Run tags that tie a run to its inputs (read by idempotence lookups and by people).
if TYPE_CHECKING:
    from mlflow import MlflowClient

TAG_DATASET = "pipeline.dataset_hash"
TAG_PROCESSED = "pipeline.processed_hash"
TAG_CONFIG = "pipeline.train_config_hash"
TAG_CHECKPOINT = "pipeline.checkpoint_uri"
TAG_CODE = "pipeline.code_version"
TAG_LAST_CHECKPOINT = "pipeline.last_checkpoint_uri"  # written every epoch, for resuming


def tracking_client(settings: Settings) -> MlflowClient:
    import mlflow
    from mlflow import MlflowClient

    if settings.tracking_uri.startswith("sqlite:"):
        settings.ensure_home()  # the embedded store: its owner's only
    mlflow.set_tracking_uri(settings.tracking_uri)
    return MlflowClient(tracking_uri=settings.tracking_uri)


def experiment_id(client: MlflowClient, settings: Settings, name: str | None = None) -> str:
    """An experiment (default: the training DAG's), created on first use."""
    name = name or settings.experiment_name
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # A tracking server chooses its own artifact root; a database store needs one from us.
    server = urlparse(settings.tracking_uri).scheme in ("http", "https")
    location = None if server else f"{settings.artifact_root.rstrip('/')}/{name}"
    return client.create_experiment(name, artifact_location=location)


def find_finished_run(client: MlflowClient, experiment: str, tags: dict[str, str]) -> Any | None:
    """The newest finished run carrying all ``tags``, or None."""
    clauses = [f"tags.`{k}` = '{v}'" for k, v in tags.items()] + ["attributes.status = 'FINISHED'"]
    runs = client.search_runs(
        [experiment], filter_string=" and ".join(clauses), order_by=["attributes.start_time DESC"], max_results=1
    )
    return runs[0] if runs else None


def find_unfinished_runs(client: MlflowClient, experiment: str, tags: dict[str, str]) -> list[Any]:
    """Runs carrying all ``tags`` that did not finish (running, failed or killed), newest first."""
    clauses = [f"tags.`{k}` = '{v}'" for k, v in tags.items()] + ["attributes.status != 'FINISHED'"]
    return client.search_runs(
        [experiment], filter_string=" and ".join(clauses), order_by=["attributes.start_time DESC"], max_results=10
    )


@lru_cache(maxsize=1)
def code_version() -> str:
    """``PIPELINE_CODE_VERSION`` when set (an image has no git: its build passes the commit),
    else the git commit of the checkout (``+dirty`` when modified), else the package version."""
    if pinned := os.environ.get("PIPELINE_CODE_VERSION"):
        return pinned
    root = project_root()
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        ).stdout.strip()
        return f"{sha}+dirty" if dirty else sha
    except (OSError, subprocess.CalledProcessError):
        return __version__
