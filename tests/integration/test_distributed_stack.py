"""The production mode, run on this machine with real services.

Airflow on PostgreSQL with the CeleryExecutor (Redis broker; one worker on queues ``default`` and
``gpu``, training routed to ``gpu``), an MLflow server with basic auth whose store is PostgreSQL
and whose artifacts are in S3, and the pipeline's storage in S3. The S3 API is moto's server
behind a TCP relay, and so is the MLflow server for the Airflow tasks: the fault tests take them
down. Every process is started with the command the compose stack in ``docker/`` runs
(``docker/airflow-entrypoint.sh``, ``scripts/airflow-init.sh``, ``docker/mlflow-server.sh``),
configured through the environment only, and runs are triggered the way a team's script would:
through Airflow's REST API.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import boto3
import numpy as np
import pytest
import requests
from defects import write_dataset
from mail import RECIPIENT, SmtpSink
from recipes import SMALL_RECIPE
from services import ProcessGroup, RequestCuttingProxy, TcpProxy, free_port, kill_session, port_is_free

from pipeline.config import IDX_FILES

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DAG_ID = "training_pipeline"
POSTGRES = "postgresql+psycopg2://postgres@127.0.0.1:5432"
# One epoch on 1,800 images reaches about 0.7: the gate's floor is lowered to match.
QUICK = {**SMALL_RECIPE, "epochs": 1, "batch_size": 64, "gate_min_accuracy": 0.5}
# The environment a service gets is built from scratch for these: nothing of the test
# process's own Airflow, pipeline, MLflow or AWS set-up leaks into the stack.
OWN_PREFIXES = ("AIRFLOW", "PIPELINE_", "MLFLOW_", "AWS_", "GX_")
ENTRYPOINT = ["bash", str(ROOT / "docker/airflow-entrypoint.sh")]
HEARTBEAT_TIMEOUT_S = 30
MODEL = "fashion-mnist-classifier"


class AirflowApi:
    """Airflow's public REST API as a user's script reaches it: a JWT from ``/auth/token``."""

    def __init__(self, url: str, username: str, password: str) -> None:
        self.url = url
        answer = requests.post(f"{url}/auth/token", json={"username": username, "password": password}, timeout=30)
        answer.raise_for_status()
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {answer.json()['access_token']}"

    def call(self, method: str, path: str, **kwargs) -> dict:
        answer = self.session.request(method, f"{self.url}/api/v2{path}", timeout=30, **kwargs)
        assert answer.ok, f"{method} {path}: HTTP {answer.status_code} {answer.text[:500]}"
        return answer.json()

    def trigger(self, conf: dict) -> str:
        run = self.call("POST", f"/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": conf})
        return run["dag_run_id"]

    def run(self, run_id: str) -> dict:
        return self.call("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}")

    def task_instances(self, run_id: str) -> dict[str, dict]:
        listing = self.call("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances", params={"limit": 100})
        return {ti["task_id"]: ti for ti in listing["task_instances"]}

    def log(self, run_id: str, task_id: str, try_number: int) -> str:
        path = f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}"
        content = self.call("GET", path, params={"full_content": "true"}, headers={"Accept": "application/json"})
        return "\n".join(_log_line(line) for line in content["content"])


def _log_line(line: dict | str) -> str:
    """A structured task-log line as a person reads it: the event, then any exception."""
    if not isinstance(line, dict):
        return str(line)
    errors = [f"{e.get('exc_type')}: {e.get('exc_value')}" for e in line.get("error_detail") or []]
    return "\n".join([line.get("event", ""), *errors])


class Stack:
    """PostgreSQL databases, a Redis database, an S3 bucket, an MLflow server and the four Airflow
    components of the Celery mode, all this stack's own; :meth:`close` removes every one."""

    def __init__(self, workdir: Path, s3_port: int) -> None:
        self.id = uuid.uuid4().hex[:8]
        self.workdir = workdir
        self.services = ProcessGroup(workdir)
        self.proxy = TcpProxy(s3_port)
        self.s3 = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{s3_port}",
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        self.bucket = f"stack-{self.id}"
        self.databases = [f"stack_{self.id}_{name}" for name in ("airflow", "mlflow", "mlflow_auth")]
        self.redis_db = self._free_redis_db()
        self.api_port, self.mlflow_port, self.log_port = free_port(), free_port(), free_port()
        self.api_url, self.mlflow_url = f"http://127.0.0.1:{self.api_port}", f"http://127.0.0.1:{self.mlflow_port}"
        # What the Airflow tasks reach MLflow through (the tests' own client goes direct).
        self.mlflow_proxy = RequestCuttingProxy(self.mlflow_port)
        self.mail = SmtpSink()  # the alerts' mail server
        self.airflow_user = ("operator", secrets.token_urlsafe(16))
        self.viewer = ("watcher", secrets.token_urlsafe(16))
        self.mlflow_user = ("admin", secrets.token_urlsafe(16))
        self.leftovers: list[str] = []
        self._closed = False

    # --- start ---------------------------------------------------------------------------------

    def open(self) -> Stack:
        try:
            self.proxy.start()
            self.mlflow_proxy.start()
            self.mail.__enter__()
            self.s3.create_bucket(Bucket=self.bucket)
            self._create_databases()
            base = self._base_env()
            self.services.start("mlflow", ["bash", str(ROOT / "docker/mlflow-server.sh")], self._mlflow_env(base))
            self.airflow_env = airflow_env = self._airflow_env(base)
            init = self.services.start(
                "airflow-init", [*ENTRYPOINT, "bash", str(ROOT / "scripts/airflow-init.sh")], airflow_env
            )
            assert init.wait(timeout=300) == 0, self.services.log_tail("airflow-init")
            del self.services.processes["airflow-init"]
            for name, command in {
                "api-server": ["airflow", "api-server", "--port", str(self.api_port), "--host", "127.0.0.1"],
                "scheduler": ["airflow", "scheduler"],
                "dag-processor": ["airflow", "dag-processor"],
            }.items():
                self.services.start(name, [*ENTRYPOINT, *command], airflow_env)
            self.start_worker()
            self._wait_until_ready()
            return self
        except BaseException:
            self.close()
            raise

    def start_worker(self) -> None:
        """The Celery worker (again, after a test killed it: same name, queues and log port)."""
        # No log server: Airflow binds it to every interface, and the API server reads the logs
        # from the shared local folder here (the compose stack's workers do serve theirs).
        command = ["airflow", "celery", "worker", "--queues", "default,gpu", "--concurrency", "2", "--skip-serve-logs"]
        self.services.start("worker", [*ENTRYPOINT, *command], self.airflow_env)

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(OWN_PREFIXES)}
        return {
            **env,
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "GX_ANALYTICS_ENABLED": "False",
        }

    def _mlflow_env(self, base: dict[str, str]) -> dict[str, str]:
        return {
            **base,
            "MLFLOW_BACKEND_STORE_URI": f"{POSTGRES}/{self.databases[1]}",
            "MLFLOW_AUTH_DATABASE_URI": f"{POSTGRES}/{self.databases[2]}",
            "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{self.bucket}/mlflow",
            "MLFLOW_S3_ENDPOINT_URL": self.proxy.url,
            "MLFLOW_AUTH_ADMIN_USERNAME": self.mlflow_user[0],
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.mlflow_user[1],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
            "MLFLOW_HOST": "127.0.0.1",
            "MLFLOW_PORT": str(self.mlflow_port),
            "MLFLOW_WORKERS": "1",
        }

    def _airflow_env(self, base: dict[str, str]) -> dict[str, str]:
        from cryptography.fernet import Fernet

        database = f"{POSTGRES}/{self.databases[0]}"
        return {
            **base,
            "AIRFLOW_HOME": str(self.workdir / "airflow"),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": database,
            "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:6379/{self.redis_db}",
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{database}",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
            "AIRFLOW__API__BASE_URL": self.api_url,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
            "AIRFLOW__API__SECRET_KEY": secrets.token_hex(32),
            "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(self.log_port),
            # The compose stack's auth: FAB, its users made by airflow-init from the environment.
            "AIRFLOW__CORE__AUTH_MANAGER": "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager",
            "AIRFLOW_ADMIN_USERNAME": self.airflow_user[0],
            "AIRFLOW_ADMIN_PASSWORD": self.airflow_user[1],
            "AIRFLOW_USERS": f"{self.viewer[0]}:Viewer",
            "AIRFLOW_USER_PASSWORDS": json.dumps({self.viewer[0]: self.viewer[1]}),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            # Unpausing a DAG would start its latest weekly run too; here only triggered runs run.
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            # A task whose worker died is noticed after 30 s without a heartbeat (default 300 s),
            # checked every 5 s; the task supervisor heartbeats every 5 s, six per window.
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT_S),
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
            "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "5",
            "PIPELINE_HOME": str(self.workdir / "pipeline-home"),
            "PIPELINE_STORAGE_URI": f"s3://{self.bucket}/pipeline",
            "PIPELINE_SOURCE_URI": f"s3://{self.bucket}/datasets/a",
            "PIPELINE_MODEL_NAME": MODEL,  # as docker/.env.example sets it; else "a-classifier"
            "PIPELINE_TRAIN_QUEUE": "gpu",
            "PIPELINE_MLFLOW_UI_URL": self.mlflow_url,
            # Alerts from the workers, through the Airflow connection a team would define.
            "PIPELINE_ALERT_TO": RECIPIENT,
            "AIRFLOW_CONN_SMTP_DEFAULT": self.mail.connection(),
            "MLFLOW_TRACKING_URI": self.mlflow_proxy.url,
            "MLFLOW_TRACKING_USERNAME": self.mlflow_user[0],
            "MLFLOW_TRACKING_PASSWORD": self.mlflow_user[1],
            "AWS_ENDPOINT_URL": self.proxy.url,
        }

    def _wait_until_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        for port in (self.mlflow_port, self.api_port):
            while not _answers(
                f"http://127.0.0.1:{port}/health"
                if port == self.mlflow_port
                else f"http://127.0.0.1:{port}/api/v2/monitor/health"
            ):
                self.services.check_alive()
                assert time.monotonic() < deadline, f"port {port} not ready after {timeout}s"
                time.sleep(1)
        self.api = AirflowApi(self.api_url, *self.airflow_user)
        while True:
            self.services.check_alive()
            answer = self.api.session.get(f"{self.api_url}/api/v2/dags/{DAG_ID}", timeout=30)
            if answer.ok:
                break
            errors = self.api.call("GET", "/importErrors")
            assert not errors["import_errors"], errors
            assert time.monotonic() < deadline, f"{DAG_ID} not parsed after {timeout}s"
            time.sleep(2)
        self.api.call("PATCH", f"/dags/{DAG_ID}", json={"is_paused": False})

    # --- use -----------------------------------------------------------------------------------

    def upload_dataset(self, prefix: str, folder: Path) -> str:
        for name in IDX_FILES.values():
            self.s3.upload_file(str(folder / name), self.bucket, f"{prefix}/{name}")
        return f"s3://{self.bucket}/{prefix}"

    def keys(self, prefix: str) -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    def wait_for_run(self, run_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while (run := self.api.run(run_id))["state"] not in ("success", "failed"):
            self.services.check_alive()
            assert time.monotonic() < deadline, f"{run_id} still {run['state']} after {timeout}s: {self.states(run_id)}"
            time.sleep(3)
        return run

    def states(self, run_id: str) -> dict[str, str]:
        return {task: ti["state"] for task, ti in self.api.task_instances(run_id).items()}

    def failures(self, run_id: str) -> str:
        """Every task's state and the end of each failed task's last log, for assertion messages."""
        tis = self.api.task_instances(run_id)
        report = [str({task: ti["state"] for task, ti in tis.items()})]
        for task, ti in tis.items():
            if ti["state"] == "failed":
                report.append(
                    f"--- {task}, try {ti['try_number']}:\n{self.api.log(run_id, task, ti['try_number'])[-3000:]}"
                )
        return "\n".join(report)

    def mlflow_client(self, monkeypatch: pytest.MonkeyPatch):
        from mlflow import MlflowClient

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", self.mlflow_user[0])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", self.mlflow_user[1])
        return MlflowClient(tracking_uri=self.mlflow_url, registry_uri=self.mlflow_url)

    # --- stop ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every process; drop the databases, the Redis database and the bucket."""
        if self._closed:
            return
        self._closed = True
        self.leftovers = self.services.stop()
        self.proxy.stop()
        self.mlflow_proxy.stop()
        with contextlib.suppress(Exception):
            self.mail.__exit__()
        with contextlib.suppress(Exception):
            self._drop_databases()
        with contextlib.suppress(Exception):
            import redis

            redis.Redis(host="127.0.0.1", port=6379, db=self.redis_db).flushdb()
        with contextlib.suppress(Exception):
            for key in self.keys(""):
                self.s3.delete_object(Bucket=self.bucket, Key=key)
            self.s3.delete_bucket(Bucket=self.bucket)

    @property
    def ports(self) -> list[int]:
        return [self.api_port, self.mlflow_port, self.log_port, self.proxy.port, self.mlflow_proxy.port, self.mail.port]

    def _create_databases(self) -> None:
        with _postgres() as cursor:
            for name in self.databases:
                cursor.execute(f'CREATE DATABASE "{name}"')

    def _drop_databases(self) -> None:
        with _postgres() as cursor:
            for name in self.databases:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    @staticmethod
    def _free_redis_db() -> int:
        import redis

        for db in np.random.default_rng().permutation(range(1, 16)):
            if redis.Redis(host="127.0.0.1", port=6379, db=int(db)).dbsize() == 0:
                return int(db)
        raise RuntimeError("no empty Redis database among 1-15 for the Celery broker")


@contextlib.contextmanager
def _postgres() -> Iterator:
    import psycopg2

    connection = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            yield cursor
    finally:
        connection.close()


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).ok
    except requests.RequestException:
        return False


@pytest.fixture(scope="module")
def stack(moto_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    the_stack = Stack(tmp_path_factory.mktemp("stack"), int(moto_endpoint.rsplit(":", 1)[1])).open()
    try:
        yield the_stack
    finally:
        the_stack.close()


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory, real_splits) -> dict[str, Path]:
    """Three small real subsets with different content (so each one is fetched and stored anew)."""
    (xtr, ytr), (xte, yte) = real_splits["train"], real_splits["t10k"]
    folders = {}
    for i, name in enumerate("abc"):
        train, test = slice(2000 * i, 2000 * (i + 1)), slice(500 * i, 500 * (i + 1))
        splits = {"train": (xtr[train], ytr[train]), "t10k": (xte[test], yte[test])}
        folders[name] = write_dataset(tmp_path_factory.mktemp(f"subset-{name}"), splits)
    return folders


def raw_objects(stack: Stack) -> dict[str, list[str]]:
    """The stored raw datasets: {dataset hash: file names under raw/<hash>/}."""
    by_hash: dict[str, list[str]] = {}
    for key in stack.keys("pipeline/raw/"):
        digest, name = key.removeprefix("pipeline/raw/").split("/", 1)
        by_hash.setdefault(digest, []).append(name)
    return by_hash


EXPECTED_RAW = sorted([*IDX_FILES.values(), "MANIFEST.json"])


def test_finding_test_services_listen_beyond_loopback(stack):
    import ipaddress

    import psutil

    pids = set()
    for process in stack.services.processes.values():
        try:
            parent = psutil.Process(process.pid)
            pids |= {parent.pid, *(child.pid for child in parent.children(recursive=True))}
        except psutil.NoSuchProcess:
            pass
    sockets = {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    }
    assert sockets, "the stack's processes listen nowhere: the test looked at the wrong processes"
    beyond = sorted(s for s in sockets if not ipaddress.ip_address(s[0]).is_loopback)
    assert beyond == [], f"listening beyond loopback: {beyond}"


@pytest.fixture(scope="module")
def outage_run(stack: Stack, datasets: dict[str, Path]) -> dict:
    """One triggered run through an S3 outage in acquire (one run for two tests, to keep CI
    short): the first 64 KiB of the downloads pass, then the endpoint goes away mid-transfer for
    20 s; the retry finds it back and the run goes on to staging."""
    source = stack.upload_dataset("datasets/b", datasets["b"])
    seen: dict = {"raw_before": raw_objects(stack)}
    stack.proxy.cut_after(64 * 1024)
    seen["run_id"] = run_id = stack.api.trigger({"source_uri": source, **QUICK})
    assert stack.proxy.cut.wait(timeout=300), f"no S3 traffic from acquire: {stack.states(run_id)}"
    seen["acquire_at_cut"] = stack.api.task_instances(run_id)["acquire"]["state"]
    time.sleep(20)
    stack.proxy.start()
    seen["run"] = stack.wait_for_run(run_id, timeout=900)
    return seen


def test_a_triggered_run_trains_on_the_gpu_queue_and_registers_on_the_mlflow_server(stack, outage_run, monkeypatch):
    run_id = outage_run["run_id"]
    tis = stack.api.task_instances(run_id)
    assert outage_run["run"]["state"] == "success", stack.failures(run_id)
    assert tis["train"]["queue"] == "gpu" and tis["acquire"]["queue"] == "default"
    assert tis["promote"]["state"] == "skipped"  # promotion manual: the run stops at staging
    client = stack.mlflow_client(monkeypatch)
    version = client.get_model_version_by_alias(MODEL, "staging")
    mlflow_run = client.get_run(version.run_id)
    assert mlflow_run.data.tags["airflow.run_id"] == run_id
    assert version.tags["gate.decision"] == "passed" and version.tags["infra_validation"] == "passed"
    # The server keeps artifacts in S3 (clients only see mlflow-artifacts:/ URIs) ...
    assert mlflow_run.info.artifact_uri.startswith("mlflow-artifacts:/")
    artifacts = stack.keys("mlflow/")
    assert any(key.endswith("evaluation/model_card.md") for key in artifacts)
    assert any(key.endswith("/MLmodel") for key in artifacts)
    # ... and answers no one without credentials.
    assert requests.get(f"{stack.mlflow_url}/api/2.0/mlflow/registered-models/search", timeout=30).status_code == 401
    # The pipeline's own objects are in S3 under their content hashes.
    digest = version.tags["dataset_hash"]
    assert sorted(raw_objects(stack)[digest]) == EXPECTED_RAW
    assert f"pipeline/checkpoints/{version.run_id}/best.ckpt" in stack.keys("pipeline/checkpoints/")
    assert any(key.endswith("/train.npz") for key in stack.keys("pipeline/processed/"))


def test_the_plugin_links_task_instances_to_what_they_made_behind_airflows_login(stack, outage_run, monkeypatch):
    """The API server loads the plugin: its links resolve from the run's XComs to the MLflow UI
    and to the plugin's pages, which answer a logged-in user and no one else."""
    run_id = outage_run["run_id"]
    assert outage_run["run"]["state"] == "success", stack.failures(run_id)
    [plugin] = [p for p in stack.api.call("GET", "/plugins")["plugins"] if p["name"] == "image_pipeline"]
    assert len(plugin["global_operator_extra_links"]) == 5
    assert [app["url_prefix"] for app in plugin["fastapi_apps"]] == ["/pipeline"]

    def task_links(task_id: str) -> dict[str, str | None]:
        return stack.api.call("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/links")["extra_links"]

    client = stack.mlflow_client(monkeypatch)
    version = client.get_model_version_by_alias(MODEL, "staging")
    train = task_links("train")
    assert train["MLflow run"] == f"{stack.mlflow_url}/#/runs/{version.run_id}"
    assert train["Model version"] is None and train["Data report"] is None  # not this task's
    register = task_links("register")
    assert register["Model version"] == f"{stack.mlflow_url}/#/models/{MODEL}/versions/{version.version}"
    card_url = register["Model card"]
    assert card_url == f"/pipeline/models/{MODEL}/versions/{version.version}/card"
    report_url = task_links("validate")["Data report"]
    assert report_url.startswith("/pipeline/dags/training_pipeline/dagRuns/") and report_url.endswith(
        "/validate/report"
    )

    for url, words in ((card_url, "Model card"), (report_url, "Data report for dataset")):
        answer = stack.api.session.get(f"{stack.api_url}{url}", timeout=60)
        assert answer.status_code == 200, answer.text[:500]
        assert answer.headers["content-type"].startswith("text/html") and words.lower() in answer.text.lower()
        assert "sandbox" in answer.headers["content-security-policy"]
        assert requests.get(f"{stack.api_url}{url}", timeout=30).status_code == 401  # no token
    # A task instance that made no report, and a version that does not exist: 404 in one line.
    missing = stack.api.session.get(stack.api_url + report_url.replace("/validate/", "/train/"), timeout=30)
    assert missing.status_code == 404 and "training_pipeline.train" in missing.json()["detail"]
    gone = stack.api.session.get(f"{stack.api_url}/pipeline/models/{MODEL}/versions/999/card", timeout=60)
    assert gone.status_code == 404 and "999" in gone.json()["detail"]


def test_an_s3_outage_during_acquisition_is_retried_and_the_data_is_stored_once(stack, outage_run):
    run_id = outage_run["run_id"]
    assert outage_run["acquire_at_cut"] in ("running", "up_for_retry", "failed")
    acquire = stack.api.task_instances(run_id)["acquire"]
    assert outage_run["run"]["state"] == "success", stack.failures(run_id)
    assert acquire["try_number"] >= 2, "acquire should have failed once and been retried"
    first_try = stack.api.log(run_id, "acquire", 1)
    assert "SourceUnavailableError" in first_try and stack.proxy.url in first_try, first_try[-2000:]
    # Stored once: the new dataset's four files and manifest, nothing else new, no upload left open.
    stored = raw_objects(stack)
    new = set(stored) - set(outage_run["raw_before"])
    assert len(new) == 1 and sorted(stored[new.pop()]) == EXPECTED_RAW
    assert not stack.s3.list_multipart_uploads(Bucket=stack.bucket).get("Uploads")


def test_with_s3_down_for_good_the_run_fails_naming_the_endpoint_and_registers_nothing(stack, datasets, monkeypatch):
    source = stack.upload_dataset("datasets/c", datasets["c"])
    client = stack.mlflow_client(monkeypatch)
    versions_before = len(client.search_model_versions(f"name = '{MODEL}'"))
    stack.proxy.stop()
    try:
        run_id = stack.api.trigger({"source_uri": source, **QUICK})
        # Three tries of acquire, each bounded by boto3's retries (5 attempts, 5 s connect
        # timeout), with Airflow's backoff (30 s, then 60 s) between them.
        run = stack.wait_for_run(run_id, timeout=600)
    finally:
        stack.proxy.start()

    tis = stack.api.task_instances(run_id)
    assert run["state"] == "failed"
    assert tis["acquire"]["state"] == "failed" and tis["acquire"]["try_number"] == 3
    assert {tis[task]["state"] for task in ("validate", "train", "register")} == {"upstream_failed"}
    last_try = stack.api.log(run_id, "acquire", 3)
    assert f"expected a reachable S3 endpoint at {stack.proxy.url}" in last_try, last_try[-2000:]
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == versions_before


def wait_for(probe, timeout: float, what: str, stack: Stack):
    """``probe()``'s first truthy answer, polled every half second."""
    deadline = time.monotonic() + timeout
    while not (found := probe()):
        stack.services.check_alive()
        assert time.monotonic() < deadline, f"no {what} after {timeout}s"
        time.sleep(0.5)
    return found


def runs_of(client, dag_run_id: str) -> list:
    """The MLflow runs a DAG run's training created (tagged with its id)."""
    experiment = client.get_experiment_by_name("training_pipeline")
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`airflow.run_id` = '{dag_run_id}'")


@pytest.fixture(scope="module")
def faulted_run(stack: Stack, datasets: dict[str, Path]) -> dict:
    """One DAG run through two faults, one per task (one run, not two, to keep CI short): the
    Celery worker SIGKILLed in train's second epoch, and MLflow unreachable for 20 s from the
    moment the server created register's version (its answer lost, so the client retries)."""
    source = stack.upload_dataset("datasets/a", datasets["a"])
    before = set(stack.keys("pipeline/checkpoints/"))
    seen: dict = {}
    stack.mlflow_proxy.cut_at_request(b"/model-versions/create")
    try:
        # Three epochs: a config of its own (trained anew), and the kill lands in the second.
        seen["run_id"] = run_id = stack.api.trigger({"source_uri": source, **QUICK, "epochs": 3})
        seen["checkpoint"] = wait_for(
            lambda: next(
                (
                    key
                    for key in stack.keys("pipeline/checkpoints/")
                    if key.endswith("/last.ckpt") and key not in before
                ),
                None,
            ),
            timeout=600,
            what=f"epoch checkpoint from train: {stack.states(run_id)}",
            stack=stack,
        )
        seen["train_at_kill"] = stack.api.task_instances(run_id)["train"]["state"]
        # The worker, its pool, the task supervisor and the task itself (a process group of its own).
        worker = stack.services.processes["worker"]
        seen["killed"] = kill_session(worker.pid)
        worker.wait(timeout=30)
        stack.start_worker()
        assert stack.mlflow_proxy.cut.wait(timeout=900), f"register never created a version: {stack.states(run_id)}"
        seen["register_at_cut"] = stack.api.task_instances(run_id)["register"]["state"]
        time.sleep(20)
    finally:
        stack.mlflow_proxy.cut_at_request(None)
        if stack.mlflow_proxy.cut.is_set():
            stack.mlflow_proxy.start()
    seen["run"] = stack.wait_for_run(run_id, timeout=900)
    return seen


def test_fault_worker_sigkilled_during_train_is_rerun_resumes_and_registers_once(stack, faulted_run, monkeypatch):
    run_id, mlflow_run_id = faulted_run["run_id"], faulted_run["checkpoint"].split("/")[2]
    assert faulted_run["train_at_kill"] == "running" and len(faulted_run["killed"]) >= 4

    assert faulted_run["run"]["state"] == "success", stack.failures(run_id)
    assert stack.api.task_instances(run_id)["train"]["try_number"] == 2
    noticed = stack.api.call(
        "GET",
        "/eventLogs",
        params={"dag_id": DAG_ID, "run_id": run_id, "task_id": "train", "event": "heartbeat timeout"},
    )
    assert noticed["total_entries"] == 1, noticed
    # The retry continued the killed try's MLflow run from its last checkpoint.
    retry_log = stack.api.log(run_id, "train", 2)
    assert f"resuming run {mlflow_run_id}" in retry_log, retry_log[-3000:]
    client = stack.mlflow_client(monkeypatch)
    [mlflow_run] = runs_of(client, run_id)
    assert mlflow_run.info.run_id == mlflow_run_id and mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.metrics["epochs"] == 3
    # Epoch 1 was saved before the kill (its metric may not have been logged); 2 and 3 ran once.
    saved_epochs = [int(m.value) for m in client.get_metric_history(mlflow_run_id, "checkpoint_epoch")]
    assert saved_epochs[-2:] == [2, 3] and saved_epochs.count(2) == 1, saved_epochs
    assert len(client.search_model_versions(f"name = '{MODEL}' and run_id = '{mlflow_run_id}'")) == 1


# What pipeline.registry.register.register puts on every version it registers.
VERSION_TAGS = {
    "dataset_hash",
    "processed_hash",
    "train_config_hash",
    "code_version",
    "run_id",
    "validation",
    "data_report",
    "test_accuracy",
    "classes",
}


def test_fault_mlflow_down_20s_during_register_gives_exactly_one_complete_version(stack, faulted_run, monkeypatch):
    from pipeline.registry.history import read_history

    run_id, mlflow_run_id = faulted_run["run_id"], faulted_run["checkpoint"].split("/")[2]
    assert faulted_run["register_at_cut"] == "running"

    assert faulted_run["run"]["state"] == "success", stack.failures(run_id)
    # MLflow's client retries (7, backoff factor 2: about 28 s before the fifth) outlast the
    # outage; the first retry repeated the creation whose answer was lost.
    assert stack.api.task_instances(run_id)["register"]["try_number"] == 1
    register_log = stack.api.log(run_id, "register", 1)
    assert "Remote end closed connection without response')': /api/2.0/mlflow/model-versions/create" in register_log
    client = stack.mlflow_client(monkeypatch)
    [version] = client.search_model_versions(f"name = '{MODEL}' and run_id = '{mlflow_run_id}'")
    assert VERSION_TAGS <= set(version.tags), VERSION_TAGS - set(version.tags)
    assert version.tags["run_id"] == mlflow_run_id and version.description
    assert version.tags["infra_validation"] == "passed"  # the run's later tasks used this version
    assert client.get_model_version_by_alias(MODEL, "candidate").version == version.version
    registered = [
        move for move in read_history(client, MODEL) if move.action == "register" and move.to_version == version.version
    ]
    assert len(registered) == 1, registered


def wait_for_approval(stack: Stack, run_id: str, timeout: float = 600) -> dict:
    """The run's approval request once its ``approve`` task waits for a person."""
    deadline = time.monotonic() + timeout
    while (state := stack.states(run_id).get("approve")) != "awaiting_input":
        assert state not in ("failed", "skipped", "upstream_failed"), stack.failures(run_id)
        assert stack.api.run(run_id)["state"] in ("queued", "running"), stack.failures(run_id)
        assert time.monotonic() < deadline, f"approve still {state} after {timeout}s: {stack.states(run_id)}"
        time.sleep(3)
    return stack.api.call("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/approve/-1/hitlDetails")


def answer(stack: Stack, run_id: str, option: str, comment: str) -> requests.Response:
    return stack.api.session.patch(
        f"{stack.api_url}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/approve/-1/hitlDetails",
        json={"chosen_options": [option], "params_input": {"comment": comment}},
        timeout=30,
    )


@pytest.fixture(scope="module")
def approved(stack: Stack, outage_run: dict, faulted_run: dict) -> dict:
    """A run with promotion approval on the data of the first run (its model reused: nothing
    is trained), approved through the REST API by the stack's user."""
    source = f"s3://{stack.bucket}/datasets/b"
    run_id = stack.api.trigger({"source_uri": source, **QUICK, "promotion": "approval"})
    request = wait_for_approval(stack, run_id)
    models = stack.api.session.get(f"{stack.api_url}/pipeline/api/models", timeout=60)
    response = answer(stack, run_id, "Approve", "read the model card")
    again = answer(stack, run_id, "Reject", "changed my mind")
    return {
        "run_id": run_id,
        "request": request,
        "models": models,
        "response": response,
        "again": again,
        "run": stack.wait_for_run(run_id, 600),
    }


def test_an_approval_waits_for_a_person_and_records_who_approved(stack, approved, monkeypatch):
    from pipeline.registry.history import read_history

    run_id, request = approved["run_id"], approved["request"]
    assert approved["response"].status_code == 200, approved["response"].text
    assert approved["response"].json()["responded_by"]["name"] == stack.airflow_user[0]
    assert approved["run"]["state"] == "success", stack.failures(run_id)
    states = stack.states(run_id)
    assert states["promote"] == "success" and states["reject"] == "skipped" and states["train"] == "success"
    client = stack.mlflow_client(monkeypatch)
    version = client.get_model_version_by_alias(MODEL, "production")
    assert request["subject"] == f"Promote {MODEL} version {version.version} to production?"
    assert "| test accuracy |" in request["body"] and f"#/models/{MODEL}/versions/{version.version}" in request["body"]
    assert request["options"] == ["Approve", "Reject"]
    # While it waited, the Models page listed it, with where to answer.
    assert approved["models"].status_code == 200, approved["models"].text
    [pending] = [p for p in approved["models"].json()["pending_approvals"] if p["run_id"] == run_id]
    assert pending["subject"] == request["subject"] and pending["url"].endswith("/tasks/approve")
    last = read_history(client, MODEL)[-1]
    assert (last.alias, last.action, last.to_version) == ("production", "promote", version.version)
    assert last.actor == f"{stack.airflow_user[0]} via airflow:{DAG_ID}/{run_id}"
    assert last.reason == "approved: read the model card"
    assert version.tags["approval.decision"] == "approved"
    # The alert said it waited, with the way to answer.
    waiting = [i for i, subject in enumerate(stack.mail.subjects()) if "approval needed" in subject]
    [body] = [stack.mail.body(i) for i in waiting if run_id in stack.mail.body(i)]
    assert f"{MODEL} version {version.version}" in body and "/tasks/approve" in body


def test_a_second_answer_to_an_answered_approval_is_refused(approved):
    assert approved["again"].status_code == 409, approved["again"].text


def test_a_rejected_candidate_leaves_production_and_the_history_says_who_and_why(stack, approved, monkeypatch):
    """The faulted run's version (reused: its data and config again) put up for approval, and rejected."""
    from pipeline.registry.history import read_history

    client = stack.mlflow_client(monkeypatch)
    production = client.get_model_version_by_alias(MODEL, "production").version
    source = f"s3://{stack.bucket}/datasets/a"
    conf = {
        "source_uri": source,
        **QUICK,
        "epochs": 3,
        "promotion": "approval",
        "gate_max_class_drop": 0.3,
        "gate_max_accuracy_drop": 0.3,
    }
    run_id = stack.api.trigger(conf)
    request = wait_for_approval(stack, run_id)
    candidate = request["subject"].split(" version ")[1].split(" ")[0]
    assert candidate != production
    refused = answer(stack, run_id, "Reject", "Shirt recall too low")
    assert refused.status_code == 200, refused.text
    run = stack.wait_for_run(run_id, 600)
    assert run["state"] == "success", stack.failures(run_id)
    states = stack.states(run_id)
    assert states["reject"] == "success" and states["promote"] == "skipped"
    assert client.get_model_version_by_alias(MODEL, "production").version == production
    last = read_history(client, MODEL)[-1]
    assert (last.action, last.from_version, last.to_version) == ("reject", production, candidate)
    assert last.actor == f"{stack.airflow_user[0]} via airflow:{DAG_ID}/{run_id}"
    assert last.reason == "rejected: Shirt recall too low"
    assert client.get_model_version(MODEL, candidate).tags["approval.decision"] == "rejected"


def browser_session(stack: Stack) -> requests.Session:
    """What the Airflow UI's browser sends to the Models page: the session cookie, its own Origin,
    and an Accept for HTML (the page's forms are plain posts)."""
    token = stack.api.session.headers["Authorization"].split()[1]
    browser = requests.Session()
    browser.cookies.set("_token", token)
    browser.headers.update({"Origin": stack.api_url, "Accept": "text/html"})
    return browser


def press(stack: Stack, browser: requests.Session, path: str, form: dict, dag_id: str) -> tuple[str, dict]:
    """Press one of the Models page's buttons; returns the run it triggered, once finished."""
    pressed = browser.post(f"{stack.api_url}/pipeline{path}", data=form, allow_redirects=False, timeout=60)
    assert pressed.status_code == 303, pressed.text
    shown = browser.get(f"{stack.api_url}{pressed.headers['location']}", timeout=60).text
    run_id = pressed.headers["location"].split(f"{dag_id}+run+", 1)[1].split("+", 1)[0]
    run_id = unquote(run_id)
    assert f"{dag_id} run {run_id} will move production" in shown
    return run_id, finished(stack, dag_id, run_id)


def finished(stack: Stack, dag_id: str, run_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while (run := stack.api.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}"))["state"] not in ("success", "failed"):
        assert time.monotonic() < deadline, f"{dag_id} {run_id} still {run['state']}"
        time.sleep(2)
    return run


def test_promote_and_roll_back_from_the_models_page_as_the_logged_in_user(stack, approved, monkeypatch):
    """After the rejection: the page neither offers nor accepts the rejected staging version; a
    person naming it through the REST API promotes it anyway; then the page's Roll back button
    puts production back; through the real API server, as its user, recorded in the history."""
    from pipeline.registry.history import read_history

    client = stack.mlflow_client(monkeypatch)
    production = client.get_model_version_by_alias(MODEL, "production").version
    staging = client.get_model_version_by_alias(MODEL, "staging").version
    browser = browser_session(stack)
    page = browser.get(f"{stack.api_url}/pipeline/models", timeout=60).text
    assert f"Roll back production (v{production})" in page and f"Promote v{staging}" not in page  # rejected

    form = {"version": staging, "reason": "second look at the card"}
    pressed = browser.post(
        f"{stack.api_url}/pipeline/models/{MODEL}/promote", data=form, allow_redirects=False, timeout=60
    )
    assert pressed.status_code == 303 and "error=" in pressed.headers["location"], pressed.text
    shown = browser.get(f"{stack.api_url}{pressed.headers['location']}", timeout=60).text
    assert "expected a staging version no one rejected" in shown
    conf = {"model_name": MODEL, "version": staging, "reason": "second look at the card"}
    run_id = stack.api.call("POST", "/dags/promote_model/dagRuns", json={"logical_date": None, "conf": conf})[
        "dag_run_id"
    ]
    run = finished(stack, "promote_model", run_id)
    assert run["state"] == "success" and run["triggering_user_name"] == stack.airflow_user[0]
    assert client.get_model_version_by_alias(MODEL, "production").version == staging
    last = read_history(client, MODEL)[-1]
    assert (last.action, last.to_version) == ("promote", staging)
    assert last.actor == f"{stack.airflow_user[0]} via airflow:promote_model/{run_id}"
    assert "second look at the card" in last.reason

    run_id, run = press(stack, browser, f"/models/{MODEL}/rollback", {"reason": "undo it"}, "rollback_model")
    assert run["state"] == "success"
    assert client.get_model_version_by_alias(MODEL, "production").version == production
    last = read_history(client, MODEL)[-1]
    assert (last.action, last.from_version, last.to_version) == ("rollback", staging, production)
    assert last.actor == f"{stack.airflow_user[0]} via airflow:rollback_model/{run_id}"

    # A Viewer of the FAB auth manager reads the page, sees no button, and may not press one.
    viewer = AirflowApi(stack.api_url, *stack.viewer)
    seen = viewer.session.get(f"{stack.api_url}/pipeline/models", timeout=60)
    assert seen.status_code == 200 and "<form" not in seen.text
    refused = viewer.session.post(f"{stack.api_url}/pipeline/models/{MODEL}/rollback", data={"reason": "x"}, timeout=60)
    assert refused.status_code == 403, refused.text
    assert client.get_model_version_by_alias(MODEL, "production").version == production

    forged = requests.post(
        f"{stack.api_url}/pipeline/models/{MODEL}/rollback",
        data={"reason": "forged"},
        cookies={"_token": stack.api.session.headers["Authorization"].split()[1]},
        headers={"Origin": "https://elsewhere.example", "Accept": "text/html"},
        timeout=60,
    )
    assert forged.status_code == 403, forged.text


def test_alerts_reached_the_mail_server_from_the_workers(stack, approved):
    """The faults' failed tries are retried, not alerted; a run that failed for good was."""
    subjects = stack.mail.subjects()
    assert any("approval needed" in s for s in subjects), subjects
    assert any(s.startswith("[image-pipeline] training_pipeline.acquire failed: ") for s in subjects), subjects


def test_stopping_the_stack_leaves_no_process_or_port_behind(stack):
    stack.close()

    assert stack.leftovers == []
    assert [port for port in stack.ports if not port_is_free(port)] == []
    with _postgres() as cursor:
        cursor.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (f"stack_{stack.id}_%",))
        assert cursor.fetchall() == []
