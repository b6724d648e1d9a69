"""The compose stack's auth: Airflow's FAB auth manager, its users and roles from the environment
(scripts/airflow-init.sh, scripts/airflow-users.py), and the plugin's Models page and buttons
honouring those roles. In fresh processes on their own metadata DB (SQLite), as the stack's
airflow-init and API server would run; the API app in process of the second one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
FAB = "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"

#: Logs in as each user, then, as each, reads the Models page and presses Roll back (a
#: rollback_model run), in Airflow's own API app with the plugin; prints what came back.
PROBE = """
import json, os, sys
from fastapi.testclient import TestClient
from airflow.api_fastapi.app import create_app
from airflow.dag_processing.bundles.manager import DagBundlesManager
from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db
from airflow.models.dagrun import DagRun
from airflow.utils.session import create_session
from sqlalchemy import select

manager = DagBundlesManager()
with create_session() as session:
    manager.sync_bundles_to_db(session=session)
for bundle in manager.get_all_dag_bundles():
    bundle.initialize()
    sync_bag_to_db(BundleDagBag(dag_folder=bundle.path, bundle_path=bundle.path, bundle_name=bundle.name), bundle.name, None)

client = TestClient(create_app())
out = {"anonymous": client.get("/pipeline/models").status_code}
for user, password in json.loads(sys.argv[1]).items():
    token = client.post("/auth/token", json={"username": user, "password": password})
    out[user] = {"login": token.status_code}
    if token.status_code != 201:
        continue
    auth = {"Authorization": "Bearer " + token.json()["access_token"]}
    out[user]["page"] = client.get("/pipeline/models", headers=auth).status_code
    pressed = client.post("/pipeline/models/fashion-mnist-classifier/rollback", data={"reason": "by " + user}, headers=auth)
    out[user]["rollback"] = pressed.status_code
with create_session() as session:
    runs = session.scalars(select(DagRun).where(DagRun.dag_id == "rollback_model")).all()
    out["rollback_runs"] = sorted((r.triggering_user_name, r.conf["reason"]) for r in runs)
print(json.dumps(out))
"""


@pytest.fixture
def fab_env(tmp_path):
    """An Airflow home with the FAB auth manager, and the stack's user variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PIPELINE_"))}
    return {
        **env,
        "PATH": f"{Path(sys.executable).parent}:{env['PATH']}",
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__AUTH_MANAGER": FAB,
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__API_AUTH__JWT_SECRET": "jwt-secret-for-tests-" + "y" * 64,
        "PIPELINE_HOME": str(tmp_path / "pipeline"),
        "AIRFLOW_ADMIN_USERNAME": "ada",
        "AIRFLOW_ADMIN_PASSWORD": "ada-password-for-tests",
        "AIRFLOW_USERS": "vera:Viewer,oscar:Op,una:User",
        "AIRFLOW_PASSWORD_VERA": "vera-password-for-tests",
        "AIRFLOW_PASSWORD_OSCAR": "oscar-password-for-tests",
        # The compose stack's form: one JSON variable (a user's own variable wins over it).
        "AIRFLOW_USER_PASSWORDS": json.dumps({"una": "una-password-for-tests", "vera": "not-this-one"}),
    }


def init(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "scripts/airflow-init.sh")], env=env, capture_output=True, text=True, timeout=600
    )


def probe(env: dict[str, str], passwords: dict[str, str]) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(passwords)], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_users_and_roles_come_from_the_environment_and_the_buttons_honour_them(fab_env):
    first = init(fab_env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert [line for line in first.stdout.splitlines() if line.startswith("airflow users: ")] == [
        "airflow users: created ada (Admin)",
        "airflow users: created vera (Viewer)",
        "airflow users: created oscar (Op)",
        "airflow users: created una (User)",
    ]
    # Again, with oscar's password rotated and una demoted: updated, not duplicated.
    rotated = {
        **fab_env,
        "AIRFLOW_PASSWORD_OSCAR": "oscar-new-password",
        "AIRFLOW_USERS": "vera:Viewer,oscar:Op,una:Viewer",
    }
    second = init(rotated)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "airflow users: updated una (Viewer)" in second.stdout

    seen = probe(
        rotated,
        {
            "ada": "ada-password-for-tests",
            "vera": "vera-password-for-tests",
            "oscar": "oscar-password-for-tests",  # the old one
            "una": "una-password-for-tests",
        },
    )
    assert seen["anonymous"] == 401
    assert seen["oscar"] == {"login": 401}  # its old password no longer works
    assert seen["vera"] == {"login": 201, "page": 200, "rollback": 403}  # a Viewer reads only
    assert seen["una"] == {"login": 201, "page": 200, "rollback": 403}  # demoted to Viewer
    assert seen["ada"] == {"login": 201, "page": 200, "rollback": 200}
    seen = probe(rotated, {"oscar": "oscar-new-password"})
    assert seen["oscar"] == {"login": 201, "page": 200, "rollback": 200}  # an Op may roll back
    # Each run records who pressed the button, as FAB knows them.
    assert seen["rollback_runs"] == [["ada", "by ada"], ["oscar", "by oscar"]]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"AIRFLOW_ADMIN_PASSWORD": ""}, "error: AIRFLOW_ADMIN_PASSWORD: expected it set"),
        ({"AIRFLOW_USER_PASSWORDS": "{}"}, "error: AIRFLOW_PASSWORD_UNA: expected the password of una (or an entry"),
        ({"AIRFLOW_USER_PASSWORDS": "una=pw"}, "error: AIRFLOW_USER_PASSWORDS: expected a JSON object"),
        ({"AIRFLOW_USERS": "vera:Superuser"}, "error: AIRFLOW_USERS: expected username:Role with Role one of Admin"),
    ],
)
def test_an_incomplete_environment_is_refused_in_one_line(fab_env, change, message):
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts/airflow-users.py")],
        env={**fab_env, **change},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and out.stderr.startswith(message) and out.stderr.count("\n") == 1, out.stderr
