"""What a person wants to see after a run: the model version, its accuracy, and where to look."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from pipeline.config import Settings
from pipeline.errors import ReferenceNotFoundError
from pipeline.tracking import tracking_client


def ui_commands(settings: Settings) -> dict[str, str]:
    """Commands that open the Airflow UI and the MLflow UI on this checkout's stores."""
    if urlparse(settings.tracking_uri).scheme in ("http", "https"):
        mlflow_ui = f"open {settings.tracking_uri}"
    else:
        mlflow_ui = "make mlflow-ui   (then http://127.0.0.1:5000)"
    return {"airflow_ui": "make airflow-ui   (then http://127.0.0.1:8080)", "mlflow_ui": mlflow_ui}


def model_summary(settings: Settings, alias: str = "candidate") -> dict[str, Any]:
    """The version behind ``alias`` with its run's test accuracy."""
    from mlflow.exceptions import MlflowException

    client = tracking_client(settings)
    try:
        version = client.get_model_version_by_alias(settings.model_for(), alias)
    except MlflowException as exc:
        raise ReferenceNotFoundError(
            f"model {settings.model_for()}", f"a version with alias {alias!r} in {settings.tracking_uri}", "none"
        ) from exc
    if not version.run_id:
        raise ReferenceNotFoundError(
            f"model {settings.model_for()} version {version.version}",
            "a version registered from a training run",
            "none",
        )
    run = client.get_run(version.run_id)
    return {
        "model_name": settings.model_for(),
        "version": str(version.version),
        "aliases": sorted(version.aliases),
        "alias": alias,
        "run_id": version.run_id,
        "test_accuracy": run.data.metrics.get("test_accuracy"),
        "tracking_uri": settings.tracking_uri,
        **ui_commands(settings),
    }


def format_summary(summary: dict[str, Any]) -> str:
    accuracy = summary["test_accuracy"]
    lines = [
        f"test accuracy:    {accuracy:.4f}" if accuracy is not None else "test accuracy:    (not evaluated)",
        f"MLflow run id:    {summary['run_id']}",
        f"registered model: {summary['model_name']}",
        f"version:          {summary['version']}",
        f"alias:            {summary['alias']}   (all aliases: {', '.join(summary['aliases'])})",
        f"MLflow store:     {summary['tracking_uri']}",
        f"Airflow UI:       {summary['airflow_ui']}",
        f"MLflow UI:        {summary['mlflow_ui']}",
    ]
    return "\n".join(lines)


def format_run(result: dict[str, Any]) -> str:
    version, evaluation, trained = result["register"], result["evaluate"], result["train"]
    return "\n".join(
        [
            f"dataset:          {result['acquire']['dataset_hash']} ({len(result['acquire']['fetched'])} files fetched)",
            f"data report:      {result['validate']['report_uri']}",
            f"test accuracy:    {evaluation['test_accuracy']:.4f}",
            f"MLflow run id:    {trained['run_id']}{' (reused)' if trained['reused'] else ''}",
            f"registered model: {version['model_name']}",
            f"version:          {version['version']}{'' if version['created'] else ' (already registered)'}",
            f"alias:            {version['alias']}",
            "gate:             passed"
            + (
                f" (production v{result['gate']['production']['version']}: "
                f"{result['gate']['production']['accuracy']:.4f})"
                if result["gate"]["production"]
                else " (no production version yet: accuracy floor only)"
            ),
            "staging:          version " + version["version"] + " (served and checked: infra validation passed)",
            "production:       "
            + (
                f"version {result['promote']['to_version']}"
                if result.get("promote")
                else "unchanged (promote with `pipeline promote`, or the promote_model DAG)"
            ),
        ]
    )
