"""``promote_model`` with its Param ``approval``: the run waits for a second person, whose answer
(through Airflow's own human-in-the-loop update, as the REST API and the Models page give it)
decides; without it, the run promotes at once as before. Real ``dag.test()`` runs on the tests'
metadata DB and a real MLflow store; the answer comes from another thread, as from an API server
sharing the DB."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from mail import SmtpSink, send_alerts_to

from pipeline.registry.history import PRODUCTION, STAGING, alias_version, read_history
from pipeline.registry.promote import move_alias, promote
from pipeline.tracking import tracking_client

pytestmark = pytest.mark.slow

DAGS = Path(__file__).resolve().parents[2] / "dags"


@pytest.fixture
def staged(settings, airflow_db, tmp_path):
    """v1 at production, v2 at staging, both through the gate and infra validation."""
    client = tracking_client(settings)
    name = settings.model_for()
    client.create_registered_model(name)
    for number in ("1", "2"):
        client.create_model_version(name, str(tmp_path / "model"), run_id=None)
        gated_against = "none" if number == "1" else "1"
        tags = {"gate.decision": "passed", "gate.production_version": gated_against, "infra_validation": "passed"}
        for key, value in {**tags, "test_accuracy": "0.91"}.items():
            client.set_model_version_tag(name, number, key, value)
    promote(settings, "1", actor="ci")
    move_alias(settings, STAGING, "2", "stage", "ci")
    return client, name


class Approver(threading.Thread):
    """Answers the first ``promote_model`` approval that waits, as ``bob``, the way the REST API
    does (Airflow's own update of the human-in-the-loop detail)."""

    def __init__(self, option: str, comment: str, username: str = "bob") -> None:
        super().__init__(daemon=True)
        self.option, self.comment, self.username = option, comment, username
        self.request: dict | None = None
        self.error: BaseException | None = None
        self.stop = threading.Event()  # the run is over: stop looking
        # dag.test() has parked the task: it writes the task's state once more after the task
        # pauses, so an answer given before that is overwritten and the run waits forever.
        self.parked = threading.Event()

    def run(self) -> None:
        try:
            self._answer()
        except BaseException as exc:  # reported by the test, once dag.test() returns:
            self.error = exc
            self._fail_waiting()  # else it would wait for an answer forever

    @staticmethod
    def _fail_waiting() -> None:
        from airflow.models.taskinstance import TaskInstance
        from airflow.utils.session import create_session
        from airflow.utils.state import TaskInstanceState
        from sqlalchemy import update

        with create_session() as session:
            session.execute(
                update(TaskInstance)
                .where(TaskInstance.dag_id == "promote_model", TaskInstance.state == TaskInstanceState.AWAITING_INPUT)
                .values(state=TaskInstanceState.FAILED)
            )

    def _answer(self) -> None:
        from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
        from airflow.api_fastapi.core_api.datamodels.hitl import UpdateHITLDetailPayload
        from airflow.api_fastapi.core_api.routes.public.hitl import update_hitl_detail
        from airflow.models.hitl import HITLDetail
        from airflow.models.taskinstance import TaskInstance
        from airflow.utils.session import create_session
        from airflow.utils.state import TaskInstanceState
        from sqlalchemy import select

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.stop.is_set():
                return
            if not self.parked.is_set():
                time.sleep(0.1)
                continue
            with create_session() as session:
                ti = session.scalars(
                    select(TaskInstance).where(
                        TaskInstance.dag_id == "promote_model",
                        TaskInstance.task_id == "approve",
                        TaskInstance.state == TaskInstanceState.AWAITING_INPUT,
                    )
                ).first()
                if ti is not None:
                    detail = session.get(HITLDetail, ti.id)
                    self.request = {"subject": detail.subject, "body": detail.body, "options": detail.options}
                    payload = UpdateHITLDetailPayload(
                        chosen_options=[self.option], params_input={"comment": self.comment}
                    )
                    user = SimpleAuthManagerUser(username=self.username, role="admin")
                    update_hitl_detail("promote_model", ti.run_id, "approve", payload, user, session)
                    return
            time.sleep(0.5)
        raise TimeoutError("no promote_model approval waited within 120 s")


def run_with(conf: dict, approver: Approver | None = None):
    import airflow.sdk.definitions.dag as dag_module
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(DAGS)).get_dag("promote_model")
    if approver:
        run_task = dag_module._run_task

        def run_and_tell(*, ti, **kwargs):
            result = run_task(ti=ti, **kwargs)
            if ti.task_id == "approve":
                approver.parked.set()  # dag.test() has written the paused task's state
            return result

        monkeypatch = pytest.MonkeyPatch()
        monkeypatch.setattr(dag_module, "_run_task", run_and_tell)
        approver.start()
    try:
        run = dag.test(run_conf=conf)
    finally:
        if approver:
            approver.stop.set()
            approver.join(timeout=30)
            monkeypatch.undo()
    if approver:
        assert approver.error is None, approver.error
    return run


def test_an_approved_promotion_moves_production_recorded_with_both_people(staged, monkeypatch):
    client, name = staged
    approver = Approver("Approve", "card and latencies fine")
    with SmtpSink() as mail:
        send_alerts_to(monkeypatch, mail)
        run = run_with({"approval": True, "reason": "weekly release"}, approver)
    assert run.state == "success"
    assert approver.request["subject"] == f"Promote {name} version 2 to production?"
    assert "weekly release" in approver.request["body"] and "| test accuracy | `0.91` |" in approver.request["body"]
    assert f"#/models/{name}/versions/2" in approver.request["body"]
    assert alias_version(client, name, PRODUCTION) == "2"
    last = read_history(client, name)[-1]
    assert (last.action, last.from_version, last.to_version) == ("promote", "1", "2")
    assert last.actor == f"bob via airflow:promote_model/{run.run_id}"
    assert last.reason == "approved: card and latencies fine (asked by dag_test: weekly release)"
    assert client.get_model_version(name, "2").tags["approval.decision"] == "approved"
    assert any("approval needed" in subject for subject in mail.subjects()), mail.subjects()


def test_a_rejected_promotion_leaves_production_and_says_who_and_why(staged):
    client, name = staged
    run = run_with({"approval": True, "reason": "try it"}, Approver("Reject", "Shirt recall too low"))
    assert run.state == "success"
    assert alias_version(client, name, PRODUCTION) == "1"
    last = read_history(client, name)[-1]
    assert (last.action, last.from_version, last.to_version) == ("reject", "1", "2")
    assert (
        last.actor == f"bob via airflow:promote_model/{run.run_id}" and last.reason == "rejected: Shirt recall too low"
    )


def test_without_approval_the_promotion_goes_at_once(staged):
    client, name = staged
    run = run_with({"reason": "hotfix"})
    assert run.state == "success"
    assert alias_version(client, name, PRODUCTION) == "2"
    last = read_history(client, name)[-1]
    assert (last.action, last.to_version, last.reason) == ("promote", "2", "hotfix")
    assert last.actor == f"dag_test via airflow:promote_model/{run.run_id}"  # who triggered it


def test_the_requester_cannot_approve_their_own_promotion(staged):
    client, name = staged
    run = run_with({"approval": True, "reason": "mine"}, Approver("Approve", "looks good to me", "dag_test"))
    assert run.state == "failed"  # dag.test() triggers as dag_test, who answered
    assert alias_version(client, name, PRODUCTION) == "1"
    assert read_history(client, name)[-1].action == "stage"  # nothing recorded after the staging move


def test_an_unnamed_version_is_refused_before_anyone_is_asked_as_pipeline_promote_refuses_it(staged):
    client, name = staged
    client.set_model_version_tag(name, "2", "approval.decision", "rejected")
    approver = Approver("Approve", "x")
    run = run_with({"approval": True, "reason": "again"}, approver)
    assert run.state == "failed" and approver.request is None  # no approval was asked for
    assert alias_version(client, name, PRODUCTION) == "1"
