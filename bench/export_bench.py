"""Benchmark: one registered version as torch (pt2), ONNX float32 and ONNX INT8, side by side.

One invocation: ``pipeline run`` on Fashion-MNIST (all 70,000 images; the default recipe, or
the one the flags after ``--`` make) in a fresh pipeline home, whose ``export`` stage writes the
ONNX and INT8 variants and scores them on the whole test split (accuracy, top-1 agreement with
the float model). Then each of the three is loaded as a server would load it and timed in the
same process, in ``--rounds`` rounds that rotate which goes first: single-image latency
(``--single`` sequential calls, p50 and p99) and batch-256 throughput (images per second), on
``--threads`` threads each (torch's intra-op pool, ONNX Runtime's). Prints a table with each
variant's size and throughput as ratios to the float model's, and saves JSON
(``bench/results/export_bench.json``).

    .venv/bin/python bench/export_bench.py [--source DIR] [--rounds 3] [-- --epochs 2 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from layout_bench import pipeline_run  # noqa: E402  (one way to run the chain in a fresh home)


def timings(predict, image, batch, single: int) -> dict[str, float]:
    """p50/p99 of ``single`` one-image calls (ms) and the images per second of batch calls."""
    for _ in range(10):
        predict(image)
    latencies = []
    for _ in range(single):
        started = time.perf_counter()
        predict(image)
        latencies.append((time.perf_counter() - started) * 1e3)
    latencies.sort()
    predict(batch)
    calls, started = 0, time.perf_counter()
    while calls < 5 or time.perf_counter() - started < 2.0:
        predict(batch)
        calls += 1
    return {
        "p50_ms": latencies[len(latencies) // 2],
        "p99_ms": latencies[int(len(latencies) * 0.99)],
        "batch_images_per_s": calls * len(batch) / (time.perf_counter() - started),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--single", type=int, default=300, help="one-image calls per variant and round (300)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "export_bench.json")
    parser.add_argument("flags", nargs="*", help="after --: flags for pipeline run (the recipe)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="export-bench-") as tmp:
        home = Path(tmp) / "home"
        result, seconds = pipeline_run(args.source, home, args.flags)
        print(f"pipeline run: {seconds:.0f} s", file=sys.stderr)
        exported = result["export"]
        os.environ["PIPELINE_HOME"] = str(home)
        for name in [k for k in os.environ if k.startswith(("MLFLOW_", "PIPELINE_")) and k != "PIPELINE_HOME"]:
            del os.environ[name]
        import numpy as np
        import torch

        from pipeline.config import Settings
        from pipeline.data.processed import load_split
        from pipeline.models.onnx_runtime import OnnxClassifier, to_pixels
        from pipeline.models.registered import load_registered
        from pipeline.refs import ProcessedDatasetRef
        from pipeline.storage import storage_for
        from pipeline.tracking import tracking_client

        torch.set_num_threads(args.threads)
        settings = Settings.from_env()
        client = tracking_client(settings)
        images, _ = load_split(ProcessedDatasetRef.from_dict(result["preprocess"]), storage_for(settings), "test")
        pixels = to_pixels(images[: args.batch])
        image = pixels[:1]
        torch_model = load_registered(result["register"]["model_uri"])

        def torch_predict(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return torch_model(torch.from_numpy(x)).numpy()

        models = {"torch (pt2)": torch_predict}
        files = {}
        for variant in exported["variants"]:
            files[variant["name"]] = Path(client.download_artifacts(exported["run_id"], variant["artifact"], tmp))
            models[variant["name"]] = OnnxClassifier(files[variant["name"]], threads=args.threads)
        # Every variant answers the same batch; ONNX float32 to within float error of torch.
        reference = torch_predict(pixels)
        for name, predict in models.items():
            difference = float(np.abs(predict(pixels) - reference).max())
            print(f"{name}: largest probability difference from torch on {len(pixels)} images {difference:.2e}")

        rounds: list[dict[str, dict[str, float]]] = []
        names = list(models)
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            rounds.append({name: timings(models[name], image, pixels, args.single) for name in order})

    def median(name: str, key: str) -> float:
        return statistics.median(round_[name][key] for round_ in rounds)

    float_bytes = exported["float_bytes"]
    rows = [
        {
            "model": "torch (pt2)",
            "bytes": float_bytes,
            "test_accuracy": exported["float_accuracy"],
            "agreement": 1.0,
            "verdict": "the float model",
        }
    ]
    for variant in exported["variants"]:
        rows.append(
            {
                "model": variant["name"],
                "bytes": variant["bytes"],
                "test_accuracy": variant["test_accuracy"],
                "agreement": variant["agreement"],
                "verdict": "passed" if not variant["reasons"] else "failed: " + "; ".join(variant["reasons"]),
            }
        )
    base_throughput = median("torch (pt2)", "batch_images_per_s")
    for row in rows:
        for key in ("p50_ms", "p99_ms", "batch_images_per_s"):
            row[key] = median(row["model"], key)
        row["size_vs_float"] = row["bytes"] / float_bytes
        row["throughput_vs_float"] = row["batch_images_per_s"] / base_throughput

    header = (
        f"{'model':<12} {'kB':>7} {'size x':>7} {'accuracy':>9} {'agree':>7} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'batch img/s':>11} {'thru x':>7}  verdict"
    )
    print(header)
    for row in rows:
        print(
            f"{row['model']:<12} {row['bytes'] / 1e3:>7.0f} {row['size_vs_float']:>7.2f} {row['test_accuracy']:>9.4f} "
            f"{row['agreement']:>7.4f} {row['p50_ms']:>7.2f} {row['p99_ms']:>7.2f} {row['batch_images_per_s']:>11.0f} "
            f"{row['throughput_vs_float']:>7.2f}  {row['verdict']}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": {
                    "cpus": os.cpu_count(),
                    "processor": platform.processor(),
                    "python": platform.python_version(),
                },
                "recipe_flags": args.flags,
                "threads": args.threads,
                "batch": args.batch,
                "test_images": exported["test_images"],
                "calibration_images": exported["calibration_images"],
                "model_version": exported["version"],
                "rows": rows,
                "rounds": rounds,
            },
            indent=2,
        )
    )
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
