"""The production stack in ``docker/`` holds together, checked without a Docker engine.

``docker-compose config`` (Debian's ``docker-compose`` package) renders the compose file with the
secrets of ``docker/.env.example`` filled in, and refuses it while any secret is missing. What the
stack's containers would run is checked against this checkout: the scripts the Dockerfiles copy
into the images, and the ``airflow``/``pipeline``/``mlflow`` subcommands and options, asked for
their ``--help`` from this ``.venv``.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import re
import shlex
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from compose_stack import (
    COMPOSE_FILE,
    DOCKER,
    INTERPOLATION,
    ROOT,
    SERVICES,
    TOOLS,
    VENV_BIN,
    docker_compose,
    empty_names,
    env_example,
    filled_env,
    is_secret_name,
    rendered_stack,
)


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    return rendered_stack()[0]


def environment(service: dict[str, Any]) -> dict[str, str]:
    return {name: str(value) for name, value in (service.get("environment") or {}).items()}


def test_compose_renders_with_every_secret_set(stack):
    assert set(stack["services"]) >= SERVICES


def test_airflow_runs_celery_on_postgres_and_redis(stack):
    for name in SERVICES:
        if name.startswith("airflow"):
            env = environment(stack["services"][name])
            assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
            assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://"), name
            assert env["AIRFLOW__CELERY__BROKER_URL"] == "redis://redis:6379/0", name
            assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/", name
            assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000", name
            assert env["PIPELINE_STORAGE_URI"].startswith("s3://"), name


def test_workers_listen_on_their_queues_and_the_gpu_worker_reserves_a_gpu(stack):
    cpu, gpu = stack["services"]["airflow-worker"], stack["services"]["airflow-worker-gpu"]
    assert cpu["command"][:3] == ["airflow", "celery", "worker"]
    assert cpu["command"][cpu["command"].index("--queues") + 1] == "default"
    assert "deploy" not in cpu and "profiles" not in cpu

    assert gpu["command"][:3] == ["airflow", "celery", "worker"]
    assert gpu["command"][gpu["command"].index("--queues") + 1] == "gpu"
    # Behind a profile: a host without a GPU starts the stack without it.
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["args"]["TORCH_VARIANT"] == "cuda"
    assert ("ARG", "TORCH_VARIANT=cpu") in dockerfile_instructions(ROOT / gpu["build"]["dockerfile"])
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), devices


def test_mlflow_serves_with_basic_auth_on_postgres_and_s3(stack):
    mlflow = stack["services"]["mlflow"]
    entrypoint = dockerfile_entrypoint(ROOT / mlflow["build"]["dockerfile"])
    script = image_files(ROOT / mlflow["build"]["dockerfile"])[PurePosixPath(entrypoint[0])]
    assert "--app-name basic-auth" in script.read_text()
    env = environment(mlflow)
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert env["MLFLOW_AUTH_DATABASE_URI"].startswith("postgresql+psycopg2://")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    # The Host header of every client in the stack is accepted.
    assert {"mlflow", "mlflow:5000"} <= set(env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(","))


def test_every_secret_in_the_rendered_stack_comes_from_the_env_file(stack):
    secret_names = empty_names()
    generated = {value for name, value in rendered_stack()[1].items() if name in secret_names}
    found = []
    for name, service in stack["services"].items():
        for key, value in environment(service).items():
            if is_secret_name(key):
                found.append((name, key, value))
            for password in re.findall(r"://[^:/@\s]+:([^@\s]+)@", value):  # user:password@ in a URL
                found.append((name, key + " (URL password)", password))
    wrong = [(name, key) for name, key, value in found if value not in generated]
    assert found and not wrong, f"secrets that do not come from docker/.env: {wrong}"


def test_env_example_as_shipped_is_refused():
    out = docker_compose(env_example(), "config")
    assert out.returncode != 0, "docker-compose config accepted the stack with every secret empty"
    reason = out.stderr.strip().rsplit(": ", 1)[-1]  # after the templates compose quotes
    assert any(re.search(rf"\b{name}\b", reason) for name in empty_names()), out.stderr[-500:]


@pytest.mark.parametrize("missing", empty_names())
def test_each_secret_is_required(missing):
    values = {**filled_env(), missing: ""}
    out = docker_compose(values, "config")
    assert out.returncode != 0, f"docker-compose config accepted the stack without {missing}: it has a default"
    reason = out.stderr.strip().rsplit(": ", 1)[-1]
    assert re.search(rf"\b{missing}\b", reason), out.stderr[-500:]


def test_interpolated_variables_are_exactly_those_of_env_example():
    used: dict[str, set[str]] = {}
    for match in INTERPOLATION.finditer(COMPOSE_FILE.read_text()):
        if match.group(0) != "$$":
            name = match.group(1) or match.group(3)
            used.setdefault(name, set()).add(match.group(2) or "")
    declared = set(env_example())
    assert not set(used) - declared, (
        f"used by the compose file, missing from .env.example: {sorted(set(used) - declared)}"
    )
    assert not declared - set(used), f"in .env.example, unused by the compose file: {sorted(declared - set(used))}"
    # Values live in .env.example alone: no default in the compose file, a clear error when unset.
    with_default = {name: sorted(forms) for name, forms in used.items() if any(not f.startswith(":?") for f in forms)}
    assert not with_default, f"interpolated without ':?message': {with_default}"


# -- the images -----------------------------------------------------------------------------


def dockerfile_instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """``[(INSTRUCTION, arguments)]`` with line continuations joined and comments dropped."""
    lines = [line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [
        (op.upper(), rest.strip())
        for op, _, rest in (line.strip().partition(" ") for line in joined.splitlines())
        if op
    ]


def dockerfile_entrypoint(dockerfile: Path) -> list[str]:
    found = [rest for op, rest in dockerfile_instructions(dockerfile) if op == "ENTRYPOINT"]
    assert found, f"{dockerfile.name}: no ENTRYPOINT"
    return json.loads(found[-1])


def dockerignored(relative: str) -> bool:
    """Whether ``.dockerignore`` keeps this repository path out of the build context: a pattern
    matches the path or a folder above it, ``**/`` any depth, ``!`` includes again."""
    ignore = ROOT / ".dockerignore"
    lines = [line.strip() for line in ignore.read_text().splitlines()] if ignore.exists() else []
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for line in (line for line in lines if line and not line.startswith("#")):
        pattern = line.lstrip("!").strip("/")
        forms = [pattern[3:], "*/" + pattern[3:]] if pattern.startswith("**/") else [pattern]
        if any(fnmatch.fnmatchcase(c, f) for c in candidates for f in forms):
            ignored = not line.startswith("!")
    return ignored


@functools.cache
def image_files(dockerfile: Path) -> dict[PurePosixPath, Path]:
    """Every file the Dockerfile's COPY instructions put into the image: image path -> repo file.
    Fails when a COPY source matches nothing in the checkout or only what .dockerignore drops."""
    files: dict[PurePosixPath, Path] = {}
    workdir = PurePosixPath("/")
    for op, rest in dockerfile_instructions(dockerfile):
        if op == "WORKDIR":
            workdir = workdir / rest
        elif op == "COPY":
            *sources, dest = [arg for arg in shlex.split(rest) if not arg.startswith("--")]
            target = workdir / dest
            for source in sources:
                matches = [
                    m
                    for m in sorted(ROOT.glob(source.rstrip("/")))
                    if not dockerignored(m.relative_to(ROOT).as_posix())
                ]
                assert matches, f"{dockerfile.name}: COPY {source}: nothing in the checkout (or all .dockerignored)"
                for match in matches:
                    if match.is_dir():
                        for f in match.rglob("*"):
                            if f.is_file() and not dockerignored(f.relative_to(ROOT).as_posix()):
                                files[target / f.relative_to(match).as_posix()] = f
                    else:
                        files[target / match.name if dest.endswith("/") else target] = match
    return files


def our_services(stack: dict[str, Any]) -> dict[str, Path]:
    """The services built from this repository's Dockerfiles: name -> Dockerfile."""
    found = {}
    for name, service in stack["services"].items():
        if "build" in service:
            assert Path(service["build"]["context"]) == ROOT, f"{name}: the build context must be the repository root"
            found[name] = ROOT / service["build"]["dockerfile"]
    return found


@pytest.mark.parametrize("dockerfile", ["airflow.Dockerfile", "mlflow.Dockerfile"])
def test_dockerfile_copies_what_exists_and_enters_through_a_repo_script(dockerfile):
    path = DOCKER / dockerfile
    files = image_files(path)
    entrypoint = PurePosixPath(dockerfile_entrypoint(path)[0])
    assert entrypoint in files, f"{dockerfile}: ENTRYPOINT {entrypoint} is not copied into the image"
    assert os.access(files[entrypoint], os.X_OK), f"{files[entrypoint]} is not executable"
    users = [rest for op, rest in dockerfile_instructions(path) if op == "USER"]
    assert users and users[-1] not in ("root", "0"), f"{dockerfile}: runs as root"


def test_bind_mounted_files_exist(stack):
    for name, service in stack["services"].items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if source.startswith("/"):
                assert Path(source).exists(), f"{name}: mounts {source}, which is not in the checkout"


def test_commands_of_our_images_exist(stack):
    """Every command a service of our images runs (command, entrypoint, CMD healthcheck, the
    Dockerfile's CMD): a repository script copied into the image, or a real subcommand of
    airflow / pipeline / mlflow taking every option given."""
    commands: list[tuple[str, list[str], dict[PurePosixPath, Path]]] = []
    for name, dockerfile in our_services(stack).items():
        files = image_files(dockerfile)
        service = stack["services"][name]
        for key in ("command", "entrypoint"):
            if service.get(key):
                assert isinstance(service[key], list), f"{name}: {key} must be an exec-form list"
                commands.append((f"{name} {key}", service[key], files))
        test = (service.get("healthcheck") or {}).get("test") or []
        if test[:1] == ["CMD"] and test[1] in TOOLS:
            commands.append((f"{name} healthcheck", test[1:], files))
        cmd = [rest for op, rest in dockerfile_instructions(dockerfile) if op == "CMD"]
        if cmd:
            commands.append((f"{dockerfile.name} CMD", json.loads(cmd[-1]), files))
    assert commands

    to_ask: dict[tuple[str, ...], set[str]] = {}
    for where, argv, files in commands:
        program = argv[0]
        if program.startswith("/"):
            assert PurePosixPath(program) in files, f"{where}: {program} is not copied into the image"
            assert os.access(files[PurePosixPath(program)], os.X_OK), (
                f"{where}: {files[PurePosixPath(program)]} is not executable"
            )
        else:
            assert program in TOOLS, f"{where}: {argv} runs neither a repository script nor one of {TOOLS}"
            words = [program]
            for arg in argv[1:]:
                if arg.startswith("-"):
                    break
                words.append(arg)
            options = {arg.split("=", 1)[0] for arg in argv if arg.startswith("-")}
            to_ask.setdefault(tuple(words), set()).update(options)

    def ask(words: tuple[str, ...]) -> tuple[tuple[str, ...], subprocess.CompletedProcess[str]]:
        env = {**os.environ, "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor"}
        return words, subprocess.run(
            [str(VENV_BIN / words[0]), *words[1:], "--help"], capture_output=True, text=True, timeout=120, env=env
        )

    with ThreadPoolExecutor(max_workers=4) as pool:
        for words, out in pool.map(ask, to_ask):
            assert out.returncode == 0, f"{' '.join(words)} --help: exit {out.returncode}\n{out.stderr[-1500:]}"
            unknown = [o for o in to_ask[words] if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", out.stdout)]
            assert not unknown, f"{' '.join(words)}: options not in its --help: {unknown}"


def test_finding_serving_container_has_the_mlflow_admin_credentials(stack):
    services = stack["services"]
    serving, admin = environment(services["serving"]), environment(services["airflow-worker"])
    assert serving["MLFLOW_TRACKING_USERNAME"] != admin["MLFLOW_TRACKING_USERNAME"]
    assert serving["MLFLOW_TRACKING_PASSWORD"] != admin["MLFLOW_TRACKING_PASSWORD"]
    # The user is created by mlflow-init before serving starts, with the repo's script.
    init = services["mlflow-init"]
    assert serving["MLFLOW_TRACKING_USERNAME"] == environment(init)["MLFLOW_SERVING_USERNAME"]
    assert services["serving"]["depends_on"]["mlflow-init"]["condition"] == "service_completed_successfully"
    files = image_files(DOCKER / "mlflow.Dockerfile")
    assert PurePosixPath(init["entrypoint"][0]) in files
    # Clients need the bearer token; nothing the stack loads may be a pickle.
    assert serving["PIPELINE_SERVE_TOKEN"]
    for name in ("serving", "airflow-worker", "airflow-scheduler"):
        assert environment(services[name])["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false", name
