"""The links on Airflow's task instances: which task gets which, where each points, and which
pages the plugin's app may serve. (Through a real API server: tests/integration/test_distributed_stack.py.)"""

from __future__ import annotations

import pytest

from pipeline.config import Settings
from pipeline.entrypoints import links
from pipeline.entrypoints.links import (
    DATA_REPORT,
    DRIFT_REPORT,
    MLFLOW_RUN,
    MODEL_CARD,
    MODEL_VERSION,
    NAMES,
    model_card_page,
    report_key,
    task_link,
)
from pipeline.errors import ReferenceNotFoundError

RUN = "manual__2026-12-03T10:00:00.123+00:00"
TRAINED = {"run_id": "abc123", "checkpoint_uri": "/x/best.ckpt", "metrics": {"val_accuracy": 0.9}}
VERSION = {"model_name": "digits-classifier", "version": "3", "alias": "candidate", "run_id": "abc123"}
PROMOTED = {"moved": True, "alias": "production", "from_version": "2", "to_version": "3", "model_name": "m x"}


@pytest.fixture
def ui(tmp_path) -> Settings:
    return Settings.from_env({"PIPELINE_HOME": str(tmp_path), "PIPELINE_MLFLOW_UI_URL": "https://mlflow.example/"})


def link(name: str, task_id: str, result, settings: Settings, dag_id: str = "training_pipeline", **kw) -> str:
    return task_link(name, dag_id, RUN, task_id, kw.get("map_index", -1), result, settings, kw.get("base", ""))


def test_each_task_gets_the_links_of_what_it_made(ui):
    assert link(MLFLOW_RUN, "train", TRAINED, ui) == "https://mlflow.example/#/runs/abc123"
    assert link(MLFLOW_RUN, "evaluate", {"run_id": "abc123", "test_accuracy": 0.9}, ui).endswith("/#/runs/abc123")
    assert (
        link(MODEL_VERSION, "register", VERSION, ui) == "https://mlflow.example/#/models/digits-classifier/versions/3"
    )
    assert link(MODEL_CARD, "gate", VERSION, ui) == "/pipeline/models/digits-classifier/versions/3/card"
    # A promotion names the version it moved to; names are quoted.
    assert link(MODEL_VERSION, "promote", PROMOTED, ui, dag_id="promote_model").endswith("/#/models/m%20x/versions/3")
    assert link(DATA_REPORT, "validate", {"report_uri": "/s/reports/h/index.html"}, ui) == (
        "/pipeline/dags/training_pipeline/dagRuns/manual__2026-12-03T10%3A00%3A00.123%2B00%3A00"
        "/taskInstances/validate/report"
    )
    drift = link(DRIFT_REPORT, "check_drift", {"report_uri": "x"}, ui, dag_id="drift_monitor", map_index=2, base="/af")
    assert drift.startswith("/af/pipeline/dags/drift_monitor/") and drift.endswith("/check_drift/report?map_index=2")


@pytest.mark.parametrize("name", NAMES)
def test_a_link_that_does_not_apply_is_empty_not_broken(ui, name):
    every_key = {**TRAINED, **VERSION, "report_uri": "/s/reports/h/index.html"}
    applying = [task for dag, task in links.TASKS[name]]
    for task_id in ("acquire", "preprocess", "tune_trial", "approve"):
        assert task_id not in applying and link(name, task_id, every_key, ui) == ""
    # Not returned yet (running, failed) or returned something else: empty too.
    for result in (None, "a string", {}, {"model_name": "m"}):
        assert all(link(name, task, result, ui, dag_id=dag) == "" for dag, task in links.TASKS[name])


def test_the_mlflow_ui_follows_the_tracking_server_without_its_credentials(tmp_path):
    home = {"PIPELINE_HOME": str(tmp_path)}
    assert Settings.from_env(home).mlflow_ui() == "http://127.0.0.1:5000"  # `make mlflow-ui` on the local store
    server = Settings.from_env({**home, "MLFLOW_TRACKING_URI": "https://ops:secret@mlflow.internal:5000/"})
    assert server.mlflow_ui() == "https://mlflow.internal:5000"
    assert link(MLFLOW_RUN, "train", TRAINED, server) == "https://mlflow.internal:5000/#/runs/abc123"


def test_only_a_report_page_of_the_pipelines_storage_is_served(storage):
    page = storage.put_bytes(b"<html>report</html>", "reports/abc/suites-1/index.html")
    assert (
        report_key("training_pipeline", "validate", {"report_uri": page}, storage) == "reports/abc/suites-1/index.html"
    )
    drift = storage.put_bytes(b"<html>drift</html>", "drift/abc/v3/report.html")
    assert report_key("drift_monitor", "check_drift", {"report_uri": drift}, storage) == "drift/abc/v3/report.html"
    refused = [
        ("training_pipeline", "validate", {"report_uri": drift}),  # another link's page
        ("training_pipeline", "validate", {"report_uri": "/etc/passwd"}),
        ("training_pipeline", "validate", {"report_uri": storage.uri("reports/../../secret.html")}),
        ("training_pipeline", "validate", {"report_uri": storage.uri("reports/abc/model.ckpt")}),
        ("training_pipeline", "validate", {"report_uri": storage.uri("") + "-other/reports/a/index.html"}),
        ("training_pipeline", "train", {"report_uri": page}),  # a task that makes no report
        ("training_pipeline", "validate", None),  # not returned yet
    ]
    for dag_id, task_id, result in refused:
        with pytest.raises(ReferenceNotFoundError, match=f"^{dag_id}.{task_id}: expected "):
            report_key(dag_id, task_id, result, storage)


def test_the_card_of_a_version_that_is_not_there_is_one_line(settings):
    with pytest.raises(ReferenceNotFoundError, match="^model nothing-classifier version 1: expected a registered"):
        model_card_page(settings, "nothing-classifier", "1")
