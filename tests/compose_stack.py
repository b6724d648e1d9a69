"""The compose stack in ``docker/`` as ``docker-compose config`` renders it, for the tests that
check it (tests/test_docker_stack.py) and the secrets scan (tests/test_no_default_secrets.py).
No Docker engine is needed: only Debian's ``docker-compose`` package."""

from __future__ import annotations

import functools
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
VENV_BIN = Path(sys.executable).parent

#: ``${NAME}``, ``${NAME:?message}``, ``$NAME``; ``$$`` is a literal dollar sign in compose.
INTERPOLATION = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)([^}]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")
#: Commands our images may run, besides scripts of this repository.
TOOLS = ("airflow", "pipeline", "mlflow")

SERVICES = {
    "postgres",
    "redis",
    "minio",
    "minio-init",
    "mlflow",
    "mlflow-init",
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
    "airflow-worker-gpu",
    "serving",
}


def is_secret_name(name: str) -> bool:
    """Whether a variable holds a secret: access key ids count (half of a credential), tokens do,
    a ``*_FILE`` path to one does not."""
    return bool(re.search(r"PASSWORD|SECRET|KEY|TOKEN", name)) and not name.endswith("_FILE")


def env_example() -> dict[str, str]:
    """``docker/.env.example`` as ``{name: value}`` (comments and blank lines skipped)."""
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f"docker/.env.example: not NAME=value: {line!r}"
            values[name.strip()] = value.strip()
    return values


def empty_names() -> list[str]:
    """The variables ``.env.example`` leaves for the operator to fill in: the secrets."""
    return sorted(name for name, value in env_example().items() if not value)


def docker_compose(values: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``docker-compose --env-file <values> -f docker/docker-compose.yaml ARGS``.

    The environment is cleared: compose would prefer a variable of the calling shell (an AWS key
    of the developer's, say) over the env file."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose is needed to check docker/docker-compose.yaml: apt-get install docker-compose")
    with tempfile.TemporaryDirectory(prefix="stack-env-") as tmp:
        env_file = Path(tmp) / "stack.env"
        env_file.write_text("".join(f"{name}={value}\n" for name, value in values.items()))
        return subprocess.run(
            [binary, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp},
        )


def filled_env() -> dict[str, str]:
    """``.env.example`` with a fresh random value for every secret it leaves empty."""
    return {name: value or secrets.token_hex(20) for name, value in env_example().items()}


@functools.cache
def rendered_stack() -> tuple[dict[str, Any], dict[str, str]]:
    """The compose configuration as ``docker-compose config`` renders it with every secret set,
    and the values it was given."""
    values = filled_env()
    out = docker_compose(values, "config")
    assert out.returncode == 0, f"docker-compose config failed:\n{out.stderr}"
    return yaml.safe_load(out.stdout), values
