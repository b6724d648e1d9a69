"""`dag.test()` of training_pipeline on a small real subset (2,000 training, 500 test images)."""

from __future__ import annotations

from pathlib import Path

import pytest
from defects import DEFECTS, broken_copy
from mail import SmtpSink, send_alerts_to
from recipes import SMALL_RECIPE
from services import RecordingServer

from pipeline.config import Settings
from pipeline.tracking import tracking_client

pytestmark = pytest.mark.slow
# One epoch on 1,800 images reaches about 0.7: the gate's floor is lowered to match.
QUICK = {**SMALL_RECIPE, "epochs": 1, "batch_size": 64, "gate_min_accuracy": 0.5}


@pytest.fixture(scope="module")
def training_dag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(Path(__file__).resolve().parents[2] / "dags")).get_dag("training_pipeline")


def task_states(dag_run) -> dict[str, str]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter(
            TaskInstance.dag_id == dag_run.dag_id, TaskInstance.run_id == dag_run.run_id
        )
        return {ti.task_id: str(getattr(ti.state, "value", ti.state)) for ti in tis}


def registered_versions(settings: Settings, name: str = "") -> list:
    client = tracking_client(settings)
    return client.search_model_versions(f"name = '{name or settings.model_for()}'")


def test_two_runs_register_one_candidate_and_download_once(training_dag, small_dataset, settings):
    with RecordingServer(small_dataset) as server:
        first = training_dag.test(run_conf={"source_uri": server.url, **QUICK})
        assert first.state == "success", task_states(first)
        assert sum(method == "GET" for method, _ in server.requests) == 4

        server.requests.clear()
        second = training_dag.test(run_conf={"source_uri": server.url, **QUICK})
        assert second.state == "success", task_states(second)
        assert [method for method, _ in server.requests] == ["HEAD"] * 4

    name = "127.0.0.1-classifier"  # named after the source: here its host, the URL having no path
    versions = registered_versions(settings, name)
    assert len(versions) == 1
    client = tracking_client(settings)
    candidate = client.get_model_version_by_alias(name, "candidate")
    assert candidate.run_id == versions[0].run_id
    run = client.get_run(candidate.run_id)
    assert run.data.tags["airflow.dag_id"] == "training_pipeline"
    assert run.data.tags["airflow.run_id"] == first.run_id
    assert run.data.metrics["test_accuracy"] > 0.5  # one epoch on 1,800 images; chance is 0.1
    # The export task left both variants with the run and their verdicts on the version.
    for variant in ("onnx", "onnx_int8"):
        assert f"export.{variant}.verdict" in candidate.tags and f"{variant}_agreement" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id, "onnx")} >= {
        "onnx/model.onnx",
        "onnx/model.int8.onnx",
    }


def test_force_param_retrains_on_purpose(training_dag, small_dataset, settings):
    conf = {"source_uri": str(small_dataset), **QUICK}
    assert training_dag.test(run_conf=conf).state == "success"
    assert training_dag.test(run_conf={**conf, "force": True}).state == "success"
    assert len(registered_versions(settings)) == 2


@pytest.mark.parametrize("defect", DEFECTS, ids=lambda d: d.name)
def test_bad_input_stops_at_the_stage_that_found_it(training_dag, small_dataset, settings, tmp_path, defect):
    folder = broken_copy(small_dataset, tmp_path / "fashion-mnist", defect)
    dag_run = training_dag.test(run_conf={"source_uri": str(folder), **QUICK})
    states = task_states(dag_run)
    assert dag_run.state == "failed"
    order = ["acquire", "validate", "preprocess", "train", "evaluate", "register", "export", "gate", "infra_validate"]
    stop = order.index(defect.stage)
    assert all(states[t] == "success" for t in order[:stop]), states
    assert states[defect.stage] == "failed", states
    assert all(states[t] == "upstream_failed" for t in order[stop + 1 :]), states
    assert registered_versions(settings) == []


def test_tuning_maps_one_trial_per_candidate_and_trains_with_the_best(training_dag, small_dataset, settings):
    conf = {
        "source_uri": str(small_dataset),
        **QUICK,
        "tune": True,
        "tune_epochs": 1,
        "tune_sample_cap": 1000,
        "tune_space": {"learning_rate": [0.0001, 0.004]},
    }
    dag_run = training_dag.test(run_conf=conf)
    assert dag_run.state == "success", task_states(dag_run)

    client = tracking_client(settings)
    runs = client.search_runs([client.get_experiment_by_name(settings.experiment_name).experiment_id])
    [study] = [r for r in runs if "pipeline.tune_study" in r.data.tags]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == study.info.run_id]
    assert sorted(float(t.data.params["learning_rate"]) for t in trials) == [0.0001, 0.004]
    assert all(int(t.data.params["data_train"]) < 1000 for t in trials)  # the capped sample
    best = max(trials, key=lambda t: t.data.metrics["best_val_accuracy"])
    assert study.data.tags["pipeline.best_trial_run"] == best.info.run_id
    # The full training (the registered candidate) uses the winner's learning rate, all the data.
    candidate = client.get_model_version_by_alias(settings.model_for(), "candidate")
    final = client.get_run(candidate.run_id)
    assert final.data.params["learning_rate"] == best.data.params["learning_rate"]
    assert int(final.data.params["data_train"]) > int(best.data.params["data_train"])
    assert "mlflow.parentRunId" not in final.data.tags


def test_staged_deployment_through_the_dags(small_dataset, settings, airflow_db, monkeypatch):
    """promotion auto reaches production; a model that learned nothing stops at the gate; a run
    with promotion manual stops at staging until promote_model; rollback_model goes back."""
    from airflow.dag_processing.dagbag import DagBag

    from pipeline.registry.history import PRODUCTION, STAGING, alias_version
    from pipeline.registry.promote import history

    def run(dag_id: str, conf: dict):
        # A freshly parsed DAG per run, as a worker has: in one process, dag.test() carries a
        # run's conf over into the next run's task params.
        dag = DagBag(dag_folder=str(Path(__file__).resolve().parents[2] / "dags")).get_dag(dag_id)
        return dag.test(run_conf=conf)

    client = tracking_client(settings)
    name = settings.model_for()
    # About 50 test images a class: single classes move by 0.15 between such small models.
    conf = {"source_uri": str(small_dataset), **QUICK, "gate_max_class_drop": 0.3}

    first = run("training_pipeline", {**conf, "promotion": "auto"})
    assert first.state == "success", task_states(first)
    assert alias_version(client, name, PRODUCTION) == "1"

    with SmtpSink() as mail:
        send_alerts_to(monkeypatch, mail)
        worse = run("training_pipeline", {**conf, "learning_rate": 1e-7, "force": True})
    states = task_states(worse)
    assert worse.state == "failed" and states["gate"] == "failed", states
    # One alert, for the gate (the tasks it stopped are not failures of their own).
    [subject] = mail.subjects()
    assert subject.startswith(f"[image-pipeline] gate refused {name} version 2 against production v1: "), subject
    assert f"#/models/{name}/versions/2" in mail.body()
    monkeypatch.delenv("PIPELINE_ALERT_TO")
    assert states["infra_validate"] == states["promote"] == "upstream_failed", states
    assert client.get_model_version(name, "2").tags["gate.decision"] == "failed"
    assert alias_version(client, name, PRODUCTION) == alias_version(client, name, STAGING) == "1"

    better = run("training_pipeline", {**conf, "epochs": 2, "force": True})
    states = task_states(better)
    assert better.state == "success", states
    assert states["approve"] == states["promote"] == states["reject"] == "skipped", states  # promotion manual
    assert alias_version(client, name, STAGING) == "3" and alias_version(client, name, PRODUCTION) == "1"

    promoted = run("promote_model", {"reason": "reviewed the model card"})
    assert promoted.state == "success", task_states(promoted)
    assert alias_version(client, name, PRODUCTION) == "3"
    rolled = run("rollback_model", {"reason": "complaints"})
    assert rolled.state == "success", task_states(rolled)
    assert alias_version(client, name, PRODUCTION) == "1"

    moves = [
        (e.action, e.from_version, e.to_version, e.actor.split(" via ")[-1].split("/")[0], e.reason)
        for e in history(settings)
        if e.alias == PRODUCTION
    ]
    assert moves == [
        ("promote", None, "1", "airflow:training_pipeline", "promotion auto: passed the gate and infra validation"),
        ("promote", "1", "3", "airflow:promote_model", "reviewed the model card"),
        ("rollback", "3", "1", "airflow:rollback_model", "complaints"),
    ]
