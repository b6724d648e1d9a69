"""`dag.test()` of drift_monitor after a small real training: a shifted batch updates the asset
that training_pipeline is scheduled on, and the scheduler's own query then picks
training_pipeline; an unshifted batch leaves both alone."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from mail import SmtpSink, send_alerts_to
from recipes import SMALL_RECIPE

from pipeline.data.idx import write_idx

pytestmark = pytest.mark.slow
ASSET = "training-data-drift-detected"


@pytest.fixture(scope="module")
def dags(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(Path(__file__).resolve().parents[2] / "dags"))
    return bag.get_dag("training_pipeline"), bag.get_dag("drift_monitor")


def write_batch(folder: Path, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    folder.mkdir(parents=True)
    write_idx(images, folder / "images-idx3-ubyte.gz")
    if labels is not None:
        write_idx(labels, folder / "labels-idx1-ubyte.gz")
    return folder


def asset_events() -> list[dict]:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = (
            session.query(AssetEvent)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .filter(AssetModel.name == ASSET)
        )
        return [dict(row.extra or {}) for row in rows]


def scheduler_would_start() -> set[str]:
    """DAG ids the scheduler's own query finds ready for an asset-triggered run (read only)."""
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session

    with create_session() as session:
        _, triggered = DagModel.dags_needing_dagruns(session)
        session.rollback()
    return set(triggered)


def unpause(dag_id: str) -> None:
    """As a user does in the UI: Airflow queues asset-triggered runs for active DAGs only."""
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session

    with create_session() as session:
        session.query(DagModel).filter(DagModel.dag_id == dag_id).update({DagModel.is_paused: False})


def states(dag_run) -> dict[str, str]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter(TaskInstance.run_id == dag_run.run_id)
        return {ti.task_id: str(getattr(ti.state, "value", ti.state)) for ti in tis}


@pytest.fixture
def mail(monkeypatch):
    """Alerts on, to an SMTP server on loopback."""
    with SmtpSink() as sink:
        send_alerts_to(monkeypatch, sink)
        yield sink


def test_shifted_batch_asks_for_retraining_and_a_clean_one_does_not(
    dags, small_dataset, real_splits, settings, tmp_path, mail
):
    from pipeline.tracking import tracking_client

    training, monitor = dags
    trained = training.test(
        run_conf={
            "source_uri": str(small_dataset),
            **SMALL_RECIPE,
            "epochs": 1,
            "batch_size": 64,
            "gate_min_accuracy": 0.5,
        }
    )  # one epoch on 1,800 images: about 0.55
    assert trained.state == "success"
    unpause("training_pipeline")
    images = real_splits["t10k"][0][500:2500]  # not in the small dataset's test split
    events_before = len(asset_events())

    clean = monitor.test(run_conf={"batch_uri": str(write_batch(tmp_path / "clean", images))})
    assert clean.state == "success"
    assert states(clean) == {"check_drift": "success", "drift_found": "success", "request_retraining": "skipped"}
    assert len(asset_events()) == events_before
    assert "training_pipeline" not in scheduler_would_start()
    assert mail.messages == []  # a green training run and a clean batch: nothing to say

    rotated = write_batch(tmp_path / "rotated", np.rot90(images, axes=(1, 2)).copy())
    shifted = monitor.test(run_conf={"batch_uri": str(rotated)})
    assert shifted.state == "success"
    assert states(shifted)["request_retraining"] == "success"
    events = asset_events()
    assert len(events) == events_before + 1
    assert any(reason.startswith("bbox_") for reason in events[-1]["reasons"]), events[-1]
    assert Path(events[-1]["report_uri"]).read_text().count("DRIFT") >= 1
    assert "training_pipeline" in scheduler_would_start()
    # The people watching the model hear of it once, with the reasons and the report's link.
    [subject] = mail.subjects()
    assert subject.startswith("[image-pipeline] drift in new data for ") and "bbox_" in subject
    # Links a mail client can open: Airflow's own URL in front of the plugin's pages.
    assert re.search(r'href="https?://[^"]+/pipeline/dags/drift_monitor/dagRuns/[^"]+/check_drift/report"', mail.body())

    runs = tracking_client(settings).search_runs(
        [tracking_client(settings).get_experiment_by_name("drift_monitor").experiment_id]
    )
    assert sorted(run.data.tags["drifted"] for run in runs) == ["false", "true"]


def test_broken_batch_fails_the_check_at_once_and_asks_for_nothing(dags, pipeline_home, tmp_path, mail):
    from pipeline.config import Settings
    from pipeline.errors import DataValidationError
    from pipeline.monitoring.monitor import monitor as check
    from pipeline.storage import storage_for

    _, monitor = dags
    folder = write_batch(tmp_path / "blank", np.zeros((300, 28, 28), dtype=np.uint8))
    settings = Settings.from_env()
    with pytest.raises(
        DataValidationError, match=f"suite incoming_profile, .*pixel_max.* in {folder}/images-idx3-ubyte.gz"
    ):
        check(str(folder), storage_for(settings), settings)

    events_before = len(asset_events())
    run = monitor.test(run_conf={"batch_uri": str(folder)})
    assert run.state == "failed" and states(run)["check_drift"] == "failed"
    assert len(asset_events()) == events_before
    # One alert for the failed task (bad input is not retried), its error in one line.
    [subject] = mail.subjects()
    assert subject.startswith("[image-pipeline] drift_monitor.check_drift failed: suite incoming_profile")
    assert f"{folder}/images-idx3-ubyte.gz" in mail.body() and run.run_id in mail.body()
