"""Alerts through a real SMTP server and a webhook (through Apprise) on loopback: what a person
receives, and that nothing is sent or fails where alerts are not configured. (From real DAG runs: tests/dags/test_training_dag.py
and tests/dags/test_drift_monitor_dag.py.)"""

from __future__ import annotations

import pytest
from mail import RECIPIENT, SmtpSink, WebhookSink, send_alerts_to
from services import free_port

from pipeline.config import Settings
from pipeline.entrypoints import alerts
from pipeline.errors import GateFailedError

DRIFT = {
    "batch_hash": "b" * 64,
    "batch_size": 2000,
    "drifted": True,
    "reasons": ["bbox_height: PSI 4.1 > 0.25", "prediction share: PSI 1.2 > 0.25"],
    "report_uri": "/s/drift/b/v1/report.html",
    "model_name": "fashion-mnist-classifier",
    "model_version": "1",
    "model_alias": "production",
    "run_id": "r123",
}


@pytest.fixture
def sink(monkeypatch):
    with SmtpSink() as server:
        send_alerts_to(monkeypatch, server)
        yield server


def test_a_failed_task_sends_its_dag_run_task_and_one_line_error(sink):
    error = ValueError("train-images-idx3-ubyte.gz: expected magic 2051, found 2049\nTraceback ...")
    alert = alerts.task_failed("training_pipeline", "manual__1", "validate", 1, error, "http://af/dags/x/log")
    assert alerts.send(alert, Settings.from_env())
    [message] = sink.messages
    assert message["To"] == RECIPIENT
    assert message["Subject"] == (
        "[image-pipeline] training_pipeline.validate failed: train-images-idx3-ubyte.gz: expected magic 2051, found 2049"
    )
    body = sink.body()
    assert "manual__1" in body and "Traceback" not in body and 'href="http://af/dags/x/log"' in body


def test_a_failed_gate_says_which_version_and_why(sink):
    error = GateFailedError(
        "m version 2 against production v1", "a model that meets the promotion policy", "accuracy 0.1 < 0.8"
    )
    link = [("Model version", "https://mlflow/#/models/m/versions/2")]
    alert = alerts.task_failed("training_pipeline", "r", "gate", 1, error, "http://af/log", link)
    assert alert.kind == "gate_failed"
    assert alerts.send(alert, Settings.from_env())
    assert sink.subjects() == ["[image-pipeline] gate refused m version 2 against production v1: accuracy 0.1 < 0.8"]
    assert "https://mlflow/#/models/m/versions/2" in sink.body()


def test_drift_names_the_model_the_reasons_and_links_the_report(sink):
    settings = Settings.from_env()
    assert alerts.send(alerts.drift_detected(DRIFT, "drift_monitor", "scheduled__1", settings), settings)
    [subject] = sink.subjects()
    assert subject.startswith("[image-pipeline] drift in new data for fashion-mnist-classifier version 1 (production)")
    body = sink.body()
    assert "prediction share: PSI 1.2" in body and "/pipeline/dags/drift_monitor/dagRuns/scheduled__1/" in body
    assert f"{settings.mlflow_ui()}/#/runs/r123" in body


def test_what_came_with_the_data_is_text_in_the_message_not_markup_or_a_template(sink):
    error = ValueError('class folder "<img src=x onerror=alert(1)>" {{ conf }}: expected images, found none')
    alerts.send(alerts.task_failed("d", "r", "t", 1, error, "http://af/log"), Settings.from_env())
    body = sink.body()
    assert "<img" not in body and "&lt;img src=x" in body and "{{ conf }}" in body


def test_one_line_subjects_whatever_the_error(sink):
    alert = alerts.task_failed("d", "r", "t", 1, RuntimeError("x" * 500), "http://af/log")
    assert len(alert.subject) == alerts.SUBJECT_LIMIT and "\n" not in alert.subject


def test_without_recipients_or_connection_nothing_is_sent_and_nothing_fails(monkeypatch):
    alert = alerts.task_failed("d", "r", "t", 1, ValueError("x"), "http://af/log")
    with SmtpSink() as server:
        monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", server.connection())
        monkeypatch.delenv("PIPELINE_ALERT_TO", raising=False)
        assert not alerts.send(alert, Settings.from_env())  # no one to tell
        monkeypatch.setenv("PIPELINE_ALERT_TO", RECIPIENT)
        monkeypatch.setenv("PIPELINE_ALERT_SMTP_CONN_ID", "smtp_alerts")  # a connection nobody defined
        assert not alerts.send(alert, Settings.from_env())
        assert server.messages == []


def test_a_mail_server_that_does_not_answer_is_logged_not_raised(monkeypatch):
    import logging

    # Airflow's logging set-up (another test may have run it) can disable loggers made before
    # it: listen on the module's own logger.
    logger = logging.getLogger(alerts.__name__)
    monkeypatch.setattr(logger, "disabled", False)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        dead = SmtpSink()
        dead.port = free_port()  # nothing listens there
        monkeypatch.setenv("PIPELINE_ALERT_TO", RECIPIENT)
        monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", dead.connection())
        alert = alerts.task_failed("d", "r", "t", 1, ValueError("x"), "http://af/log")
        assert not alerts.send(alert, Settings.from_env())
    finally:
        logger.removeHandler(handler)
    assert any("task_failed not sent through smtp_default" in r.getMessage() for r in records), records


@pytest.fixture
def webhook(monkeypatch):
    """The second channel: an Airflow Apprise connection whose service is a webhook on loopback."""
    with WebhookSink() as server:
        monkeypatch.setenv("AIRFLOW_CONN_APPRISE_ALERTS", server.connection())
        monkeypatch.setenv("PIPELINE_ALERT_APPRISE_CONN_ID", "apprise_alerts")
        yield server


def test_the_webhook_gets_the_same_alert_as_the_mail(sink, webhook):
    settings = Settings.from_env()
    assert alerts.send(alerts.drift_detected(DRIFT, "drift_monitor", "scheduled__1", settings), settings)
    [mail], [post] = sink.subjects(), webhook.posts
    assert post["path"] == "/alerts" and post["title"] == mail and post["type"] == "warning"
    assert "prediction share: PSI 1.2 > 0.25" in post["message"]
    assert "/pipeline/dags/drift_monitor/dagRuns/scheduled__1/" in post["message"]


def test_the_webhook_alone_is_enough_and_a_failed_task_is_a_failure(webhook, monkeypatch):
    monkeypatch.delenv("PIPELINE_ALERT_TO", raising=False)
    error = ValueError("train.csv, row 7: expected a label, found none")
    assert alerts.send(alerts.task_failed("d", "r", "t", 2, error, "http://af/log"), Settings.from_env())
    [post] = webhook.posts
    assert post["type"] == "failure" and post["title"].startswith("[image-pipeline] d.t failed: ")
    assert "train.csv, row 7: expected a label, found none" in post["message"] and "http://af/log" in post["message"]


def test_a_webhook_that_does_not_answer_or_no_connection_sends_nothing_and_fails_nothing(monkeypatch):
    alert = alerts.task_failed("d", "r", "t", 1, ValueError("x"), "http://af/log")
    monkeypatch.delenv("PIPELINE_ALERT_TO", raising=False)
    monkeypatch.setenv("PIPELINE_ALERT_APPRISE_CONN_ID", "apprise_nobody_defined")
    assert not alerts.send(alert, Settings.from_env())
    dead = WebhookSink()  # never started: nothing listens on its port
    monkeypatch.setenv("AIRFLOW_CONN_APPRISE_ALERTS", dead.connection())
    monkeypatch.setenv("PIPELINE_ALERT_APPRISE_CONN_ID", "apprise_alerts")
    assert not alerts.send(alert, Settings.from_env())
