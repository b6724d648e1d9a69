"""Benchmark: our serving endpoint against ``mlflow models serve``, same model, same load.

One invocation, one machine, one registered model (a serving model of the default recipe's
architecture and test-time flip, logged as a pt2 program; its weights do not change the cost):

* ``pipeline serve --model-uri models:/<name>@production`` (as production runs it: micro-batching,
  the registry watcher polling, one process);
* ``mlflow models serve -m models:/<name>/1 --env-manager local`` (MLflow's scoring server, one
  worker), queried on ``/invocations`` with ``{"inputs": [[[[pixels]]]]}``.

Each is driven from a separate process (asyncio + aiohttp) with single-image requests carrying
the same image as the same JSON floats, at concurrency 1, 16 and 64, a fixed number of requests
each after a warm-up, one server at a time, in ``--rounds`` rounds that alternate which server
goes first. Every answer is checked (status 200, ten probabilities). Prints the medians over
rounds of requests per second, p50 and p99 latency, and the ratios ours/mlflow (with each
round's); saves JSON with every round (``bench/results/serve_bench.json``).

    .venv/bin/python bench/serve_bench.py [--requests 2000] [--concurrency 1 16 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def register_model(settings, seed: int = 0, experiment: str = "serve_bench") -> str:
    """A serving model as the default recipe registers it (weights drawn with ``seed``), logged as
    pt2 in a run of ``experiment`` and registered as the next version (1 in a fresh store)."""
    import mlflow
    import numpy as np
    import torch

    from pipeline.config import TrainConfig
    from pipeline.models.export import ServingModel
    from pipeline.models.networks import build_network
    from pipeline.tracking import experiment_id, tracking_client

    torch.manual_seed(seed)
    recipe = TrainConfig()
    model = ServingModel(build_network(recipe.architecture), 0.286, 0.353, recipe.test_time_flip).eval()
    example = np.zeros((2, 1, 28, 28), dtype=np.float32)
    client = tracking_client(settings)
    with mlflow.start_run(experiment_id=experiment_id(client, settings, experiment)):
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            input_example=example,
            serialization_format="pt2",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
    version = mlflow.register_model(info.model_uri, settings.model_for()).version
    return f"models:/{settings.model_for()}/{version}"


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def drive(url: str, body: bytes, concurrency: int, requests: int, result: dict) -> None:
    """In its own process: ``requests`` POSTs at ``concurrency`` in flight; latencies and wall time."""
    import aiohttp

    async def main() -> None:
        latencies: list[float] = []
        failures: list[str] = []
        remaining = iter(range(requests))
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector, headers={"Content-Type": "application/json"}) as session:

            async def client() -> None:
                for _ in remaining:
                    start = time.perf_counter()
                    try:
                        async with session.post(url, data=body) as response:
                            payload = await response.read()
                    except (TimeoutError, aiohttp.ClientError) as exc:
                        failures.append(f"{type(exc).__name__}: {exc}")
                        continue
                    latencies.append(time.perf_counter() - start)
                    if response.status != 200 or payload.count(b",") < 9:
                        failures.append(f"{response.status}: {payload[:100]!r}")

            start = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(concurrency)))
            result["wall_s"] = time.perf_counter() - start
        result["latencies"] = latencies
        result["failures"] = failures[:5]
        result["failed"] = len(failures)

    asyncio.run(main())


def measure(url: str, body: bytes, concurrency: int, requests: int) -> dict:
    import numpy as np

    with multiprocessing.Manager() as manager:
        shared = manager.dict()
        worker = multiprocessing.get_context("spawn").Process(
            target=drive, args=(url, body, concurrency, requests, shared)
        )
        worker.start()
        worker.join()
        result = dict(shared)
    latencies = np.asarray(result["latencies"]) * 1000
    if result["failed"]:
        raise RuntimeError(f"{url}: {result['failed']} failed requests, e.g. {result['failures']}")
    return {
        "concurrency": concurrency,
        "requests": requests,
        "rps": requests / result["wall_s"],
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
    }


def images_per_pass(base: str) -> tuple[float, float]:
    """(images, forward passes) so far, from our server's Prometheus metrics."""
    import urllib.request

    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
        lines = response.read().decode().splitlines()
    value = {line.split()[0]: float(line.split()[1]) for line in lines if line.startswith("serve_batch_images_")}
    return value["serve_batch_images_sum"], value["serve_batch_images_count"]


def run_server(name: str, spec: dict, env: dict, home: Path, args: argparse.Namespace) -> list[dict]:
    """Start one server, warm it up, measure every concurrency level, stop it."""
    from pipeline.registry.infra_validate import free_port

    port = free_port()
    command = spec["command"](port)
    log_path = home / f"{name}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base + spec["ready"], process)
        except RuntimeError as exc:
            raise RuntimeError(f"{name}: {exc}; its log: {log_path.read_text()[-2000:]}") from exc
        measure(base + spec["predict"], spec["body"], 8, 200)  # warm-up
        rows = []
        for concurrency in args.concurrency:
            before = images_per_pass(base) if name == "ours" else None
            row = measure(base + spec["predict"], spec["body"], concurrency, args.requests)
            if before is not None:  # micro-batching at work: images per forward pass at this level
                after = images_per_pass(base)
                row["images_per_pass"] = (after[0] - before[0]) / max(after[1] - before[1], 1)
            rows.append(row)
        return rows
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="requests per concurrency level (2000)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--rounds", type=int, default=2, help="rounds, alternating which server goes first (2)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_bench.json"))
    args = parser.parse_args()

    import dataclasses

    import numpy as np

    from pipeline.command_lines import serve_command
    from pipeline.config import Settings, TrainConfig
    from pipeline.tracking import tracking_client

    recipe = TrainConfig()  # what register_model registers
    home = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    settings = dataclasses.replace(Settings.from_env({"PIPELINE_HOME": str(home)}), model_name="serve-bench")
    model_uri = register_model(settings)
    tracking_client(settings).set_registered_model_alias(settings.model_for(), "production", "1")
    production_uri = f"models:/{settings.model_for()}@production"
    # `mlflow models serve` runs `uvicorn` from PATH: this venv's.
    env = {**os.environ, **settings.to_env(), "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    # The same image as the same JSON floats for both (ours also takes integers, which are shorter).
    pixels = np.round((np.arange(784).reshape(28, 28) * 7 % 256) / 255.0, 4).tolist()
    servers = {
        # Ours as production runs it: on the alias, with the registry watcher polling.
        "ours": {
            "command": lambda port: serve_command(production_uri, port=port),
            "ready": "/ready",
            "predict": "/predict",
            "body": json.dumps({"image": pixels}).encode(),
        },
        "mlflow": {
            "command": lambda port: [
                str(Path(sys.executable).parent / "mlflow"),
                "models",
                "serve",
                "-m",
                model_uri,
                "--env-manager",
                "local",
                "-p",
                str(port),
                "-h",
                "127.0.0.1",
                "-w",
                "1",
            ],
            "ready": "/ping",
            "predict": "/invocations",
            "body": json.dumps({"inputs": [[pixels]]}).encode(),
        },
    }
    rounds: list[dict[str, list[dict]]] = []
    for round_ in range(args.rounds):
        results: dict[str, list[dict]] = {}
        order = list(servers) if round_ % 2 == 0 else list(reversed(servers))  # neither always goes first
        for name in order:
            results[name] = run_server(name, servers[name], env, home, args)
        rounds.append(results)

    def median(name: str, level: int, key: str) -> float:
        return statistics.median(r[name][level][key] for r in rounds)

    rows = []
    for level, concurrency in enumerate(args.concurrency):
        ours = {k: median("ours", level, k) for k in ("rps", "p50_ms", "p99_ms", "images_per_pass")}
        theirs = {k: median("mlflow", level, k) for k in ("rps", "p50_ms", "p99_ms")}
        ratios = [r["ours"][level]["rps"] / r["mlflow"][level]["rps"] for r in rounds]
        rows.append(
            {
                "concurrency": concurrency,
                "ours": ours,
                "mlflow": theirs,
                "rps_ratio": ours["rps"] / theirs["rps"],
                "p99_ratio": ours["p99_ms"] / theirs["p99_ms"],
                "rps_ratio_per_round": ratios,
            }
        )
    print(f"medians of {args.rounds} rounds, {args.requests} requests each")
    print(
        f"{'concurrency':>11}  {'ours req/s':>10}  {'mlflow req/s':>12}  {'ratio':>6}  {'per round':>12}  "
        f"{'ours p50/p99 ms':>16}  {'mlflow p50/p99 ms':>18}  {'p99 ratio':>9}  {'images/pass':>11}"
    )
    for row in rows:
        o, m = row["ours"], row["mlflow"]
        per_round = "/".join(f"{r:.1f}" for r in row["rps_ratio_per_round"])
        print(
            f"{row['concurrency']:>11}  {o['rps']:>10.0f}  {m['rps']:>12.0f}  {row['rps_ratio']:>5.2f}x  {per_round:>12}  "
            f"{o['p50_ms']:>7.1f} / {o['p99_ms']:>6.1f}  {m['p50_ms']:>8.1f} / {m['p99_ms']:>7.1f}  {row['p99_ratio']:>9.2f}"
            f"  {o['images_per_pass']:>11.1f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": {
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                    "python": platform.python_version(),
                },
                "model": f"{recipe.architecture} ServingModel (test_time_flip={recipe.test_time_flip}), pt2, registered version 1",
                "requests": args.requests,
                "rows": rows,
                "rounds": rounds,
            },
            indent=2,
        )
    )
    print(f"saved {out}")


if __name__ == "__main__":
    main()
