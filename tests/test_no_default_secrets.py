"""No default secret ships with the project.

The well-known defaults that stacks like this one tend to copy (MLflow's and MinIO's old admin
passwords, Airflow's quick-start credentials, the AWS documentation's example key) appear in no
file of the checkout and in no value of the rendered compose stack, and ``docker/.env.example``
leaves every secret empty. Credentials made up for one test run (moto's ``testing``) are fine.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from compose_stack import ENV_EXAMPLE, env_example, is_secret_name, rendered_stack

ROOT = Path(__file__).resolve().parent.parent

#: What each default is, and a pattern that finds it.
DEFAULT_SECRETS = {
    "MLflow's old basic-auth admin password": re.compile(r"password1234"),
    "MinIO's default root credentials": re.compile(r"minioadmin", re.IGNORECASE),
    "Airflow's quick-start database credentials": re.compile(r"airflow:airflow@"),
    "Airflow's quick-start web user password": re.compile(r"_AIRFLOW_WWW_USER_PASSWORD"),
    "the AWS documentation's example access key": re.compile(r"AKIAIOSFODNN7EXAMPLE"),
    "the AWS documentation's example secret key": re.compile(r"wJalrXUtnFEMI"),
    "a placeholder password": re.compile(r"""[=:]\s*["']?change-?me\b""", re.IGNORECASE),
}


def project_files() -> list[Path]:
    """Every file git tracks or would track (new files not yet committed included), but this
    one: it names the defaults it looks for."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    paths = (ROOT / name for name in out.stdout.split("\0") if name)
    return [p for p in paths if p.is_file() and p.resolve() != Path(__file__).resolve()]


def findings(name: str, text: str) -> list[str]:
    return [
        f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {what} ({m.group(0).strip()!r})"
        for what, pattern in DEFAULT_SECRETS.items()
        for m in pattern.finditer(text)
    ]


def test_no_file_holds_a_default_secret():
    files = project_files()
    assert any(p.name == ".env.example" for p in files), "the scan does not see docker/.env.example"
    found = []
    for path in files:
        data = path.read_bytes()
        if b"\0" not in data[:8192]:  # text files only
            found += findings(str(path.relative_to(ROOT)), data.decode("utf-8", errors="replace"))
    assert not found, "default secrets in the project:\n" + "\n".join(found)


def test_rendered_compose_stack_holds_no_default_secret():
    config, _ = rendered_stack()
    found = findings("docker-compose config", yaml.safe_dump(config))
    assert not found, "\n".join(found)


@pytest.mark.parametrize("name", [name for name in env_example() if is_secret_name(name)])
def test_env_example_leaves_the_secret_empty(name):
    assert env_example()[name] == "", f"{ENV_EXAMPLE.relative_to(ROOT)}: {name} must be empty (a secret ships no value)"
