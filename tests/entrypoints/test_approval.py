"""What an approver reads and what their answer becomes (the operator itself, through a real
API server and scheduler: tests/integration/test_distributed_stack.py)."""

from __future__ import annotations

import datetime

import pytest

from pipeline.config import RunConfig, Settings
from pipeline.entrypoints.approval import PromotionApproval, approval_request, approvers, decision, md
from pipeline.entrypoints.run import run_pipeline
from pipeline.errors import ConfigError

VERSION = {"model_name": "fashion-mnist-classifier", "version": "4", "alias": "candidate", "run_id": "r4"}
EVALUATION = {"run_id": "r4", "test_accuracy": 0.9355, "ece": 0.0123, "worst_class": "Shirt", "worst_class_gap": 0.12}
GATE = {
    "model_name": "fashion-mnist-classifier",
    "version": "4",
    "passed": True,
    "reasons": [],
    "candidate": {"version": "4", "accuracy": 0.9355, "class_recall": {"Shirt": 0.78, "T-shirt/top": 0.88}},
    "production": {"version": "2", "accuracy": 0.9301, "class_recall": {"Shirt": 0.75, "T-shirt/top": 0.9}},
    "policy": {"min_accuracy": 0.8, "max_class_drop": 0.05},
    "test_images": 10000,
}
INFRA = {"latency_ms": {"single_p50": 2.1, "single_p99": 5.3, "batch": 80.0}, "max_probability_difference": 3e-7}


@pytest.fixture
def ui(tmp_path) -> Settings:
    return Settings.from_env({"PIPELINE_HOME": str(tmp_path), "PIPELINE_MLFLOW_UI_URL": "https://mlflow.example"})


def test_the_approver_sees_the_verdict_table_the_figures_and_the_links(ui):
    request = approval_request(VERSION, EVALUATION, GATE, INFRA, ui)
    assert request.subject == "Promote fashion-mnist-classifier version 4 to production?"
    body = request.body
    assert "moves `production` to it (today: version 2)" in body
    assert "| test accuracy | 93.55% | 93.01% |" in body
    assert "| lowest class recall (`Shirt`) | 78.00% | 75.00% |" in body
    assert "Gate: **passed** on 10000 test images" in body and "`min_accuracy` 0.8" in body
    assert "ECE) 0.0123" in body and "p99 5.3 ms" in body
    assert "[MLflow version](https://mlflow.example/#/models/fashion-mnist-classifier/versions/4)" in body
    assert "[Model card](/pipeline/models/fashion-mnist-classifier/versions/4/card)" in body
    assert "[MLflow run](https://mlflow.example/#/runs/r4)" in body


def test_a_first_version_has_no_production_to_compare_with(ui):
    body = approval_request(VERSION, None, {**GATE, "production": None}, None, ui).body
    assert "(today: no production version)" in body and "| test accuracy | 93.55% | - |" in body


def test_names_that_came_with_the_data_are_text_not_markdown(ui):
    """In a code span: no link (written or autolinked), no emphasis, no HTML, and the table holds."""
    names = ["[x](javascript:alert(1))", "http://1249835268/x", "<img src=x>", "a|b"]
    gate = {**GATE, "candidate": {**GATE["candidate"], "class_recall": {name: 0.1 for name in names}}}
    body = approval_request(VERSION, None, gate, None, ui).body
    assert "(`[x](javascript:alert(1))`)" in body  # the lowest recall: the first of the ties
    assert md("a|b\nc") == "`a\\|b c`" and md("x`y") == "``x`y``" and md("`q") == "`` `q ``"
    reasons = approval_request(VERSION, None, {**GATE, "passed": False, "reasons": names}, None, ui).body
    assert "failed: `[x](javascript:alert(1))`; `http://1249835268/x`; `<img src=x>`; `a\\|b`" in reasons


def test_the_answer_becomes_a_small_decision():
    at = datetime.datetime(2026, 12, 3, 12, 0, tzinfo=datetime.UTC)
    response = {
        "chosen_options": ["Reject"],
        "params_input": {"comment": "Shirt recall"},
        "responded_by_user": {"id": "7", "name": "alice"},
        "responded_at": at,
    }
    assert decision(response) == {"decision": "Reject", "comment": "Shirt recall", "by": "alice", "at": at.isoformat()}


def test_an_approval_no_one_answers_in_time_is_a_reject_that_says_so(tmp_path, monkeypatch):
    """Airflow's scheduler answers an approval past its ``response_timeout`` with the operator's
    default: Reject, from no one; the decision says why, for the history."""
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path))
    monkeypatch.setenv("PIPELINE_APPROVAL_TIMEOUT_HOURS", "0.5")
    task = PromotionApproval(task_id="approve")
    assert task.response_timeout == datetime.timedelta(minutes=30) and task.defaults == ["Reject"]
    at = datetime.datetime(2026, 12, 3, 12, 30, tzinfo=datetime.UTC)
    timed_out = {"chosen_options": ["Reject"], "params_input": {"comment": ""}, "responded_by_user": None}
    assert decision({**timed_out, "responded_at": at}, task.response_timeout) == {
        "decision": "Reject",
        "comment": "no answer within 0.5 h",
        "by": "",
        "at": at.isoformat(),
    }
    monkeypatch.setenv("PIPELINE_APPROVAL_TIMEOUT_HOURS", "0")
    untimed = PromotionApproval(task_id="approve")
    assert untimed.response_timeout is None and untimed.defaults is None
    monkeypatch.setenv("PIPELINE_APPROVAL_TIMEOUT_HOURS", "three days")
    with pytest.raises(ConfigError, match=r"^PIPELINE_APPROVAL_TIMEOUT_HOURS: expected hours in \[0, 8760\]"):
        PromotionApproval(task_id="approve")


def test_approvers_are_a_setting(tmp_path):
    home = {"PIPELINE_HOME": str(tmp_path)}
    assert approvers(Settings.from_env(home)) is None
    assert approvers(Settings.from_env({**home, "PIPELINE_APPROVERS": "alice, bob"})) == [
        {"id": "alice", "name": "alice"},
        {"id": "bob", "name": "bob"},
    ]


def test_a_run_without_airflow_refuses_approval_before_doing_anything(settings):
    with pytest.raises(ConfigError, match="^promotion: expected manual or auto without Airflow"):
        run_pipeline(RunConfig(promotion="approval"), settings)
    assert not settings.home.joinpath("storage").exists()
