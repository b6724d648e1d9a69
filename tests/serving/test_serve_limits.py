"""The serving endpoint under abuse, on a real uvicorn server on 127.0.0.1 (in a thread of the test
process, built by :func:`pipeline.serving.server.server_config` as ``pipeline serve`` builds it): big JSON
bodies, many slow clients, idle and slow connections. Clients are raw sockets or ``http.client``."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import psutil
import pytest
from test_serve import served

from pipeline.config import ServingSettings
from pipeline.serving.app import create_app
from pipeline.serving.server import server_config
from pipeline.serving.slot import ModelSlot

pytestmark = pytest.mark.slow

MiB = 1024 * 1024


@contextmanager
def live_server(serving: ServingSettings) -> Iterator[int]:
    import uvicorn

    slot = ModelSlot("models:/m@production")
    slot.swap(served("4"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(server_config(create_app(slot, serving=serving), serving, "127.0.0.1", port))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(15)


def get(port: int, path: str = "/health", timeout: float = 10) -> tuple[int, float]:
    start = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        status = connection.getresponse().status
    finally:
        connection.close()
    return status, time.perf_counter() - start


def head(body_bytes: int, path: str = "/predict") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {body_bytes}\r\n\r\n"
    ).encode()


def read_response(sock: socket.socket, timeout: float) -> bytes:
    """What the server sends until it closes the connection (or ``timeout`` passes)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionError):
        pass
    return data


def test_finding_json_parsed_on_the_event_loop_stalls_health(small_splits):
    """24 concurrent ~8 MB JSON bodies while /health is polled: every /predict answers and /health
    stays prompt (the issue's bar is 100 ms; asserted with a wide margin, the figure printed)."""
    images = small_splits["train"][0][:1000] / 255.0
    count = int(len(images) * 8.0e6 / len(json.dumps({"instances": images.tolist()})))
    body = json.dumps({"instances": images[:count].tolist()}).encode()
    assert 7e6 < len(body) <= 8 * MiB
    statuses, latencies, done = [], [], threading.Event()
    with live_server(ServingSettings()) as port:

        def post() -> None:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            connection.request("POST", "/predict", body=body, headers={"Content-Type": "application/json"})
            statuses.append(connection.getresponse().status)
            connection.close()

        def poll() -> None:
            while not done.is_set():
                latencies.append(get(port)[1])
                time.sleep(0.01)

        poller = threading.Thread(target=poll)
        poller.start()
        clients = [threading.Thread(target=post) for _ in range(24)]
        for client in clients:
            client.start()
        for client in clients:
            client.join(180)
        done.set()
        poller.join()
    print(
        f"/health under 24 x {len(body) / 1e6:.1f} MB JSON: {len(latencies)} polls, "
        f"p50 {np.median(latencies) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms"
    )
    assert statuses == [200] * 24
    assert max(latencies) < 0.5  # before: 0.9 s here (7 s in the issue) with the parse on the event loop


def test_finding_unbounded_slow_clients_hold_memory():
    """64 clients each declare 8 MiB, send 4 MiB and stall: beyond the limits they get 503 with
    Retry-After, memory stays bounded, /health answers, and the stalled ones get 408 and are closed."""
    serving = ServingSettings(max_in_flight=16, max_buffered_bytes=32 * MiB, body_timeout_s=3.0)
    process = psutil.Process()
    with live_server(serving) as port:
        get(port)
        before = process.memory_info().rss
        sockets = []
        for _ in range(64):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.settimeout(2)
            try:
                sock.sendall(head(8 * MiB) + b"0" * (4 * MiB))
            except (TimeoutError, ConnectionError):
                pass  # refused and closed, or the server stopped reading
            sockets.append(sock)
        grown = (process.memory_info().rss - before) / MiB
        assert get(port, timeout=5)[0] == 200
        started = time.monotonic()
        answers = [read_response(sock, serving.body_timeout_s + 5) for sock in sockets]
        waited = time.monotonic() - started
        for sock in sockets:
            sock.close()
        print(f"64 slow clients: RSS +{grown:.0f} MiB")
    refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
    timed_out = [a for a in answers if a.startswith(b"HTTP/1.1 408")]
    assert len(refused) >= 64 - 16 and all(b"\r\nretry-after: " in a.lower() for a in refused)
    assert len(refused) + len(timed_out) == 64  # everyone got an answer and was closed
    assert waited < serving.body_timeout_s + 5
    assert grown < 100  # 32 MiB of admitted bodies (before: every 4 MiB kept, +256 MiB and more)


def test_finding_slow_body_is_never_timed_out():
    """A body that trickles, or stops: 408 within the body timeout, then the connection is closed."""
    serving = ServingSettings(body_timeout_s=1.0)
    with live_server(serving) as port:
        for trickle in (False, True):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(head(10_000) + b"[")
            start, answer = time.monotonic(), b""
            sock.settimeout(0.2)
            while not answer and time.monotonic() - start < 6:
                try:
                    answer = sock.recv(65536)
                except TimeoutError:
                    if trickle:
                        sock.sendall(b"0,")
            answer += read_response(sock, 3)  # ends when the server closes
            sock.close()
            assert answer.startswith(b"HTTP/1.1 408") and b"body" in answer, answer[:200]
            assert time.monotonic() - start < serving.body_timeout_s + 4
        assert get(port)[0] == 200


def test_finding_idle_connections_are_never_closed():
    """Nothing sent, headers sent a byte at a time, or idle after an answer: closed within the timeouts."""
    serving = ServingSettings(header_timeout_s=1.0, keep_alive_s=1.0)
    with live_server(serving) as port:
        silent = socket.create_connection(("127.0.0.1", port))
        start = time.monotonic()
        read_response(silent, 6)
        assert time.monotonic() - start < 4
        silent.close()

        slowloris = socket.create_connection(("127.0.0.1", port))
        slowloris.settimeout(0.1)
        start, closed = time.monotonic(), False
        for byte in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 100:
            try:
                slowloris.send(bytes([byte]))
                slowloris.recv(65536)  # an answer (408) or b"" (closed): either way it ends here
                closed = True
                break
            except TimeoutError:
                pass  # still open: the next byte
            except ConnectionError:
                closed = True
                break
        slowloris.close()
        assert closed and time.monotonic() - start < 4

        kept = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        kept.request("GET", "/health")
        assert kept.getresponse().read()
        start = time.monotonic()
        assert read_response(kept.sock, 6) == b"" and time.monotonic() - start < 4
        kept.close()


def test_connections_beyond_the_limit_get_503_with_retry_after():
    serving = ServingSettings(max_connections=8, header_timeout_s=30.0)
    with live_server(serving) as port:
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", port))
        extra.sendall(b"GET /metadata HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = read_response(extra, 5)
        extra.close()
        assert answer.startswith(b"HTTP/1.1 503") and b"\r\nretry-after: " in answer.lower()
        for sock in held:
            sock.close()
        time.sleep(0.2)
        assert get(port)[0] == 200


def test_finding_connection_flood_fails_the_liveness_probe():
    """Beyond ``max_connections`` the probes still get their answer (an orchestrator would restart a
    pod whose /health says 503 under a flood), on a connection closed after it; anything else, and a
    second request on a probe's connection, does not get through."""
    serving = ServingSettings(max_connections=8, header_timeout_s=30.0)
    with live_server(serving) as port:
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
        time.sleep(0.2)
        answers = {}
        for path in ("/health", "/ready", "/health?probe=kubelet"):
            extra = socket.create_connection(("127.0.0.1", port))
            extra.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            answers[path] = read_response(extra, 5)  # ends when the server closes the connection
            extra.close()
        pipelined = socket.create_connection(("127.0.0.1", port))
        pipelined.sendall(
            b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /metadata HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        second = read_response(pipelined, 5)
        pipelined.close()
        for sock in held:
            sock.close()
    assert all(answer.startswith(b"HTTP/1.1 200") for answer in answers.values()), answers
    assert second.count(b"HTTP/1.1 ") == 1 and b"model_name" not in second  # only the probe was answered


def test_infra_validation_sends_the_configured_token(monkeypatch, small_splits):
    """``pipeline serve`` in infra validation inherits the token from the environment; the
    validating client must send it."""
    from pipeline.registry.infra_validate import served_probabilities

    token = "infra-token-0123456789abcdef"
    monkeypatch.setenv("PIPELINE_SERVE_TOKEN", token)
    images = (small_splits["t10k"][0][:3] / 255.0).astype(np.float32)
    with live_server(ServingSettings.from_env()) as port:
        assert get(port, "/metadata")[0] == 401
        probabilities, latency = served_probabilities(f"http://127.0.0.1:{port}", images, "4", "m version 4")
    assert probabilities.shape == (3, 10) and latency["batch"] > 0
