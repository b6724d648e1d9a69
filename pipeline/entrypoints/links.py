"""Links from Airflow's task instances to what the tasks made: the MLflow run, the model version,
its model card, the data report and the drift report.

The Airflow plugin (``plugins/pipeline_plugin.py``) puts them on every task instance as global
extra links and resolves each on the API server with :func:`task_link`, from the task's return
value (its XCom, a reference of :mod:`pipeline.refs`). A link that does not apply to a task, or
whose task has not returned yet, is the empty string: the UI shows it disabled, never broken.

MLflow runs and versions link to the MLflow UI (:meth:`~pipeline.config.Settings.mlflow_ui`).
The reports and the model card are served by the plugin's own app (:data:`APP_PREFIX`), behind
Airflow's login: the data report lives in the pipeline's storage, which a browser cannot reach,
and the app finds the page from the task instance named in the path, never from a path a client
sends (:func:`report_key`).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from pipeline.config import Settings
from pipeline.errors import ReferenceNotFoundError
from pipeline.storage import Storage

MLFLOW_RUN = "MLflow run"
MODEL_VERSION = "Model version"
MODEL_CARD = "Model card"
DATA_REPORT = "Data report"
DRIFT_REPORT = "Drift report"
NAMES = (MLFLOW_RUN, MODEL_VERSION, MODEL_CARD, DATA_REPORT, DRIFT_REPORT)

APP_PREFIX = "/pipeline"
"""Where the plugin's app is mounted on the API server."""

_VERSION_TASKS = {
    ("training_pipeline", "register"),
    ("training_pipeline", "export"),
    ("training_pipeline", "gate"),
    ("training_pipeline", "infra_validate"),
    ("training_pipeline", "promote"),
    ("promote_model", "promote"),
    ("rollback_model", "rollback"),
}
#: The ``(dag_id, task_id)`` pairs each link applies to.
TASKS: dict[str, set[tuple[str, str]]] = {
    MLFLOW_RUN: {("training_pipeline", "train"), ("training_pipeline", "evaluate")},
    MODEL_VERSION: _VERSION_TASKS,
    MODEL_CARD: _VERSION_TASKS,
    DATA_REPORT: {("training_pipeline", "validate")},
    DRIFT_REPORT: {("drift_monitor", "check_drift")},
}
#: Storage prefixes a report may be served from, by link.
REPORT_PREFIXES = {DATA_REPORT: "reports/", DRIFT_REPORT: "drift/"}


def app_base() -> str:
    """The API server's path prefix (``[api] base_url``'s path), for links to the app's pages."""
    from urllib.parse import urlparse

    from airflow.configuration import conf

    return urlparse(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")


def applies(name: str, dag_id: str, task_id: str) -> bool:
    return (dag_id, task_id) in TASKS.get(name, set())


def _version(result: dict[str, Any]) -> tuple[str, str] | None:
    """The model version a task's result names: ``register``'s, the gate's and infra
    validation's ``version``, a promotion's or rollback's ``to_version``."""
    name, version = result.get("model_name"), result.get("version") or result.get("to_version")
    return (str(name), str(version)) if name and version else None


def task_link(
    name: str,
    dag_id: str,
    run_id: str,
    task_id: str,
    map_index: int,
    result: Any,
    settings: Settings,
    app_base: str = "",
) -> str:
    """The URL of link ``name`` on a task instance whose return value is ``result`` (None: not
    returned yet), or ``""`` where it does not apply. ``app_base`` is the API server's path
    prefix (``[api] base_url``'s path) for the plugin app's pages."""
    if not applies(name, dag_id, task_id) or not isinstance(result, dict):
        return ""
    if name == MLFLOW_RUN:
        run = result.get("run_id")
        return f"{settings.mlflow_ui()}/#/runs/{quote(str(run), safe='')}" if run else ""
    if name in (MODEL_VERSION, MODEL_CARD):
        found = _version(result)
        if found is None:
            return ""
        model, version = (quote(part, safe="") for part in found)
        if name == MODEL_VERSION:
            return f"{settings.mlflow_ui()}/#/models/{model}/versions/{version}"
        return f"{app_base}{APP_PREFIX}/models/{model}/versions/{version}/card"
    if not result.get("report_uri"):
        return ""
    path = "/".join(quote(part, safe="") for part in ("dags", dag_id, "dagRuns", run_id, "taskInstances", task_id))
    return f"{app_base}{APP_PREFIX}/{path}/report" + (f"?map_index={map_index}" if map_index >= 0 else "")


def report_link(dag_id: str, task_id: str) -> str | None:
    """The report link of a task (:data:`DATA_REPORT`, :data:`DRIFT_REPORT`), or None."""
    return next((name for name in REPORT_PREFIXES if applies(name, dag_id, task_id)), None)


def report_key(dag_id: str, task_id: str, result: Any, storage: Storage) -> str:
    """The storage key of the HTML report a task instance returned (``validate``'s data report,
    the monitor's drift report). Only a page under the link's own storage prefix is served: the
    URI comes from the task's result, and nothing outside the reports is reachable by it."""
    name = report_link(dag_id, task_id)
    uri = result.get("report_uri") if isinstance(result, dict) else None
    if name is None or not isinstance(uri, str):
        raise ReferenceNotFoundError(f"{dag_id}.{task_id}", "a task that returned a report", "none")
    base = storage.uri("")
    key = uri[len(base) :].lstrip("/") if uri.startswith(base) else ""
    parts = key.split("/")
    if not key.startswith(REPORT_PREFIXES[name]) or not key.endswith(".html") or ".." in parts or "" in parts:
        raise ReferenceNotFoundError(f"{dag_id}.{task_id}", "a report page in this pipeline's storage", repr(uri))
    return key


def model_card_page(settings: Settings, name: str, version: str) -> str:
    """The HTML model card of registered version ``version`` of ``name``: the one evaluation
    wrote into the version's training run. One line for a version or card that is not there; a
    registry that does not answer is a :class:`~pipeline.errors.RegistryUnavailableError`."""
    import tempfile
    from pathlib import Path

    from mlflow.exceptions import MlflowException

    from pipeline.evaluation.evaluate import MODEL_CARD_HTML
    from pipeline.registry.outage import is_unavailable, registry_reachable
    from pipeline.tracking import tracking_client

    client = tracking_client(settings)
    with registry_reachable(settings):
        try:
            found = client.get_model_version(name, version)
            with tempfile.TemporaryDirectory(prefix="model-card-") as tmp:
                return Path(client.download_artifacts(str(found.run_id), MODEL_CARD_HTML, tmp)).read_text()
        except (MlflowException, OSError) as exc:
            if is_unavailable(exc):
                raise
            raise ReferenceNotFoundError(
                f"model {name} version {version}", "a registered version with a model card", "none"
            ) from exc
