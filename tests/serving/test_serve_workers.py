"""``pipeline serve --workers N``: N server processes on one port, each with its own copy of the
model and its share of the endpoint's limits, their metrics added up, ended with the supervisor
however it ends. (Promotion and rollback through two workers under load:
tests/integration/test_deployment.py.)"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import requests
from recipes import log_model
from services import free_port, wait_until_ready
from torch import nn

from pipeline.command_lines import serve_command
from pipeline.config import ServingSettings
from pipeline.entrypoints.cli import build_parser
from pipeline.errors import ConfigError


def test_workers_default_to_one_and_zero_means_one_per_core():
    assert ServingSettings.from_env({}).worker_count(cpus=8) == 1
    assert ServingSettings.from_env({"PIPELINE_SERVE_WORKERS": "0"}).worker_count(cpus=8) == 8
    assert ServingSettings.from_env({"PIPELINE_SERVE_WORKERS": "3"}).worker_count(cpus=8) == 3
    args = build_parser().parse_args(serve_command("models:/m@production", port=8125, workers=2)[3:])
    assert args.workers == 2
    assert build_parser().parse_args(serve_command("models:/m@production", port=8125)[3:]).workers is None


def test_a_negative_worker_count_is_refused_naming_the_variable():
    with pytest.raises(ConfigError, match="PIPELINE_SERVE_WORKERS"):
        ServingSettings.from_env({"PIPELINE_SERVE_WORKERS": "-1"})


def test_each_worker_holds_its_share_of_the_endpoints_limits():
    endpoint = ServingSettings(max_connections=100, max_in_flight=64, max_buffered_bytes=256 * 1024 * 1024)
    assert endpoint.per_worker(1) == endpoint
    share = endpoint.per_worker(2)
    assert (share.max_connections, share.max_in_flight, share.max_buffered_bytes) == (50, 32, 128 * 1024 * 1024)
    assert share.workers == 1 and share.runtime == endpoint.runtime and share.keep_alive_s == endpoint.keep_alive_s
    tiny = ServingSettings(max_connections=3, max_in_flight=1, max_buffered_bytes=1024 * 1024).per_worker(4)
    assert (tiny.max_connections, tiny.max_in_flight, tiny.max_buffered_bytes) == (1, 1, 1024 * 1024)


def _workers(server: subprocess.Popen) -> list[psutil.Process]:
    """The supervisor's spawned worker processes (not multiprocessing's resource tracker)."""
    return [
        p
        for p in psutil.Process(server.pid).children()
        if "spawn_main" in " ".join(p.cmdline()) and "resource_tracker" not in " ".join(p.cmdline())
    ]


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


@pytest.mark.slow
def test_two_workers_answer_on_one_port_add_up_their_metrics_and_die_with_a_killed_supervisor(settings, small_splits):
    from pipeline.registry.register import register_version

    net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10), nn.Softmax(dim=1)).eval()
    run_id, model_uri = log_model(settings, net, "pt2")
    version, _ = register_version(settings, run_id, model_uri, "test")
    port = free_port()
    server = subprocess.Popen(
        serve_command(f"models:/{settings.model_for()}/{version}", port=port, workers=2),
        env={**settings.to_env(), "PATH": str(Path(sys.executable).parent)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    images = small_splits["t10k"][0][:8]
    sent = 0
    try:
        wait_until_ready(server, port, timeout=180)
        workers = _workers(server)
        assert len(workers) == 2, [p.cmdline() for p in psutil.Process(server.pid).children()]
        # Each new connection goes to one worker or the other; every one of them answers.
        for image in images.tolist() * 3:
            with requests.Session() as session:
                answer = session.post(f"http://127.0.0.1:{port}/predict", json={"image": image}, timeout=60)
            assert answer.status_code == 200 and answer.json()["model_version"] == version
            sent += 1
        samples = _samples(requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
        predicted = {"route": "/predict", "code": "200"}
        assert sum(
            value for name, labels, value in samples if name == "serve_requests_total" and labels == predicted
        ) == (sent), "both workers' counts, added up"
        versions = [(labels["version"], value) for name, labels, value in samples if name == "serve_model_version"]
        assert versions == [(version, 1.0)]
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert alive == [], f"workers left serving the port: {[p.pid for p in alive]}"
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/health", timeout=5)


@pytest.mark.slow
def test_a_model_that_does_not_load_stops_every_worker_and_exits_2(settings):
    port = free_port()
    done = subprocess.run(
        serve_command(f"models:/{settings.model_for()}/7", port=port, workers=2),
        env={**settings.to_env(), "PATH": str(Path(sys.executable).parent)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "a model that loads" in done.stderr and "did not load in a worker" in done.stderr, done.stderr[-2000:]
    with pytest.raises(requests.ConnectionError):  # no worker left behind on the port
        requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
