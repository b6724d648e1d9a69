"""Benchmark: our serving endpoint against the machine's floor and ``mlflow models serve``.

One invocation, one machine, one registered model (a serving model of the default recipe's
architecture and test-time flip, logged as a pt2 program, with its ONNX and INT8 variants made by
the export stage's own functions; its weights do not change the cost):

* the floor: ``bench/serve_floor.py``, the same server stack (uvicorn, h11, the guarded protocol
  and limits) parsing the same body with the same checks and answering a constant prediction;
* ours: ``pipeline serve --model-uri models:/<name>@production --runtime R`` for each runtime
  (``torch``, ``onnx``, ``onnx-int8``), as production runs it: micro-batching, the registry
  watcher polling;
* ``mlflow models serve -m models:/<name>/1 --env-manager local -w W`` (MLflow's scoring
  server), queried on ``/invocations`` with ``{"inputs": [[[[pixels]]]]}`` (JSON floats only:
  it takes nothing else for a tensor model).

Each body type carries the same single image: JSON floats (4 decimals), a PNG, ``.npy`` bytes
(uint8) and raw uint8 bytes with ``X-Image-Shape``. A separate process (asyncio + aiohttp) sends
a fixed number of requests at concurrency 1, 16 and 64 after a warm-up, one server at a time,
in ``--rounds`` rounds that alternate the servers' order; every answer is checked (status 200,
ten probabilities). Prints the medians over rounds: requests per second, p50 and p99 latency,
ours as a share of the floor's req/s with the same body, and as a ratio to mlflow's (JSON floats
at the same concurrency); saves JSON with every round (``bench/results/serve_bench.json``).
Every server runs ``--workers`` processes (default: one per usable core).

    .venv/bin/python bench/serve_bench.py [--requests 2000] [--concurrency 1 16 64] [--rounds 2] [--workers N]
"""

from __future__ import annotations

import argparse
import asyncio
import io
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

RUNTIMES = ("torch", "onnx", "onnx-int8")
BODIES = ("json", "png", "npy", "raw")


def register_model(settings, seed: int = 0, experiment: str = "serve_bench") -> str:
    """A serving model as the default recipe registers it (weights drawn with ``seed``), logged as
    pt2 in a run of ``experiment`` and registered as the next version (1 in a fresh store), with
    its ONNX and INT8 variants as the export stage stores them. The variants are tagged as passed
    without being scored: this benchmark measures speed (``bench/export_bench.py`` measures their
    accuracy and agreement)."""
    import mlflow
    import numpy as np
    import torch

    from pipeline.config import TrainConfig
    from pipeline.models.export import ServingModel
    from pipeline.models.networks import build_network
    from pipeline.models.onnx_variants import export_onnx, quantize_int8
    from pipeline.models.registered import variant_tag
    from pipeline.tracking import experiment_id, tracking_client

    torch.manual_seed(seed)
    recipe = TrainConfig()
    model = ServingModel(build_network(recipe.architecture), 0.286, 0.353, recipe.test_time_flip).eval()
    example = np.zeros((2, 1, 28, 28), dtype=np.float32)
    client = tracking_client(settings)
    with mlflow.start_run(experiment_id=experiment_id(client, settings, experiment)) as run:
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            input_example=example,
            serialization_format="pt2",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
        with tempfile.TemporaryDirectory() as tmp:
            calibration = np.random.default_rng(seed).random((128, 1, 28, 28), dtype=np.float32)
            onnx = export_onnx(model, calibration[:4], Path(tmp) / "model.onnx")
            quantize_int8(onnx, calibration, Path(tmp) / "model.int8.onnx")
            mlflow.log_artifacts(tmp, "onnx")
    name = settings.model_for()
    version = mlflow.register_model(info.model_uri, name).version
    for variant, file in (("onnx", "model.onnx"), ("onnx_int8", "model.int8.onnx")):
        client.set_model_version_tag(name, version, variant_tag(variant, "artifact"), f"onnx/{file}")
        client.set_model_version_tag(name, version, variant_tag(variant, "verdict"), "passed")
    assert run.info.run_id
    return f"models:/{name}/{version}"


def request_bodies() -> dict[str, tuple[bytes, dict[str, str]]]:
    """The same image as each body type: (bytes, headers) for ours and the floor."""
    import numpy as np
    from PIL import Image

    image = (np.arange(784).reshape(28, 28) * 7 % 256).astype(np.uint8)
    png, npy = io.BytesIO(), io.BytesIO()
    Image.fromarray(image).save(png, "PNG")
    np.save(npy, image[None])
    return {
        "json": (
            json.dumps({"image": np.round(image / 255.0, 4).tolist()}).encode(),
            {"content-type": "application/json"},
        ),
        "png": (png.getvalue(), {"content-type": "image/png"}),
        "npy": (npy.getvalue(), {"content-type": "application/x-npy"}),
        "raw": (image.tobytes(), {"content-type": "application/octet-stream", "x-image-shape": "1,28,28"}),
    }


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


def drive(url: str, body: bytes, headers: dict, concurrency: int, requests: int, result: dict) -> None:
    """In its own process: ``requests`` POSTs at ``concurrency`` in flight; latencies and wall time."""
    import aiohttp

    async def main() -> None:
        latencies: list[float] = []
        failures: list[str] = []
        remaining = iter(range(requests))
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

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


def measure(url: str, body: bytes, headers: dict, concurrency: int, requests: int) -> dict:
    import numpy as np

    with multiprocessing.Manager() as manager:
        shared = manager.dict()
        worker = multiprocessing.get_context("spawn").Process(
            target=drive, args=(url, body, headers, concurrency, requests, shared)
        )
        worker.start()
        worker.join()
        result = dict(shared)
    latencies = np.asarray(result["latencies"]) * 1000
    if result["failed"]:
        raise RuntimeError(f"{url}: {result['failed']} failed requests, e.g. {result['failures']}")
    return {
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


def run_server(name: str, spec: dict, env: dict, home: Path, args: argparse.Namespace) -> dict[str, list[dict]]:
    """Start one server, warm it up, measure each of its bodies at every concurrency, stop it."""
    from pipeline.registry.infra_validate import free_port

    port = free_port()
    log_path = home / f"{name}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(spec["command"](port), env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base + spec["ready"], process)
        except RuntimeError as exc:
            raise RuntimeError(f"{name}: {exc}; its log: {log_path.read_text()[-2000:]}") from exc
        results = {}
        for body_name, (body, headers) in spec["bodies"].items():
            measure(base + spec["predict"], body, headers, 8, 200)  # warm-up
            rows = []
            for concurrency in args.concurrency:
                before = images_per_pass(base) if spec.get("metrics") else None
                row = {
                    "concurrency": concurrency,
                    **measure(base + spec["predict"], body, headers, concurrency, args.requests),
                }
                if before is not None:  # micro-batching at work: images per forward pass at this level
                    after = images_per_pass(base)
                    row["images_per_pass"] = (after[0] - before[0]) / max(after[1] - before[1], 1)
                rows.append(row)
            results[body_name] = rows
        return results
    finally:
        process.terminate()
        process.wait(timeout=30)


def summarise(rounds: list[dict], concurrency: list[int]) -> list[dict]:
    """Medians over rounds per (server, body, concurrency), with the share of the floor (same body)
    and the ratio to mlflow (its JSON, same concurrency), each also per round."""

    def median(server: str, body: str, level: int, key: str) -> float:
        return statistics.median(r[server][body][level][key] for r in rounds)

    rows = []
    for server in rounds[0]:
        for body in rounds[0][server]:
            for level, c in enumerate(concurrency):
                keys = rounds[0][server][body][level].keys() - {"concurrency"}
                row = {
                    "server": server,
                    "body": body,
                    "concurrency": c,
                    **{k: median(server, body, level, k) for k in keys},
                }
                if body in rounds[0].get("floor", {}) and server != "floor":
                    shares = [r[server][body][level]["rps"] / r["floor"][body][level]["rps"] for r in rounds]
                    row["share_of_floor"], row["share_of_floor_per_round"] = statistics.median(shares), shares
                if server != "mlflow":
                    ratios = [r[server][body][level]["rps"] / r["mlflow"]["json"][level]["rps"] for r in rounds]
                    row["vs_mlflow"], row["vs_mlflow_per_round"] = statistics.median(ratios), ratios
                    p99 = [r[server][body][level]["p99_ms"] / r["mlflow"]["json"][level]["p99_ms"] for r in rounds]
                    p50 = [r[server][body][level]["p50_ms"] / r["mlflow"]["json"][level]["p50_ms"] for r in rounds]
                    row["p50_vs_mlflow"], row["p99_vs_mlflow"] = statistics.median(p50), statistics.median(p99)
                rows.append(row)
    return rows


def print_table(rows: list[dict], rounds: int, requests: int) -> None:
    print(f"medians of {rounds} rounds, {requests} requests per level")
    print(
        f"{'server':>16} {'body':>5} {'conc':>4}  {'req/s':>6}  {'p50 ms':>7}  {'p99 ms':>7}  {'of floor':>8}  "
        f"{'x mlflow':>8}  {'p50/p99 vs mlflow':>17}  {'img/pass':>8}"
    )
    for row in rows:
        share = f"{row['share_of_floor']:.0%}" if "share_of_floor" in row else "-"
        ratio = f"{row['vs_mlflow']:.2f}x" if "vs_mlflow" in row else "-"
        latency = f"{row['p50_vs_mlflow']:.2f} / {row['p99_vs_mlflow']:.2f}" if "p50_vs_mlflow" in row else "-"
        batch = f"{row['images_per_pass']:.1f}" if "images_per_pass" in row else "-"
        print(
            f"{row['server']:>16} {row['body']:>5} {row['concurrency']:>4}  {row['rps']:>6.0f}  {row['p50_ms']:>7.1f}  "
            f"{row['p99_ms']:>7.1f}  {share:>8}  {ratio:>8}  {latency:>17}  {batch:>8}"
        )


def main() -> None:
    from pipeline.training.hardware import usable_cpus

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="requests per concurrency level (2000)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--rounds", type=int, default=2, help="rounds, alternating the servers' order (2)")
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    parser.add_argument("--bodies", nargs="+", default=list(BODIES), choices=BODIES)
    parser.add_argument(
        "--workers",
        type=int,
        default=usable_cpus(),
        help="server processes of the floor, ours and mlflow alike (default: this machine's usable cores)",
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_bench.json"))
    args = parser.parse_args()

    import dataclasses

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
    bodies = {name: body for name, body in request_bodies().items() if name in args.bodies}
    json_floats = json.loads(request_bodies()["json"][0])["image"]
    servers: dict[str, dict] = {
        "floor": {
            "command": lambda port: [
                sys.executable,
                str(ROOT / "bench" / "serve_floor.py"),
                "--port",
                str(port),
                "--workers",
                str(args.workers),
            ],
            "ready": "/ready",
            "predict": "/predict",
            "bodies": bodies,
        },
        **{
            f"ours {runtime}": {
                # Ours as production runs it: on the alias, with the registry watcher polling.
                "command": lambda port, runtime=runtime: serve_command(
                    production_uri, port=port, runtime=runtime, workers=args.workers
                ),
                "ready": "/ready",
                "predict": "/predict",
                "bodies": bodies,
                "metrics": True,
            }
            for runtime in args.runtimes
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
                str(args.workers),
            ],
            "ready": "/ping",
            "predict": "/invocations",
            "bodies": {
                "json": (json.dumps({"inputs": [[json_floats]]}).encode(), {"content-type": "application/json"})
            },
        },
    }
    rounds: list[dict] = []
    for round_ in range(args.rounds):
        order = list(servers) if round_ % 2 == 0 else list(reversed(servers))  # none always goes first
        results = {name: run_server(name, servers[name], env, home, args) for name in order}
        rounds.append({name: results[name] for name in servers})
    rows = summarise(rounds, args.concurrency)
    print_table(rows, args.rounds, args.requests)
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
                "model": f"{recipe.architecture} ServingModel (test_time_flip={recipe.test_time_flip}), pt2 + ONNX + INT8",
                "requests": args.requests,
                "workers": args.workers,
                "rows": rows,
                "rounds": rounds,
            },
            indent=2,
        )
    )
    print(f"saved {out}")


if __name__ == "__main__":
    main()
