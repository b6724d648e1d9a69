"""Soak: ``pipeline serve`` under steady load for minutes, through a promotion and a rollback.

One invocation, one machine, a throwaway embedded store (SQLite and a folder under a temporary
``PIPELINE_HOME``):

* two versions of a serving model of the default recipe's architecture (pt2, as
  ``bench/serve_bench.py`` registers them; different weights), both tagged as having passed the
  gate and infra validation; ``production`` set to version 1 with :func:`pipeline.registry.promote.promote`;
* ``pipeline serve --model-uri models:/<name>@production --poll-interval <s>`` started as
  production runs it, with a random ``PIPELINE_SERVE_TOKEN`` in its environment (every request
  but ``/health`` and ``/ready`` carries ``Authorization: Bearer <token>``; one request without it
  is sent first and its status recorded: 401 where the server enforces the token);
* a separate process (asyncio + aiohttp) keeps ``--concurrency`` requests in flight for
  ``--warmup-s`` seconds (not measured), then ``--duration-s`` seconds (or ``--max-requests`` in
  all): single-image JSON bodies, with a share of
  batches (``{"instances": [...]}``) and PNG bodies, all real Fashion-MNIST test images. Every
  answer is checked (status 200, one prediction per image, ten probabilities summing to 1, a
  version);
* at a third of the time, ``promote`` moves production to version 2; at two thirds,
  ``rollback`` moves it back to 1, both while the load runs;
* another process samples the RSS of the server and its children (psutil) and the latency of
  ``GET /health`` on a connection of its own, once a second.

Prints, per phase (warm-up, version 1, version 2, version 1 again) and overall: requests,
throughput, p50/p95/p99/max latency, status codes (5xx and 503 apart), failed requests, the
machine's mean 1-minute load average (it is shared) and the versions the answers named; the swap
lags; /health p50, p99 and max; RSS at start, after the warm-up, max and at the end. Saves
everything as JSON (``bench/results/soak_bench.json``).

The bar (exit status 1 when not held, so that it can be used as a check): no 5xx, no failed
request, every answer before the promotion from version 1, version 2 answering after it and
still answering at the rollback, version 1 answering after the rollback and at the end, and RSS
at the end at most ``--memory-bound-mb`` above RSS after the warm-up. Every process it starts is
stopped at the end, also on an error or Ctrl-C; everything listens on 127.0.0.1 only.

    .venv/bin/python bench/soak_bench.py [--duration-s 600] [--concurrency 64] [--poll-interval 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KINDS = ("json", "batch", "png")
STATUS_CLIENT_ERROR = 0
"""Recorded as the status of a request that got no HTTP answer (connection error, timeout)."""


# --- the load, in its own process -------------------------------------------------------------


def drive(
    url: str,
    token: str,
    bodies: dict[str, list[bytes]],
    batch_size: int,
    mix: list[str],
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    max_requests: int,
    timeout_s: float,
    started,
    stop,
    out_path: str,
) -> None:
    """Keep ``concurrency`` POSTs in flight for ``warmup_s`` and then ``duration_s`` seconds (the
    measured part starts at ``started``, a shared ``time.monotonic`` value set when the load begins),
    up to ``max_requests`` or ``stop``; write one row per request (end time, latency, status,
    version, kind) to ``out_path``."""
    import asyncio

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the main process, which stops this one

    import aiohttp
    import numpy as np

    rows: list[tuple[float, float, int, int, int]] = []
    failures: list[str] = []
    images = {"json": 1, "batch": batch_size, "png": 1}
    headers = {"json": "application/json", "batch": "application/json", "png": "image/png"}

    def check(kind: str, status: int, payload: bytes) -> tuple[int, str | None]:
        """(version named, None) for a good answer; (0, why) otherwise."""
        if status != 200:
            return 0, f"{kind}: status {status}: {payload[:160]!r}"
        try:
            answer = json.loads(payload)
            predictions = answer["predictions"]
            version = int(answer["model_version"])
        except (ValueError, KeyError, TypeError) as exc:
            return 0, f"{kind}: 200 with an unreadable answer ({exc}): {payload[:160]!r}"
        if len(predictions) != images[kind]:
            return 0, f"{kind}: expected {images[kind]} predictions, found {len(predictions)}"
        for prediction in predictions:
            probabilities = prediction.get("probabilities", [])
            if len(probabilities) != 10 or abs(sum(probabilities) - 1) > 1e-3:
                return 0, f"{kind}: expected 10 probabilities summing to 1, found {probabilities!r:.160}"
        return version, None

    async def main() -> None:
        counter = iter(range(max_requests))
        connector = aiohttp.TCPConnector(limit=concurrency)
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        auth = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=auth) as session:
            started.value = time.monotonic() + warmup_s
            deadline = started.value + duration_s

            async def client() -> None:
                for i in counter:
                    if time.monotonic() >= deadline or stop.value:
                        return
                    kind = mix[i % len(mix)]
                    pool = bodies[kind]
                    start = time.monotonic()
                    try:
                        async with session.post(
                            url, data=pool[i % len(pool)], headers={"Content-Type": headers[kind]}
                        ) as response:
                            status, payload = response.status, await response.read()
                    except (TimeoutError, aiohttp.ClientError) as exc:
                        end = time.monotonic()
                        rows.append((end, end - start, STATUS_CLIENT_ERROR, 0, KINDS.index(kind)))
                        failures.append(f"{kind}: {type(exc).__name__}: {exc}")
                        continue
                    end = time.monotonic()
                    version, why = check(kind, status, payload)
                    if why:
                        failures.append(why)
                    rows.append((end, end - start, status, version, KINDS.index(kind)))

            await asyncio.gather(*(client() for _ in range(concurrency)))

    try:
        asyncio.run(main())
    finally:  # also when stopped early: what was measured is kept
        table = np.asarray(rows, dtype=np.float64).reshape(-1, 5)
        np.savez(out_path, rows=table, failures=np.asarray(failures[:20] + [""]), failed=len(failures))


# --- the server's memory and /health, in another process --------------------------------------


def sample(pid: int, health_url: str, stop, out_path: str) -> None:
    """Once a second until ``stop``: the RSS of ``pid`` and its children (the server spawns workers
    that decode big bodies) and one ``GET /health`` on a fresh connection."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import http.client
    from urllib.parse import urlsplit

    import psutil

    where = urlsplit(health_url)
    process = psutil.Process(pid)
    samples: list[dict] = []
    next_at = time.monotonic()
    while not stop.value:
        at = time.monotonic()
        rss = 0
        try:
            for member in [process, *process.children(recursive=True)]:
                try:
                    rss += member.memory_info().rss
                except psutil.NoSuchProcess:  # a child that ended meanwhile
                    pass
        except psutil.Error:
            rss = 0
        start = time.perf_counter()
        connection = http.client.HTTPConnection(where.hostname, where.port, timeout=10)
        try:
            connection.request("GET", where.path)
            response = connection.getresponse()
            response.read()
            status = response.status
        except (OSError, http.client.HTTPException):
            status = STATUS_CLIENT_ERROR
        finally:
            connection.close()
        samples.append(
            {
                "t": at,
                "rss": rss,
                "health_s": time.perf_counter() - start,
                "health_status": status,
                "load_1min": os.getloadavg()[0],
            }
        )  # the machine is shared: how busy it was
        next_at += 1.0
        while not stop.value and time.monotonic() < next_at:
            time.sleep(min(0.1, max(0.0, next_at - time.monotonic())))
    Path(out_path).write_text(json.dumps(samples))


# --- the run ----------------------------------------------------------------------------------


def request_bodies(count: int, batch_size: int) -> tuple[dict[str, list[bytes]], str]:
    """Real Fashion-MNIST test images as single-image JSON, batch JSON and PNG bodies."""
    import io

    import numpy as np
    from PIL import Image

    from pipeline.data.idx import read_split

    folder = Path("/usr/share/datasets/fashion-mnist")
    images, _ = read_split(folder / "t10k-images-idx3-ubyte.gz", folder / "t10k-labels-idx1-ubyte.gz")
    picked = images[np.random.default_rng(0).permutation(len(images))[:count]]

    def png(image) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(image, mode="L").save(buffer, format="PNG")
        return buffer.getvalue()

    bodies = {
        "json": [json.dumps({"image": image.tolist()}).encode() for image in picked],
        "batch": [
            json.dumps({"instances": picked[i : i + batch_size].tolist()}).encode()
            for i in range(0, len(picked) - batch_size + 1, batch_size)
        ],
        "png": [png(image) for image in picked],
    }
    return bodies, f"{len(picked)} Fashion-MNIST test images from {folder}"


def request_mix(batch_share: float, png_share: float) -> list[str]:
    """The kinds of 1,000 consecutive requests, interleaved evenly (the driver cycles through them)."""
    import numpy as np

    counts = {"batch": round(1000 * batch_share), "png": round(1000 * png_share)}
    counts["json"] = 1000 - counts["batch"] - counts["png"]
    mix = [kind for kind, n in counts.items() for _ in range(n)]
    return [mix[i] for i in np.random.default_rng(1).permutation(len(mix))]


def percentiles(seconds) -> dict[str, float]:
    import numpy as np

    if len(seconds) == 0:
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    ms = np.asarray(seconds) * 1000
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
    }


def phase_stats(rows, start: float, end: float, batch_size: int) -> dict:
    """Requests that ended in [start, end): counts, throughput, latency, statuses, versions."""
    import numpy as np

    picked = rows[(rows[:, 0] >= start) & (rows[:, 0] < end)]
    status = picked[:, 2].astype(int)
    images = np.where(picked[:, 4] == KINDS.index("batch"), batch_size, 1)
    seconds = max(end - start, 1e-9)
    codes, counts = np.unique(status, return_counts=True)
    versions, version_counts = np.unique(picked[:, 3].astype(int)[status == 200], return_counts=True)
    return {
        "seconds": seconds,
        "requests": len(picked),
        "rps": len(picked) / seconds,
        "images_per_s": float(images.sum()) / seconds,
        **percentiles(picked[:, 1]),
        "status": {
            ("no answer" if c == STATUS_CLIENT_ERROR else str(c)): int(n) for c, n in zip(codes, counts, strict=True)
        },
        "5xx": int(((status >= 500) & (status < 600)).sum()),
        "503": int((status == 503).sum()),
        "failed": int((status != 200).sum()),
        "versions": {str(v): int(n) for v, n in zip(versions, version_counts, strict=True)},
    }


def swap_seen(rows, moved_at: float, until: float, old: int, new: int) -> dict:
    """After an alias move at ``moved_at``: when the first answer from ``new`` came, whether the
    last answer before ``until`` was from ``new``, and how many from ``old`` came after the first."""
    ok = rows[(rows[:, 2] == 200) & (rows[:, 0] >= moved_at) & (rows[:, 0] < until)]
    from_new = ok[ok[:, 3] == new]
    first = float(from_new[0, 0]) if len(from_new) else None
    stragglers = int(((ok[:, 3] == old) & (ok[:, 0] > first)).sum()) if first is not None else 0
    last_version = int(ok[-1, 3]) if len(ok) else None
    return {
        "from": old,
        "to": new,
        "lag_s": None if first is None else first - moved_at,
        "last_answer_version": last_version,
        "old_answers_after_first_new": stragglers,
        "seen": first is not None and last_version == new,
    }


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL after 30 s."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    except ProcessLookupError:
        pass


def die_with_parent() -> None:
    """In the server's process, before it runs: SIGTERM when this script dies, even by SIGKILL (Linux)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def unauthenticated_status(url: str, body: bytes) -> int:
    """The status of one ``POST`` without the token: 401 when the server enforces it (informative:
    a server without authentication answers 200)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def metrics_text(base: str, token: str) -> str:
    import urllib.request

    request = urllib.request.Request(f"{base}/metrics", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=600.0, help="seconds of load (600)")
    parser.add_argument("--max-requests", type=int, default=2_000_000, help="stop earlier after this many (2,000,000)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight (64)")
    parser.add_argument("--batch-share", type=float, default=0.05, help="share of batch bodies (0.05)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch body (8)")
    parser.add_argument("--png-share", type=float, default=0.05, help="share of PNG bodies (0.05)")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="the server's registry poll, seconds (1)")
    parser.add_argument(
        "--warmup-s",
        type=float,
        default=60.0,
        help="seconds of load before the measured part, whose start is the memory baseline (60)",
    )
    parser.add_argument(
        "--memory-bound-mb",
        type=float,
        default=100.0,
        help="allowed RSS growth from the end of the warm-up to the end, MB (100)",
    )
    parser.add_argument(
        "--request-timeout-s", type=float, default=60.0, help="a request without an answer by then fails (60)"
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "soak_bench.json"))
    args = parser.parse_args()
    if (
        args.duration_s <= 0
        or args.warmup_s < 0
        or args.concurrency < 1
        or args.max_requests < 1
        or args.batch_size < 1
    ):
        parser.error("--duration-s, --concurrency, --max-requests and --batch-size must be positive")
    if not (0 <= args.batch_share and 0 <= args.png_share and args.batch_share + args.png_share <= 1):
        parser.error("--batch-share and --png-share: expected shares in [0, 1] adding up to at most 1")
    # RSS climbs while the batches grow to the concurrency (about 50 s on 2 busy cores), then stays flat.
    warmup_s = args.warmup_s

    def terminated(signum, frame):  # SIGTERM: clean up as on Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)

    import dataclasses
    import multiprocessing
    import secrets
    import shutil

    import numpy as np
    from serve_bench import register_model, wait_ready

    from pipeline.command_lines import serve_command
    from pipeline.config import Settings, TrainConfig
    from pipeline.registry.history import TAG_GATE, TAG_GATE_PRODUCTION, TAG_INFRA
    from pipeline.registry.infra_validate import free_port
    from pipeline.registry.promote import promote, rollback
    from pipeline.tracking import tracking_client

    home = Path(tempfile.mkdtemp(prefix="soak-bench-"))
    settings = dataclasses.replace(Settings.from_env({"PIPELINE_HOME": str(home)}), model_name="soak-bench")
    actor = "bench/soak_bench.py"
    print(f"home {home}; registering two versions", flush=True)
    client = tracking_client(settings)
    for seed in (0, 1):
        version = register_model(settings, seed=seed, experiment="soak_bench").rsplit("/", 1)[1]
        # As the gate and infra validation leave a version that passed them (tests/registry/test_promote.py).
        for tag, value in ((TAG_GATE, "passed"), (TAG_INFRA, "passed"), (TAG_GATE_PRODUCTION, "none")):
            client.set_model_version_tag(settings.model_for(), version, tag, value)
    promote(settings, "1", actor=actor, reason="soak: start on version 1")
    bodies, source = request_bodies(2000, args.batch_size)
    mix = request_mix(args.batch_share, args.png_share)

    token = secrets.token_urlsafe(32)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, **settings.to_env(), "PIPELINE_SERVE_TOKEN": token}
    command = serve_command(f"models:/{settings.model_for()}@production", port=port, poll_interval=args.poll_interval)
    log_path = home / "serve.log"
    context = multiprocessing.get_context("spawn")
    # Flags in shared memory without a lock: a child killed while holding an Event's lock would
    # leave this process waiting for it forever.
    stop = context.RawValue("b", 0)
    workers: list = []
    server = None
    held = False
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
        try:
            wait_ready(base + "/ready", server)
        except RuntimeError as exc:
            raise RuntimeError(f"pipeline serve: {exc}; its log: {log_path.read_text()[-2000:]}") from exc

        without_token = unauthenticated_status(base + "/predict", bodies["json"][0])
        samples_path, rows_path = home / "samples.json", home / "rows.npz"
        monitor = context.Process(
            target=sample, args=(server.pid, base + "/health", stop, str(samples_path)), daemon=True
        )
        started = context.RawValue("d", 0.0)
        driver = context.Process(
            target=drive,
            daemon=True,
            args=(
                base + "/predict",
                token,
                bodies,
                args.batch_size,
                mix,
                args.concurrency,
                warmup_s,
                args.duration_s,
                args.max_requests,
                args.request_timeout_s,
                started,
                stop,
                str(rows_path),
            ),
        )
        workers = [monitor, driver]
        monitor.start()
        driver.start()
        while not started.value:  # the driver's imports take a few seconds; the clock starts after its warm-up
            if not driver.is_alive():
                raise RuntimeError(f"the load driver exited with status {driver.exitcode} before it started")
            time.sleep(0.05)
        t0 = started.value
        print(
            f"load: {args.concurrency} in flight for {warmup_s:.0f} s of warm-up, then {args.duration_s:.0f} s "
            f"on {base}; promotion at "
            f"{args.duration_s / 3:.0f} s, rollback at {2 * args.duration_s / 3:.0f} s",
            flush=True,
        )

        moves = []
        for fraction, action in ((1 / 3, "promote"), (2 / 3, "rollback")):
            while time.monotonic() < t0 + fraction * args.duration_s and driver.is_alive():
                time.sleep(0.2)
            if not driver.is_alive():
                break
            start = time.monotonic()
            if action == "promote":
                move = promote(settings, "2", actor=actor, reason="soak: promotion under load")
            else:
                move = rollback(settings, actor=actor, reason="soak: rollback under load")
            moves.append(
                {
                    "action": action,
                    "from": move.from_version,
                    "to": move.to_version,
                    "start": start,
                    "end": time.monotonic(),
                }
            )
            print(f"{time.monotonic() - t0:6.1f} s: {action} {move.from_version} -> {move.to_version}", flush=True)
        driver.join(max(0.0, t0 - time.monotonic()) + args.duration_s + args.request_timeout_s + 120)
        if driver.is_alive():
            raise RuntimeError("the load driver did not stop by itself")
        end = time.monotonic()
        stop.value = 1
        monitor.join(30)
        server_alive = server.poll() is None
        try:
            metrics = metrics_text(base, token) if server_alive else ""
        except OSError as exc:  # only for the reload counts: not part of the bar
            print(f"/metrics: {exc}", file=sys.stderr)
            metrics = ""

        loaded = np.load(rows_path)
        rows, failed, failures = loaded["rows"], int(loaded["failed"]), [f for f in loaded["failures"] if f]
        rows = rows[np.argsort(rows[:, 0], kind="stable")]
        samples = json.loads(samples_path.read_text())

        # Phases by the alias moves: version 1, version 2 (from the promotion), version 1 again.
        edges = [t0] + [m["start"] for m in moves] + [end]
        names = ["v1 (before promotion)", "v2 (promotion -> rollback)", "v1 again (after rollback)"]
        phases = {names[i]: phase_stats(rows, edges[i], edges[i + 1], args.batch_size) for i in range(len(edges) - 1)}
        overall = phase_stats(rows, t0, end, args.batch_size)
        warmup = phase_stats(rows, t0 - warmup_s, t0, args.batch_size)
        for stats, start, stop_at in [
            *((phases[n], edges[i], edges[i + 1]) for i, n in enumerate(phases)),
            (overall, t0, end),
            (warmup, t0 - warmup_s, t0),
        ]:
            loads = [x["load_1min"] for x in samples if start <= x["t"] < stop_at]
            stats["load_1min"] = sum(loads) / len(loads) if loads else None
        swaps = [swap_seen(rows, m["start"], edges[i + 2], int(m["from"]), int(m["to"])) for i, m in enumerate(moves)]
        before = rows[(rows[:, 2] == 200) & (rows[:, 0] < edges[1])]
        only_v1_before = bool(len(before)) and bool((before[:, 3] == 1).all())

        rss = np.asarray([s["rss"] for s in samples], dtype=np.float64) / 1e6
        times = np.asarray([s["t"] for s in samples])
        after_warmup = rss[times >= t0]
        memory = {
            "start_mb": float(rss[0]),
            "after_warmup_mb": float(after_warmup[0]) if len(after_warmup) else None,
            "max_mb": float(rss.max()),
            "end_mb": float(rss[-1]),
            "bound_mb": args.memory_bound_mb,
            "warmup_s": warmup_s,
        }
        memory["growth_mb"] = memory["end_mb"] - memory["after_warmup_mb"] if len(after_warmup) else None
        memory["max_growth_mb"] = memory["max_mb"] - memory["after_warmup_mb"] if len(after_warmup) else None
        health = np.asarray([s["health_s"] for s in samples])
        health_stats = {
            "samples": len(samples),
            "failed": sum(s["health_status"] != 200 for s in samples),
            "p99_ms": float(np.percentile(health * 1000, 99)),
            "max_ms": float(health.max() * 1000),
            "p50_ms": float(np.percentile(health * 1000, 50)),
        }
        reloads = {
            line.split()[0]: float(line.split()[1])
            for line in metrics.splitlines()
            if line.startswith("serve_model_reloads_total")
        }

        checks = {
            "server still running": server_alive,
            "no 5xx": overall["5xx"] + warmup["5xx"] == 0,
            "no failed request": failed == 0 and overall["failed"] == 0,
            "both alias moves made": len(moves) == 2,
            "only version 1 before the promotion": only_v1_before,
            "version 2 after the promotion": len(swaps) > 0 and swaps[0]["seen"],
            "version 1 after the rollback": len(swaps) > 1 and swaps[1]["seen"],
            f"RSS growth after warm-up < {args.memory_bound_mb:.0f} MB": memory["growth_mb"] is not None
            and memory["growth_mb"] < args.memory_bound_mb,
            "/health answered every sample": health_stats["failed"] == 0,
        }
        held = all(checks.values())

        print(
            f"\n{overall['requests']} requests in {end - t0:.0f} s at concurrency {args.concurrency} "
            f"(json/batch of {args.batch_size}/png = {1 - args.batch_share - args.png_share:.2f}/"
            f"{args.batch_share:.2f}/{args.png_share:.2f}); poll interval {args.poll_interval} s"
        )
        print(
            f"{'phase':<28}  {'requests':>8}  {'req/s':>6}  {'p50':>6}  {'p95':>6}  {'p99':>6}  {'max ms':>7}  "
            f"{'5xx':>4}  {'503':>4}  {'failed':>6}  {'load':>5}  versions answering"
        )
        for name, p in [("warm-up (not measured)", warmup), *phases.items(), ("overall (measured)", overall)]:
            versions = ", ".join(f"v{v}: {n}" for v, n in p["versions"].items())
            print(
                f"{name:<28}  {p['requests']:>8}  {p['rps']:>6.0f}  {p['p50_ms']:>6.1f}  {p['p95_ms']:>6.1f}  "
                f"{p['p99_ms']:>6.1f}  {p['max_ms']:>7.1f}  {p['5xx']:>4}  {p['503']:>4}  {p['failed']:>6}  "
                f"{p['load_1min'] or float('nan'):>5.1f}  {versions}"
            )
        for move, swap in zip(moves, swaps, strict=True):
            lag = "never" if swap["lag_s"] is None else f"{swap['lag_s']:.2f} s"
            print(
                f"{move['action']} at {move['start'] - t0:.1f} s ({move['end'] - move['start']:.2f} s): first answer "
                f"from v{swap['to']} after {lag}; last answer of the phase from v{swap['last_answer_version']}; "
                f"{swap['old_answers_after_first_new']} from v{swap['from']} after the first"
            )
        print(
            f"/health: {health_stats['samples']} samples, p50 {health_stats['p50_ms']:.1f} ms, "
            f"p99 {health_stats['p99_ms']:.1f} ms, max {health_stats['max_ms']:.1f} ms, {health_stats['failed']} failed"
        )
        print(
            f"RSS: start {memory['start_mb']:.0f} MB, after {warmup_s:.0f} s warm-up {memory['after_warmup_mb']:.0f} MB, "
            f"max {memory['max_mb']:.0f} MB, end {memory['end_mb']:.0f} MB: growth {memory['growth_mb']:+.0f} MB "
            f"(max {memory['max_growth_mb']:+.0f} MB; bound {args.memory_bound_mb:.0f} MB)"
        )
        print(f"reloads (server metrics): {reloads or 'none reported'}; /predict without the token: {without_token}")
        for what, ok in checks.items():
            print(f"  {'ok  ' if ok else 'FAIL'}  {what}")
        for failure in failures[:5]:
            print(f"  e.g. {failure}")

        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps(
                {
                    "date": datetime.now(UTC).isoformat(timespec="seconds"),
                    "commit": subprocess.run(
                        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
                    ).stdout.strip(),
                    "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                    "machine": {
                        "cpus": os.cpu_count(),
                        "platform": platform.platform(),
                        "python": platform.python_version(),
                    },
                    "model": f"{TrainConfig().architecture} ServingModel, pt2, versions 1 and 2 (seeds 0 and 1)",
                    "images": source,
                    "args": vars(args),
                    "held": held,
                    "checks": checks,
                    "warmup": warmup,
                    "phases": phases,
                    "overall": overall,
                    "moves": [{**m, "start_s": m["start"] - t0, "end_s": m["end"] - t0} for m in moves],
                    "swaps": swaps,
                    "health": health_stats,
                    "memory": memory,
                    "reloads": reloads,
                    "failures": failures,
                    "unauthenticated_predict_status": without_token,
                    "samples": [{**s, "t": s["t"] - t0} for s in samples],
                },
                indent=2,
            )
        )
        print(f"saved {out}; {'bar held' if held else 'BAR NOT HELD'}")
        return 0 if held else 1
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the clean-up short
            signal.signal(signum, signal.SIG_IGN)
        stop.value = 1
        for worker in workers:
            worker.join(10)
            if worker.is_alive():
                worker.kill()
                worker.join(10)
        if server is not None:
            stop_process(server)
        if held:
            shutil.rmtree(home, ignore_errors=True)
        else:
            print(f"kept {home} (the server's log is {log_path})", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
