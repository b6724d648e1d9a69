"""``GET /health`` under the loads an endpoint meets in the wild, against a real ``pipeline serve``.

One invocation, one machine, a throwaway embedded store (``bench/serve_bench.py``'s pt2 model of
the default recipe, registered as version 1). ``pipeline serve --model-uri models:/<name>/1`` runs
as production runs it (its own process, a random ``PIPELINE_SERVE_TOKEN``, the default
:class:`~pipeline.config.ServingSettings`). Then, one scenario after another, a load runs in a
process of its own while this process sends ``GET /health`` on a fresh connection every
``--interval-s`` (as a kubelet probe does) and records how long each answer took:

* ``idle``: no load;
* ``big JSON``: ``--big-clients`` clients (24) each posting ~8 MB JSON batches back to back (the
  issue's first finding: parsed on the event loop, they held ``/health`` for seconds);
* ``slow clients``: 64 connections that each send headers for an 8 MiB body and 1 MiB of it,
  then stall (the issue's finding: they were never timed out and held +584 MB);
* ``connection flood``: ``--flood`` such connections (600, more than ``max_connections``), each
  reopened at once when the server refuses it (503) or times it out (408): thousands of
  connections a second from a client that ignores ``Retry-After``;
* ``saturated``: ``--concurrency`` (64) clients posting single real Fashion-MNIST images back to
  back, the soak's load (``bench/soak_bench.py``), with every core busy.

Prints per scenario: probes, p50, p99, max, the share over 100 ms (the issue's bar), probes that
got no 200, and what the load achieved; saves it all as JSON (``bench/results/health_bench.json``).
Everything listens on 127.0.0.1; every process it starts ends with it.

    .venv/bin/python bench/health_bench.py [--seconds 20] [--interval-s 0.05]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

BAR_S = 0.1


# --- the loads, each in a process of its own -------------------------------------------------------


def big_json(port: int, token: str, body: bytes, clients: int, stop, counts) -> None:
    """``clients`` threads posting ``body`` back to back until ``stop``."""
    import http.client

    def client() -> None:
        while not stop.value:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            try:
                connection.request(
                    "POST",
                    "/predict",
                    body=body,
                    headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
                )
                response = connection.getresponse()
                response.read()
                counts[0 if response.status == 200 else 1] += 1
            except (OSError, http.client.HTTPException):
                counts[1] += 1
            finally:
                connection.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def slow_clients(port: int, token: str, connections: int, stop, counts) -> None:
    """Keep ``connections`` sockets open, each having sent headers for 8 MiB and 1 MiB of body;
    one that the server answered or closed is counted and replaced."""
    import selectors

    head = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {8 * 1024 * 1024}\r\n\r\n"
    ).encode()
    part = head + b"[" + b"0," * (512 * 1024)
    selector = selectors.DefaultSelector()

    def open_one() -> None:
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        selector.register(sock, selectors.EVENT_WRITE | selectors.EVENT_READ, [memoryview(part)])

    def replace(sock: socket.socket, answered: bytes) -> None:
        counts[0 if answered.startswith((b"HTTP/1.1 503", b"HTTP/1.1 408")) else 1] += 1
        selector.unregister(sock)
        sock.close()
        open_one()

    for _ in range(connections):
        open_one()
    while not stop.value:
        for key, events in selector.select(0.1):
            sock, pending = key.fileobj, key.data
            if events & selectors.EVENT_READ:
                try:
                    replace(sock, sock.recv(65536))
                except OSError:
                    replace(sock, b"")
                continue
            try:
                pending[0] = pending[0][sock.send(pending[0]) :]
            except BlockingIOError:
                continue
            except OSError:
                replace(sock, b"")
                continue
            if not pending[0]:  # all sent: stall, and wait for the server's answer
                selector.modify(sock, selectors.EVENT_READ, pending)
    for key in list(selector.get_map().values()):
        key.fileobj.close()


def saturated(port: int, token: str, bodies: list[bytes], concurrency: int, stop, counts) -> None:
    """``concurrency`` aiohttp clients posting single images back to back."""
    import asyncio

    import aiohttp

    async def main() -> None:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

            async def client(offset: int) -> None:
                i = offset
                while not stop.value:
                    try:
                        async with session.post(
                            f"http://127.0.0.1:{port}/predict", data=bodies[i % len(bodies)], headers=headers
                        ) as response:
                            await response.read()
                            counts[0 if response.status == 200 else 1] += 1
                    except aiohttp.ClientError:
                        counts[1] += 1
                    i += concurrency

            await asyncio.gather(*(client(k) for k in range(concurrency)))

    asyncio.run(main())


# --- the probe -----------------------------------------------------------------------------------


def probe(port: int, seconds: float, interval_s: float) -> list[tuple[float, int]]:
    """``GET /health`` on a fresh connection every ``interval_s`` for ``seconds``: (latency, status)."""
    import http.client

    results, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            connection.request("GET", "/health")
            response = connection.getresponse()
            response.read()
            status = response.status
        except (OSError, http.client.HTTPException):
            status = 0
        finally:
            connection.close()
        results.append((time.perf_counter() - start, status))
        time.sleep(max(0.0, interval_s - (time.perf_counter() - start)))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="probing per scenario, after a 3 s ramp (20)")
    parser.add_argument("--interval-s", type=float, default=0.05, help="between probes (0.05)")
    parser.add_argument("--big-clients", type=int, default=24, help="clients posting ~8 MB JSON (24)")
    parser.add_argument("--flood", type=int, default=600, help="stalled connections of the flood (600)")
    parser.add_argument("--concurrency", type=int, default=64, help="clients of the saturated scenario (64)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "health_bench.json"))
    args = parser.parse_args()

    import dataclasses
    import multiprocessing
    import secrets
    import shutil

    import numpy as np
    from serve_bench import register_model, wait_ready
    from soak_bench import die_with_parent, request_bodies

    from pipeline.command_lines import serve_command
    from pipeline.config import Settings
    from pipeline.registry.infra_validate import free_port

    def terminated(signum, frame):  # SIGTERM: clean up as on Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    home = Path(tempfile.mkdtemp(prefix="health-bench-"))
    settings = dataclasses.replace(Settings.from_env({"PIPELINE_HOME": str(home)}), model_name="health-bench")
    model_uri = register_model(settings, experiment="health_bench")
    bodies, _ = request_bodies(2000, 8)
    images = np.stack([np.asarray(json.loads(b)["image"], dtype=np.float64) for b in bodies["json"][:1024]]) / 255.0
    count = int(len(images) * 8.0e6 / len(json.dumps({"instances": images.tolist()})))
    big = json.dumps({"instances": images[:count].tolist()}).encode()

    token, port = secrets.token_urlsafe(32), free_port()
    env = {**os.environ, **settings.to_env(), "PIPELINE_SERVE_TOKEN": token}
    command = serve_command(model_uri, port=port)
    context = multiprocessing.get_context("spawn")
    scenarios = [
        ("idle", None, ()),
        (f"big JSON ({args.big_clients} x {len(big) / 1e6:.1f} MB)", big_json, (big, args.big_clients)),
        ("slow clients (64 stalled)", slow_clients, (64,)),
        (f"connection flood ({args.flood} stalled)", slow_clients, (args.flood,)),
        (f"saturated ({args.concurrency} clients)", saturated, (bodies["json"], args.concurrency)),
    ]
    rows, server = [], None
    log_path = home / "serve.log"
    try:
        with log_path.open("wb") as log_file:
            server = subprocess.Popen(
                command,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        wait_ready(f"http://127.0.0.1:{port}/ready", server)
        for name, load, extra in scenarios:
            stop, counts = context.RawValue("b", 0), context.RawArray("q", 2)
            worker = None
            if load is not None:
                worker = context.Process(target=load, args=(port, token, *extra, stop, counts), daemon=True)
                worker.start()
                time.sleep(3.0)  # the load ramps up (imports, connections) before probing
            results = probe(port, args.seconds, args.interval_s)
            stop.value = 1
            if worker is not None:
                worker.join(30)
                if worker.is_alive():
                    worker.kill()
            latencies = np.asarray([latency for latency, _ in results]) * 1000
            rows.append(
                {
                    "scenario": name,
                    "probes": len(results),
                    "p50_ms": float(np.percentile(latencies, 50)),
                    "p99_ms": float(np.percentile(latencies, 99)),
                    "max_ms": float(latencies.max()),
                    "over_bar": float(np.mean(latencies > BAR_S * 1000)),
                    "not_200": sum(status != 200 for _, status in results),
                    "load_answered": int(counts[0]),
                    "load_other": int(counts[1]),
                    "server_alive": server.poll() is None,
                }
            )
            print(f"{name}: done", flush=True)
    finally:
        if server is not None and server.poll() is None:
            server.terminate()
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
        shutil.rmtree(home, ignore_errors=True)

    print(
        f"\nGET /health on a fresh connection every {args.interval_s * 1000:.0f} ms, {args.seconds:.0f} s per scenario; "
        f"pipeline serve on {os.cpu_count()} CPUs, the loads on the same machine"
    )
    print(
        f"{'scenario':34} {'probes':>6} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'>100ms':>7} {'not 200':>7} "
        f"{'load: answered':>15} {'other':>6}"
    )
    for row in rows:
        print(
            f"{row['scenario']:34} {row['probes']:6d} {row['p50_ms']:7.1f} {row['p99_ms']:7.1f} {row['max_ms']:7.1f} "
            f"{row['over_bar']:7.1%} {row['not_200']:7d} {row['load_answered']:15d} {row['load_other']:6d}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    out.write_text(
        json.dumps(
            {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "commit": commit,
                "command": " ".join(sys.argv),
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "args": vars(args),
                "scenarios": rows,
            },
            indent=2,
        )
    )
    print(f"saved {out}")
    return 0 if all(row["server_alive"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
