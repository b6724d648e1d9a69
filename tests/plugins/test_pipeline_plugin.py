"""The plugin inside Airflow's own API app (in process, on the tests' metadata DB and a real MLflow
store), behind the simple auth manager with an admin and a viewer: what it lists, what the
Models page shows, and who may read it. (With a real API server, scheduler and Celery worker:
tests/integration/test_distributed_stack.py.)"""

from __future__ import annotations

import json

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
            "gate.production_version": "none",
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
    assert "sandbox" in page.headers["content-security-policy"]  # no script runs in the page


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
