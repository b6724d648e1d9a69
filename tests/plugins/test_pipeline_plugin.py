"""The plugin inside Airflow's own API app (in process, on the tests' metadata DB and a real MLflow
store), behind the simple auth manager with an admin and a viewer: what it lists, what the
Models page shows, and who may read it. (With a real API server, scheduler and Celery worker:
tests/integration/test_distributed_stack.py.)"""

from __future__ import annotations

import json
import uuid

import pytest

from pipeline.registry.history import STAGING
from pipeline.registry.promote import move_alias, promote, reject
from pipeline.tracking import tracking_client

PASSWORDS = {"admin": "admin-password-for-tests", "viewer": "viewer-password-for-tests"}


@pytest.fixture(scope="module")
def api(airflow_db, tmp_path_factory):
    """Airflow's API app with the plugin mounted, and a bearer token per user (one app for the
    module: it reads the pipeline's settings, each test's own home, at every request)."""
    from fastapi.testclient import TestClient

    passwords = tmp_path_factory.mktemp("auth") / "passwords.json"
    passwords.write_text(json.dumps(PASSWORDS))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "admin:admin,viewer:viewer")
        mp.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", str(passwords))
        mp.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "False")
        mp.setenv("AIRFLOW__API_AUTH__JWT_SECRET", "jwt-secret-for-tests-" + "x" * 64)
        mp.setenv("PIPELINE_MLFLOW_UI_URL", "https://mlflow.example")
        from airflow.api_fastapi.app import create_app

        client = TestClient(create_app())
        tokens = {}
        for user, password in PASSWORDS.items():
            answer = client.post("/auth/token", json={"username": user, "password": password})
            assert answer.status_code in (200, 201), answer.text
            tokens[user] = {"Authorization": f"Bearer {answer.json()['access_token']}"}
        yield client, tokens


@pytest.fixture
def registry(settings, tmp_path):
    """Three versions of the default model: v1 production, v2 rejected by a person, v3 at staging."""
    client = tracking_client(settings)
    name = settings.model_for()
    client.create_registered_model(name)
    for number in (1, 2, 3):
        client.create_model_version(name, str(tmp_path / "model"), run_id=None)
        tags = {
            "gate.decision": "passed" if number != 2 else "failed",
            "gate.reasons": "none" if number != 2 else "accuracy 0.81 < production's 0.93 - 0.01",
            "gate.production_version": "1" if number == 3 else "none",  # v3 gated against v1
            "infra_validation": "passed",
            "infra.latency_single_p50_ms": "2.1",
            "infra.latency_single_p99_ms": "5.3",
            "infra.latency_batch_ms": "80.0",
            "test_accuracy": f"0.9{number}",
            "dataset_hash": f"{number}" * 64,
        }
        for key, value in tags.items():
            client.set_model_version_tag(name, str(number), key, value)
    promote(settings, "1", actor="ci")
    reject(settings, "2", "alice via airflow:training_pipeline/r2", "rejected: <b>Shirt</b> recall")
    move_alias(settings, STAGING, "3", "stage", "ci")
    return name


def test_the_plugin_is_listed_with_its_links_app_and_models_view(api):
    client, tokens = api
    [plugin] = [
        p
        for p in client.get("/api/v2/plugins", headers=tokens["viewer"]).json()["plugins"]
        if p["name"] == "image_pipeline"
    ]
    assert len(plugin["global_operator_extra_links"]) == 5
    assert [(v["name"], v["href"], v["destination"]) for v in plugin["external_views"]] == [
        ("Models", "/pipeline/models", "nav")
    ]


def test_the_models_page_shows_versions_aliases_verdicts_and_history(api, registry):
    client, tokens = api
    overview = client.get("/pipeline/api/models", headers=tokens["viewer"])
    assert overview.status_code == 200, overview.text
    [model] = overview.json()["models"]
    assert model["name"] == registry and model["aliases"] == {"production": "1", "staging": "3"}
    rows = {v["version"]: v for v in model["versions"]}
    assert list(rows) == ["3", "2", "1"]  # newest first
    assert rows["1"]["aliases"] == ["production"] and rows["3"]["aliases"] == ["staging"]
    assert rows["2"]["gate"] == "failed" and rows["2"]["approval"] == "rejected"
    assert rows["1"]["latency_ms"] == {"single_p50": "2.1", "single_p99": "5.3", "batch": "80.0"}
    assert [(m["action"], m["to_version"]) for m in model["history"]] == [
        ("promote", "1"),
        ("reject", "2"),
        ("stage", "3"),
    ]
    assert overview.json()["pending_approvals"] == []

    page = client.get("/pipeline/models", headers=tokens["viewer"])
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    text = page.text
    assert f"<h2>{registry}</h2>" in text and "production → v1, staging → v3" in text
    assert "accuracy 0.81 &lt; production" in text and "rejected: &lt;b&gt;Shirt&lt;/b&gt; recall" in text
    assert f"https://mlflow.example/#/models/{registry}/versions/3" in text
    assert "Nothing waits for a person." in text
    policy = page.headers["content-security-policy"]
    # No script runs in the page; its forms post to this server only, as its own origin (else a
    # browser sends Origin: null and every button is refused); no other site may frame it.
    assert "sandbox allow-forms allow-same-origin " in policy and "allow-scripts" not in policy
    assert "form-action 'self'" in policy and "frame-ancestors 'self'" in policy and "default-src 'none'" in policy


def test_the_lock_held_while_an_alias_moves_is_not_listed_as_a_model(api, registry, settings):
    """The registry lock is a registered model for the seconds an alias moves: a page read then
    shows the one model still (seen in Chromium: a second model, "Aliases: none")."""
    from pipeline.registry.lock import registry_lock

    client, tokens = api
    with registry_lock(tracking_client(settings), registry, "ci"):
        assert len(tracking_client(settings).search_registered_models()) == 2  # the model and its lock
        overview = client.get("/pipeline/api/models", headers=tokens["viewer"])
        page = client.get("/pipeline/models", headers=tokens["viewer"])
    assert [model["name"] for model in overview.json()["models"]] == [registry]
    assert page.text.count("<h2>") - page.text.count("<h2>Waiting") == 1 and ".lock" not in page.text


@pytest.mark.parametrize("path", ["/pipeline/models", "/pipeline/api/models", "/pipeline/models/m/versions/1/card"])
def test_without_a_login_the_pages_answer_401(api, settings, path):
    client, _ = api
    assert client.get(path).status_code == 401
    assert client.get(path, headers={"Authorization": "Bearer not-a-token"}).status_code in (401, 403)


def test_the_app_publishes_no_unauthenticated_api_description(api):
    client, _ = api
    assert [client.get(f"/pipeline/{path}").status_code for path in ("docs", "redoc", "openapi.json")] == [404] * 3


def test_an_empty_registry_says_so(api, settings):
    client, tokens = api
    page = client.get("/pipeline/models", headers=tokens["admin"])
    assert page.status_code == 200 and "No registered model yet" in page.text


# --- The page's buttons: they act through Airflow, as the user, within the user's permissions ---

BROWSER = {"Accept": "text/html,application/xhtml+xml"}


@pytest.fixture(scope="module")
def dags_in_db(api):
    """The DAG folder parsed into the metadata DB, as the DAG processor does (the buttons trigger
    the deployment DAGs through Airflow, which reads them from there)."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db
    from airflow.utils.session import create_session

    manager = DagBundlesManager()
    with create_session() as session:
        manager.sync_bundles_to_db(session=session)
    for bundle in manager.get_all_dag_bundles():
        bundle.initialize()
        bag = BundleDagBag(dag_folder=bundle.path, bundle_path=bundle.path, bundle_name=bundle.name)
        assert not bag.import_errors, bag.import_errors
        sync_bag_to_db(bag, bundle.name, bundle.version)


def runs_of(dag_id: str) -> list:
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        runs = session.scalars(select(DagRun).where(DagRun.dag_id == dag_id).order_by(DagRun.id)).all()
        return [(r.run_id, r.triggering_user_name, dict(r.conf or {}), r.state) for r in runs]


@pytest.fixture
def pending_approval(dags_in_db):
    """A ``training_pipeline`` run whose ``approve`` task waits for a person, as the operator leaves it."""
    from airflow.models.dagbag import DBDagBag
    from airflow.models.hitl import HITLDetail
    from airflow.sdk import timezone
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState, TaskInstanceState
    from airflow.utils.types import DagRunTriggeredByType, DagRunType

    run_id = f"manual__approval-{uuid.uuid4().hex[:8]}"
    with create_session() as session:
        dag = DBDagBag().get_latest_version_of_dag("training_pipeline", session=session)
        run = dag.create_dagrun(
            run_id=run_id,
            logical_date=None,
            data_interval=None,
            run_after=timezone.utcnow(),
            conf={"promotion": "approval"},
            run_type=DagRunType.MANUAL,
            triggered_by=DagRunTriggeredByType.TEST,
            state=DagRunState.RUNNING,
            session=session,
        )
        ti = run.get_task_instance("approve", session=session)
        ti.state = TaskInstanceState.AWAITING_INPUT
        session.add(HITLDetail(ti_id=ti.id, options=["Approve", "Reject"], subject="fashion-mnist-classifier v3"))
    return run_id


def hitl_answer(run_id: str) -> tuple:
    from airflow.models.hitl import HITLDetail
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        ti = session.scalars(
            select(TaskInstance).where(TaskInstance.run_id == run_id, TaskInstance.task_id == "approve")
        ).one()
        detail = session.get(HITLDetail, ti.id)
        return (detail.responded_by or {}).get("name"), detail.chosen_options, detail.params_input, ti.state


def test_a_viewer_sees_no_buttons_and_each_action_is_refused_with_403(api, registry, pending_approval):
    client, tokens = api
    page = client.get("/pipeline/models", headers=tokens["viewer"])
    assert page.status_code == 200 and "<form" not in page.text
    assert "fashion-mnist-classifier v3" in page.text  # the approval is listed, read only
    before = {dag: runs_of(dag) for dag in ("promote_model", "rollback_model")}
    posts = {
        f"/pipeline/models/{registry}/promote": {"version": "3", "reason": "looks fine"},
        f"/pipeline/models/{registry}/rollback": {"reason": "looks bad"},
        f"/pipeline/approvals/training_pipeline/{pending_approval}": {"answer": "Approve", "comment": "ok"},
    }
    for path, form in posts.items():
        assert client.post(path, data=form, headers={**tokens["viewer"], **BROWSER}).status_code == 403, path
        assert client.post(path, data=form).status_code == 401, path
    assert {dag: runs_of(dag) for dag in before} == before
    assert hitl_answer(pending_approval)[:2] == (None, None)


def test_promote_and_roll_back_from_the_page_trigger_the_deployment_dags_as_the_user(api, registry, dags_in_db):
    client, tokens = api
    page = client.get("/pipeline/models", headers=tokens["admin"]).text
    assert "Promote v3 (staging) to production" in page and "Roll back production (v1)" in page
    assert f"action='models/{registry}/promote'" in page and "name='version' value='3'" in page

    answer = client.post(
        f"/pipeline/models/{registry}/promote",
        data={"version": "3", "reason": "reviewed the model card"},
        headers={**tokens["admin"], **BROWSER},
        follow_redirects=False,
    )
    assert answer.status_code == 303 and answer.headers["location"].startswith("/pipeline/models?done=")
    [(run_id, user, conf, state)] = runs_of("promote_model")[-1:]
    assert (user, conf, state) == (
        "admin",
        {"model_name": registry, "version": "3", "reason": "reviewed the model card"},
        "queued",
    )
    shown = client.get(answer.headers["location"], headers=tokens["admin"]).text
    assert f"promote_model run {run_id} will move production of {registry} to v3 (triggered by admin)" in shown
    # What the page says it did is signed: a link from elsewhere cannot put words in its mouth.
    forged = client.get(
        "/pipeline/models", params={"done": "production moved to v9", "sig": "0" * 32}, headers=tokens["admin"]
    )
    assert forged.status_code == 200 and "production moved to v9" not in forged.text

    answer = client.post(
        f"/pipeline/models/{registry}/rollback", data={"reason": "v1 misbehaves"}, headers=tokens["admin"]
    )
    assert answer.status_code == 200, answer.text  # an API client gets JSON
    [(run_id, user, conf, _)] = runs_of("rollback_model")[-1:]
    assert run_id in answer.json()["done"] and user == "admin"
    assert conf == {"model_name": registry, "to_version": None, "reason": "v1 misbehaves"}

    # The deployment DAGs are created unpaused (they run only when triggered); a paused one is said.
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session

    with create_session() as session:
        assert session.get(DagModel, "rollback_model").is_paused is False
        session.get(DagModel, "rollback_model").is_paused = True
    try:
        answer = client.post(f"/pipeline/models/{registry}/rollback", data={"reason": "again"}, headers=tokens["admin"])
        assert answer.json()["done"].endswith("; the DAG is paused: the run starts once someone unpauses it")
    finally:
        with create_session() as session:
            session.get(DagModel, "rollback_model").is_paused = False


def test_an_action_without_a_reason_or_with_a_bad_version_is_refused_naming_the_field(api, registry, dags_in_db):
    client, tokens = api
    before = runs_of("promote_model")
    empty = client.post(
        f"/pipeline/models/{registry}/promote",
        data={"version": "3", "reason": "  "},
        headers={**tokens["admin"], **BROWSER},
        follow_redirects=False,
    )
    assert empty.status_code == 303 and "error=reason" in empty.headers["location"]
    shown = client.get(empty.headers["location"], headers=tokens["admin"]).text
    assert "reason: expected a reason for the promotion history, found an empty field" in shown
    bad = client.post(
        f"/pipeline/models/{registry}/promote", data={"version": "3; x", "reason": "r"}, headers=tokens["admin"]
    )
    assert bad.status_code == 400 and bad.json()["detail"].startswith("version: expected a registered version number")
    assert runs_of("promote_model") == before


def test_the_page_does_not_offer_what_pipeline_promote_refuses(api, registry, settings, dags_in_db):
    """A staging version production was rolled back from (or rejected, or gated against another
    production) gets no Promote button, and a post naming it is refused with the registry's line."""
    client, tokens = api
    tracking_client(settings).set_model_version_tag(registry, "3", "promotion.rolled_back", "2026-12-03T10:00:00")
    page = client.get("/pipeline/models", headers=tokens["admin"]).text
    assert "Promote v3" not in page and "Roll back production (v1)" in page
    before = runs_of("promote_model")
    refused = client.post(
        f"/pipeline/models/{registry}/promote", data={"version": "3", "reason": "r"}, headers=tokens["admin"]
    )
    assert refused.status_code == 400, refused.text
    assert "expected a staging version production was not rolled back from" in refused.json()["detail"]
    assert runs_of("promote_model") == before


def test_a_cookie_post_from_another_site_is_refused(api, registry, dags_in_db):
    """The page's forms send the UI's session cookie: a post with it must come from this server."""
    client, tokens = api
    cookie = {"Cookie": f"_token={tokens['admin']['Authorization'].split()[1]}"}
    before = runs_of("rollback_model")
    form = {"reason": "forged"}
    path = f"/pipeline/models/{registry}/rollback"
    for origin in ({"Origin": "https://evil.example"}, {"Origin": "null"}, {}):
        refused = client.post(path, data=form, headers={**cookie, **BROWSER, **origin})
        assert refused.status_code == 403 and "refused a form post" in refused.json()["detail"], origin
    assert runs_of("rollback_model") == before
    same = client.post(
        path, data=form, headers={**cookie, **BROWSER, "Origin": "http://testserver"}, follow_redirects=False
    )
    assert same.status_code == 303 and len(runs_of("rollback_model")) == len(before) + 1


def test_an_approval_is_answered_from_the_page_once_as_the_user(api, registry, pending_approval):
    client, tokens = api
    page = client.get("/pipeline/models", headers=tokens["admin"]).text
    assert (
        f"action='approvals/training_pipeline/{pending_approval}'" in page
        and "value='Approve'" in page
        and "value='Reject'" in page
    )
    path = f"/pipeline/approvals/training_pipeline/{pending_approval}"
    answer = client.post(
        path,
        data={"answer": "Approve", "comment": "card read"},
        headers={**tokens["admin"], **BROWSER},
        follow_redirects=False,
    )
    assert answer.status_code == 303, answer.text
    assert "Approve+by+admin" in answer.headers["location"]
    user, chosen, params_input, state = hitl_answer(pending_approval)
    assert (user, chosen, params_input) == ("admin", ["Approve"], {"comment": "card read"})
    assert state == "scheduled"  # Airflow resumes the task with the answer
    again = client.post(path, data={"answer": "Reject", "comment": "no"}, headers=tokens["admin"])
    assert again.status_code == 409 and hitl_answer(pending_approval)[1] == ["Approve"]
    bogus = client.post(path, data={"answer": "Maybe", "comment": "x"}, headers=tokens["admin"])
    assert bogus.status_code == 400 and "answer: expected one of Approve, Reject" in bogus.json()["detail"]
    elsewhere = client.post(
        f"/pipeline/approvals/rollback_model/{pending_approval}",
        data={"answer": "Approve", "comment": "x"},
        headers=tokens["admin"],
    )
    assert elsewhere.status_code == 400 and elsewhere.json()["detail"].startswith(
        "dag_id: expected one of training_pipeline, promote_model"
    )
