"""Benchmark: the same recipe and seed on Fashion-MNIST as IDX files and as PNG class folders.

One invocation: all 70,000 images exported (before anything is timed) as
``train/<class>/<n>.png`` and ``test/<class>/<n>.png``, then ``pipeline run`` on the four IDX
files and on the folders, each in a fresh pipeline home (its own storage and MLflow store),
with the default recipe, or the one the flags given after ``--`` make. It reports each run's
test accuracy, macro F1 and wall time, and the accuracy difference in points: the layouts are
one dataset, so the difference is what reading them differently costs (the goal: within 0.3
points). The validation split is drawn from each layout's own order of the training images,
so the two runs do not see the same validation images. Prints a table and saves JSON
(``bench/results/layout_bench.json``).

    .venv/bin/python bench/layout_bench.py [--source DIR] [--work DIR] [-- --epochs 2 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tests' writer of class folders


def pipeline_run(source: Path, home: Path, flags: list[str]) -> tuple[dict, float]:
    """``pipeline run --json`` on ``source`` in a pipeline home of its own, ``home`` (no store
    settings inherited): each stage's result, and the wall time in seconds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "MLFLOW_"))}
    env["PIPELINE_HOME"] = str(home)
    command = [str(Path(sys.executable).parent / "pipeline"), "run", "--source", str(source), "--json", *flags]
    start = time.perf_counter()
    out = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        sys.exit(f"pipeline run on {source} failed (exit {out.returncode}): {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout), seconds


def run(source: Path, home: Path, flags: list[str]) -> dict:
    """``pipeline run`` on ``source`` in ``home``: what the table reports of it."""
    result, seconds = pipeline_run(source, home, flags)
    return {
        "seconds": round(seconds, 1),
        "test_accuracy": result["evaluate"]["test_accuracy"],
        "macro_f1": result["evaluate"]["macro_f1"],
        "counts": result["preprocess"]["counts"],
        "layout": result["acquire"]["layout"],
        "model_name": result["register"]["model_name"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--work", default="", help="where the folders and homes go (default: a temporary folder)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "layout_bench.json"))
    parser.add_argument("flags", nargs="*", help="after --: flags for both `pipeline run`s (default: none)")
    args = parser.parse_args()

    from image_datasets import fashion_folders

    from pipeline.config import IDX_FILES
    from pipeline.data.idx import read_split

    source = Path(args.source)
    splits = {
        name: read_split(source / IDX_FILES[f"{split}_images"], source / IDX_FILES[f"{split}_labels"])
        for name, split in (("train", "train"), ("t10k", "test"))
    }
    with tempfile.TemporaryDirectory(prefix="layout-bench-", dir=args.work or None) as work:
        folders = fashion_folders(Path(work) / "fashion-mnist-png", splits)
        results = {
            "idx": run(source, Path(work) / "home-idx", args.flags),
            "png-folders": run(folders, Path(work) / "home-png", args.flags),
        }
    difference = 100 * (results["png-folders"]["test_accuracy"] - results["idx"]["test_accuracy"])
    print(f"{'layout':<12} {'test acc':>9} {'macro F1':>9} {'seconds':>8}  counts")
    for name, row in results.items():
        print(
            f"{name:<12} {row['test_accuracy']:>9.4f} {row['macro_f1']:>9.4f} {row['seconds']:>8.0f}  {row['counts']}"
        )
    print(f"PNG folders - IDX: {difference:+.2f} points (goal: within 0.3)")
    report = {
        "benchmark": "layout_bench",
        "flags": args.flags,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "results": results,
        "difference_points": round(difference, 3),
        "within_goal": abs(difference) <= 0.3,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
