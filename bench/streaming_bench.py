"""Benchmark: a dataset larger than the training process's whole memory trains from litdata shards.

The issue's criterion, literally: when the decoded dataset is larger than the memory budget,
preprocessing writes it as litdata shards and training streams them, and the training
process's peak resident memory stays below the decoded dataset's size. (The integration test,
``tests/integration/test_streaming.py``, can only show a difference, streamed against held in
memory: its 180 MB dataset is smaller than torch and Lightning alone.)

One invocation: Fashion-MNIST's real images upscaled (bilinear) to ``--side`` pixels and read
as RGB (``AcquireConfig(colour="rgb")``): 49,152 bytes an image at the default 128x128, so
50,000 training and 5,000 test images decode to 2.5 GiB. They are written as the four gzip IDX
files (before anything is timed), acquired and preprocessed with ``--budget-mb`` (1,024 MB: the
dataset is over it, so the training split is written as shards; validation and test stay
``.npz``, as always) into local storage under a temporary pipeline home (a folder, not S3:
litdata maps the chunks in place, no download and no chunk cache). Then ``train()`` runs one
epoch of the tests' small recipe (``tests/recipes.py``) in a fresh process, with ``HOME`` under
the pipeline home so that nothing of litdata's goes to ``~/``. That process reports its
resident memory from ``/proc/self/status``: VmHWM, its peak, over the whole ``train()`` call
(the mark is reset with ``/proc/self/clear_refs`` once everything is imported, just before the
call) and at the end of fit (training and validation, before calibration), and the highest
VmRSS at the end of a training batch. With ``--held``, the same images preprocessed with the
default budget (held in memory, ``.npz``) train the same way after, for comparison. Every
figure in MB is 2^20 bytes. Exits 1 when the streamed training's peak is not below the decoded
dataset's size. Prints a table and saves JSON (``bench/results/streaming_bench.json``).

    .venv/bin/python bench/streaming_bench.py [--train 50000] [--test 5000] [--side 128] \\
        [--budget-mb 1024] [--batch-size 128] [--held] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tests' IDX writer and small recipe

#: One training in a fresh process; prints its figures as one JSON line. Everything train()
#: imports is imported first, then the high-water mark of the resident set is reset
#: (``/proc/self/clear_refs``, "5"), so that VmHWM afterwards is the peak of train() alone.
TRAIN_AND_MEASURE = """
import json, sys, time
import litdata, mlflow, pytorch_lightning
import pipeline.models.classifier, pipeline.training.calibration, pipeline.training.datamodule
import pipeline.training.trainer
from pipeline.config import Settings, TrainConfig
from pipeline.data.processed import load_processed_ref
from pipeline.storage import storage_for
from pipeline.training.fit import train

def status(field):
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field + ":"))

training, fit_hwm = [], []

class Measure(pytorch_lightning.Callback):
    def on_train_batch_end(self, *args, **kwargs):
        training.append((status("VmRSS"), status("RssAnon"), status("RssFile")))

    def on_fit_end(self, *args, **kwargs):
        fit_hwm.append(status("VmHWM"))

init = pytorch_lightning.Trainer.__init__
def with_measure(self, *args, callbacks=None, **kwargs):
    init(self, *args, callbacks=[*(callbacks or []), Measure()], **kwargs)
pytorch_lightning.Trainer.__init__ = with_measure

settings = Settings.from_env()
storage = storage_for(settings)
ref = load_processed_ref(storage, sys.argv[1])
config = TrainConfig(**json.loads(sys.argv[2]))
imports_hwm = status("VmHWM")
try:
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    reset = True
except OSError:
    reset = False
before = status("VmRSS")
start = time.perf_counter()
result = train(ref, storage, config, settings)
seconds = time.perf_counter() - start
print(json.dumps({
    "layout": ref.layout,
    "imports_hwm": imports_hwm,
    "hwm_reset": reset,
    "before": before,
    "hwm": status("VmHWM"),
    "after": status("VmRSS"),
    "fit_hwm": fit_hwm[0],
    "batch_end_max": max(training)[0],
    "batch_end_max_anon": max(training)[1],
    "batch_end_max_file": max(training)[2],
    "batch_end_first": training[0][0],
    "batches": len(training),
    "train_seconds": seconds,
    "metrics": result.metrics,
}))
"""


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return time.perf_counter() - start, value


def upscaled(images: np.ndarray, side: int) -> np.ndarray:
    from PIL import Image

    out = np.empty((len(images), side, side), dtype=np.uint8)
    for i, x in enumerate(images):
        out[i] = np.asarray(Image.fromarray(x).resize((side, side), Image.Resampling.BILINEAR))
    return out


def pipeline_env(home: Path) -> dict[str, str]:
    """This environment pointed at ``home`` alone (local storage, SQLite MLflow store), with
    ``HOME`` under it: litdata must keep anything it writes under the pipeline's home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "MLFLOW_"))}
    (home / "user").mkdir(parents=True, exist_ok=True)
    return {**env, "PIPELINE_HOME": str(home), "HOME": str(home / "user")}


def train_and_measure(processed_hash: str, env: dict[str, str], config: dict) -> dict:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", TRAIN_AND_MEASURE, processed_hash, json.dumps(config)],
        capture_output=True,
        text=True,
        env=env,
    )
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        sys.exit(f"training on {processed_hash} failed (exit {out.returncode}): {out.stderr.strip()[-3000:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "process_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--train", type=int, default=50_000, help="training images, before the validation split")
    parser.add_argument("--test", type=int, default=5_000, help="test images")
    parser.add_argument("--side", type=int, default=128, help="images upscaled to side x side (then read as RGB)")
    parser.add_argument("--budget-mb", type=int, default=1024, help="the preprocessing memory budget")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--held", action="store_true", help="also train on the same data held in memory (.npz)")
    parser.add_argument("--work", default="", help="where the data and home go (default: a temporary folder)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "streaming_bench.json"))
    args = parser.parse_args()

    from defects import write_dataset
    from recipes import SMALL_RECIPE

    from pipeline.config import IDX_FILES, AcquireConfig, PreprocessConfig, Settings
    from pipeline.data.acquire import acquire
    from pipeline.data.idx import read_split
    from pipeline.data.preprocess import preprocess
    from pipeline.data.shards import INDEX, MB, chunk_bytes, shards_key
    from pipeline.storage import storage_for

    source = Path(args.source)
    (x, y), (xt, yt) = (
        read_split(source / IDX_FILES[f"{split}_images"], source / IDX_FILES[f"{split}_labels"])
        for split in ("train", "test")
    )
    if args.train > len(y) or args.test > len(yt):
        sys.exit(f"at most {len(y)} training and {len(yt)} test images")
    config = {**SMALL_RECIPE, "epochs": 1, "batch_size": args.batch_size}
    seconds: dict[str, float] = {}
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="streaming-bench-", dir=args.work or None) as work:
        start = time.perf_counter()
        folder = write_dataset(
            Path(work) / f"fashion-{args.side}",
            {
                "train": (upscaled(x[: args.train], args.side), y[: args.train]),
                "t10k": (upscaled(xt[: args.test], args.side), yt[: args.test]),
            },
        )
        seconds["export: upscale, write gzip IDX (not part of the pipeline)"] = time.perf_counter() - start
        print(f"exported {args.train} + {args.test} images at {args.side}x{args.side} to {folder}", flush=True)

        home = Path(work) / "home"
        env = pipeline_env(home)
        settings = Settings.from_env(env)
        storage = storage_for(settings)
        seconds["acquire (rgb)"], raw = timed(acquire, AcquireConfig(source_uri=str(folder), colour="rgb"), storage)
        budget = PreprocessConfig(memory_budget_mb=args.budget_mb)
        seconds["preprocess: split, write shards"], sharded = timed(preprocess, raw, storage, budget)
        if sharded.layout != "shards":
            sys.exit(
                f"the dataset is within the {args.budget_mb} MB budget: nothing streams (more images or a lower budget)"
            )
        assert storage.exists(f"{shards_key(sharded.processed_hash, 'train')}/{INDEX}")
        assert not storage.exists(f"processed/{sharded.processed_hash}/train.npz")
        image_bytes = 3 * args.side * args.side
        counts = sharded.counts
        decoded = sum(counts.values()) * image_bytes  # the pixels of all splits (labels: 8 bytes an image more)
        train_split = counts["train"] * image_bytes
        print(f"preprocessed: {counts}, {decoded / MB:.0f} MB decoded, layout {sharded.layout}", flush=True)

        runs["streamed"] = train_and_measure(sharded.processed_hash, env, config)
        seconds["train: streamed, process (imports + train())"] = runs["streamed"]["process_seconds"]
        seconds["train: streamed, train() alone"] = runs["streamed"]["train_seconds"]
        assert runs["streamed"]["layout"] == "shards"
        assert not (home / "user" / ".lightning").exists(), "litdata wrote under ~/"
        if args.held:
            seconds["preprocess: split, write .npz (default budget)"], held = timed(
                preprocess, raw, storage, PreprocessConfig()
            )
            assert held.layout == "npz" and held.counts == counts
            runs["held"] = train_and_measure(held.processed_hash, env, config)
            seconds["train: held, process (imports + train())"] = runs["held"]["process_seconds"]
            seconds["train: held, train() alone"] = runs["held"]["train_seconds"]
        storage_path = settings.storage_uri
    own_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    streamed = runs["streamed"]
    figures = [
        ("storage", f"local folder ({storage_path}), not S3"),
        (
            "decoded dataset (train + val + test)",
            f"{decoded / MB:,.0f} MB ({sum(counts.values()):,} images of {args.side}x{args.side}x3)",
        ),
        ("training split, streamed from shards", f"{train_split / MB:,.0f} MB ({counts['train']:,} images)"),
        ("memory budget / chunk size", f"{args.budget_mb:,} MB / {chunk_bytes(args.budget_mb) / MB:.0f} MB"),
    ]
    for name, run in runs.items():
        figures += [
            (f"{name}: RSS just before train()", f"{run['before'] / MB:,.0f} MB"),
            (
                f"{name}: highest RSS at a training-batch end",
                f"{run['batch_end_max'] / MB:,.0f} MB (anonymous {run['batch_end_max_anon'] / MB:,.0f}, "
                f"file-backed {run['batch_end_max_file'] / MB:,.0f}; {run['batches']} batches)",
            ),
            (f"{name}: VmHWM through fit (training, validation)", f"{run['fit_hwm'] / MB:,.0f} MB"),
            (
                f"{name}: VmHWM over train() (fit, calibration)",
                f"{run['hwm'] / MB:,.0f} MB" + ("" if run["hwm_reset"] else " (mark not reset: includes the imports)"),
            ),
            (f"{name}: val accuracy after 1 epoch", f"{run['metrics']['val_accuracy']:.4f}"),
        ]
    figures += [
        ("decoded dataset / streamed VmHWM over train()", f"{decoded / streamed['hwm']:.2f}x"),
        ("decoded dataset / streamed highest batch-end RSS", f"{decoded / streamed['batch_end_max']:.2f}x"),
        ("this process's peak (export, acquire, preprocess)", f"{own_peak / MB:,.0f} MB"),
    ]
    width = max(len(name) for name, _ in figures + [(n, 0) for n in seconds])
    for name, value in figures:
        print(f"{name:<{width}}  {value}")
    print(f"{'phase':<{width}}  seconds")
    for name, value in seconds.items():
        print(f"{name:<{width}}  {value:7.1f}")
    below = streamed["hwm"] < decoded and streamed["batch_end_max"] < decoded
    print(f"streamed training's peak below the decoded dataset's size: {'yes' if below else 'NO'}")

    report = {
        "benchmark": "streaming_bench",
        "storage": "local folder (a temporary pipeline home), not S3",
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "work")},
        "train_config": config,
        "machine": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version()},
        "counts": counts,
        "decoded_bytes": decoded,
        "train_split_bytes": train_split,
        "chunk_bytes": chunk_bytes(args.budget_mb),
        "runs": runs,
        "bench_process_peak_bytes": own_peak,
        "seconds": seconds,
        "peak_below_decoded": below,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {out}")
    if not below:
        sys.exit(1)


if __name__ == "__main__":
    main()
