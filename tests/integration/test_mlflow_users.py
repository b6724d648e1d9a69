"""The serving container's MLflow user, made by ``docker/mlflow-users.sh`` on a real MLflow server
with basic auth (``docker/mlflow-server.sh``, as the compose stack runs them): it reads the
registry and can change nothing in it."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from services import ProcessGroup, free_port, wait_for_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def mlflow_server(tmp_path: Path):
    port = free_port()
    admin = secrets.token_hex(16)
    env = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "MLFLOW_AUTH_DATABASE_URI": f"sqlite:///{tmp_path / 'auth.db'}",
        "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"),
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        "MLFLOW_PORT": str(port),
        "MLFLOW_WORKERS": "1",
    }
    services = ProcessGroup(tmp_path)
    services.start("mlflow", ["bash", str(ROOT / "docker/mlflow-server.sh")], env)
    try:
        wait_for_port(port, timeout=120)
        yield f"http://127.0.0.1:{port}", admin, env
    finally:
        assert services.stop() == []


def client_as(url: str, user: str, password: str, monkeypatch: pytest.MonkeyPatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    return MlflowClient(tracking_uri=url)


def test_the_serving_user_reads_the_registry_and_cannot_move_an_alias(mlflow_server, monkeypatch):
    from mlflow.exceptions import MlflowException

    url, admin_password, server_env = mlflow_server
    admin = client_as(url, "admin", admin_password, monkeypatch)
    admin.create_registered_model("fashion-mnist-classifier", tags={"owner": "team"})

    password = secrets.token_hex(16)
    users = {
        "PATH": server_env["PATH"],
        "HOME": server_env["HOME"],
        "MLFLOW_TRACKING_URI": url,
        "MLFLOW_TRACKING_USERNAME": "admin",
        "MLFLOW_TRACKING_PASSWORD": admin_password,
        "MLFLOW_SERVING_USERNAME": "serving",
        "MLFLOW_SERVING_PASSWORD": password,
    }
    for _ in range(2):  # safe to run again (every start of the stack runs it)
        out = subprocess.run(
            ["bash", str(ROOT / "docker/mlflow-users.sh")], env=users, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr

    serving = client_as(url, "serving", password, monkeypatch)
    assert serving.get_registered_model("fashion-mnist-classifier").tags == {"owner": "team"}
    with pytest.raises(MlflowException, match="403"):
        serving.set_registered_model_alias("fashion-mnist-classifier", "production", "1")
    with pytest.raises(MlflowException, match="403"):
        serving.update_registered_model("fashion-mnist-classifier", description="replaced")

    as_admin = {**users, "MLFLOW_SERVING_USERNAME": "admin"}
    out = subprocess.run(
        ["bash", str(ROOT / "docker/mlflow-users.sh")], env=as_admin, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and "expected a user other than the admin" in out.stderr
