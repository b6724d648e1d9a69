"""`pipeline serve` as a process: its JSON-decoding workers end with it, however it ends.

A pool's workers hold both ends of their task queue, so they never see it close: a server killed
by SIGKILL (an Airflow task's timeout, infra validation's last resort, the OOM killer) left them
waiting for ever, about 20 MB each; a CI run collected 32 such processes.
"""

from __future__ import annotations

import json
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
from pipeline.registry.register import register_version

pytestmark = pytest.mark.slow


def test_finding_decoder_workers_outlive_a_killed_server(settings, small_splits):
    net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10), nn.Softmax(dim=1)).eval()
    run_id, model_uri = log_model(settings, net, "pt2")
    version, _ = register_version(settings, run_id, model_uri, "test")
    port = free_port()
    server = subprocess.Popen(
        serve_command(f"models:/{settings.model_for()}/{version}", port=port),
        env={**settings.to_env(), "PATH": str(Path(sys.executable).parent)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_ready(server, port)
        images = small_splits["t10k"][0][:64].tolist()  # about 200 KB of JSON: decoded by a worker
        answer = requests.post(
            f"http://127.0.0.1:{port}/predict",
            data=json.dumps({"instances": images}),
            headers={"Content-Type": "application/json"},
            timeout=60,
        )
        assert answer.status_code == 200 and len(answer.json()["predictions"]) == 64
        workers = psutil.Process(server.pid).children(recursive=True)
        assert workers, "no decoder worker was started"
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert alive == [], f"left behind: {[p.pid for p in alive]}"
