"""Benchmark: acquire, profile and validate all 70,000 Fashion-MNIST images.

Prints a table and saves JSON (``bench/results/validate_bench.json``). Beside each pipeline
stage it times the floors the work sits on: reading the raw pixels and gunzipping the files.
Each figure is the median of ``--repeat`` runs in this one process (imports warm after the
first run; the first run's import of Great Expectations is reported on its own line).

    .venv/bin/python bench/validate_bench.py [--source DIR] [--repeat 3]
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def timed(fn, *args):
    start = time.perf_counter()
    value = fn(*args)
    return time.perf_counter() - start, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "validate_bench.json"))
    args = parser.parse_args()

    import_seconds, _ = timed(__import__, "great_expectations")
    from pipeline.config import IDX_FILES, AcquireConfig
    from pipeline.data.acquire import acquire, load_raw_splits
    from pipeline.data.profile import dataset_facts, profile_table
    from pipeline.data.validate import validate_raw
    from pipeline.storage import open_storage

    files = [Path(args.source) / name for name in IDX_FILES.values()]
    rows: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        rows.setdefault(name, []).append(seconds)

    for _ in range(args.repeat):
        compressed = [f.read_bytes() for f in files]
        seconds, raw = timed(lambda blobs: [gzip.decompress(b) for b in blobs], compressed)
        record("floor: gunzip the 4 files (in memory)", seconds)
        pixels = np.frombuffer(b"".join(raw), dtype=np.uint8)
        record("floor: read 55 MB of raw pixels (in memory)", timed(pixels.sum, None, np.uint64)[0])
        config = AcquireConfig(source_uri=args.source)
        with tempfile.TemporaryDirectory() as tmp:
            storage = open_storage(tmp)
            seconds, ref = timed(acquire, config, storage)
            record("acquire (stream, 2 x sha256, store)", seconds)
            record("acquire again (unchanged source)", timed(acquire, config, storage)[0])
            seconds, splits = timed(load_raw_splits, ref, storage)
            record("read + strict IDX parse", seconds)
            seconds, profile = timed(profile_table, splits)
            record("profile table (70,000 rows)", seconds)
            record("dataset facts", timed(dataset_facts, profile)[0])
            record("validate_raw total (parse, profile, GX, reports)", timed(validate_raw, ref, storage)[0])
            total = (
                rows["acquire (stream, 2 x sha256, store)"][-1]
                + rows["validate_raw total (parse, profile, GX, reports)"][-1]
            )
            record("acquire + validate_raw", total)

    results = {name: statistics.median(values) for name, values in rows.items()}
    results["import great_expectations (once per process)"] = import_seconds
    width = max(map(len, results))
    print(f"{'step':<{width}}  seconds")
    for name, seconds in results.items():
        print(f"{name:<{width}}  {seconds:8.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "validate_bench",
                "images": 70000,
                "repeat": args.repeat,
                "python": sys.version.split()[0],
                "machine": platform.machine(),
                "cpus": __import__("os").cpu_count(),
                "seconds": results,
            },
            indent=2,
        )
    )
    print(f"saved {out}")


if __name__ == "__main__":
    main()
