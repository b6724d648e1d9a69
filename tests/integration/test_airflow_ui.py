"""`make airflow-ui` on a fresh home: Airflow answers on 127.0.0.1:8080 and nowhere else.

The finding: it ran `airflow standalone` with every visitor an admin, its API server on 0.0.0.0
(Airflow's default `[api] host`) and the scheduler's and triggerer's log servers on every
interface. The test starts the real command, reads the listening sockets of every process it
started, and connects to the machine's other addresses.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import requests
from services import port_is_free

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PORT = 8080


def listening(pids: set[int]) -> set[tuple[str, int]]:
    return {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    }


def tree(root: psutil.Process) -> set[int]:
    try:
        return {root.pid, *(p.pid for p in root.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


def other_addresses() -> list[str]:
    """This machine's addresses that are not loopback (the ones a neighbour could reach)."""
    found = []
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not ipaddress.ip_address(address.address).is_loopback:
                found.append(address.address)
    return found


@pytest.fixture
def airflow_ui(tmp_path: Path):
    assert port_is_free(PORT), f"port {PORT} is taken: the test needs it to check the documented address"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PIPELINE_"))}
    env["PIPELINE_HOME"] = str(tmp_path / "home")
    process = subprocess.Popen(
        ["make", "airflow-ui"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield process, Path(env["PIPELINE_HOME"])
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_finding_airflow_ui_listens_on_every_interface_with_every_visitor_an_admin(airflow_ui):
    process, home = airflow_ui
    root = psutil.Process(process.pid)
    deadline = time.monotonic() + 240
    while True:
        assert process.poll() is None, process.stdout.read().decode()[-3000:]
        try:
            if requests.get(f"http://127.0.0.1:{PORT}/api/v2/monitor/health", timeout=5).ok:
                break
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, "the Airflow UI did not answer on 127.0.0.1:8080 within 240 s"
        time.sleep(2)
    time.sleep(10)  # every component is up by now: the scheduler and triggerer start their servers early

    sockets = listening(tree(root))
    assert ("127.0.0.1", PORT) in sockets
    beyond = sorted(s for s in sockets if not ipaddress.ip_address(s[0]).is_loopback)
    assert beyond == [], f"listening beyond loopback: {beyond}"
    for address in other_addresses():
        with socket.socket() as sock:
            sock.settimeout(2)
            assert sock.connect_ex((address, PORT)) != 0, f"Airflow answers on {address}:{PORT}"
    # No login on loopback: the UI's config says every visitor is an admin there, as documented.
    assert requests.get(f"http://127.0.0.1:{PORT}/api/v2/dags", timeout=10).ok
    # The embedded stores are their owner's only.
    assert home.stat().st_mode & 0o077 == 0


def test_no_login_is_refused_on_an_address_beyond_loopback(tmp_path):
    env = {
        **os.environ,
        "AIRFLOW_UI_HOST": "0.0.0.0",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW_HOME": str(tmp_path),
    }
    out = subprocess.run([str(ROOT / "scripts" / "airflow-ui.sh")], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert out.stderr.startswith(
        "error: AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS: expected it unset or False on 0.0.0.0, found True"
    )
    assert not list(tmp_path.iterdir()), "nothing was started"
