"""Benchmark: all 70,000 Fashion-MNIST images as PNG class folders against the IDX files.

One invocation, the same images both ways: the four IDX files, and the same images exported
(before timing) as ``train/<class>/<n>.png`` and ``test/<class>/<n>.png``. For each it times
``acquire`` (for the folder: list, read, hash and pack 70,000 files) and ``validate_raw``
(for the folder: decode every PNG in parallel, then profile, GX suites and reports, exactly as
for IDX), and reports images per second and the PNG path's time as a ratio to the IDX path's.
Then the rerun on the unchanged folder (nothing fetched, nothing decoded), and the decoder
alone with one process and with every CPU. Prints a table and saves JSON
(``bench/results/decode_bench.json``).

    .venv/bin/python bench/decode_bench.py [--source DIR] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tests' writer of class folders


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return time.perf_counter() - start, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--work", default="", help="where the PNG folders are written (default: a temporary folder)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "decode_bench.json"))
    args = parser.parse_args()

    import great_expectations  # noqa: F401 - imported once, before any timing
    from image_datasets import fashion_folders

    from pipeline.config import IDX_FILES, AcquireConfig
    from pipeline.data.acquire import acquire
    from pipeline.data.idx import read_split
    from pipeline.data.images import ImagePolicy, decode_all
    from pipeline.data.layouts import list_images, open_members
    from pipeline.data.validate import validate_raw
    from pipeline.storage import open_storage

    source = Path(args.source)
    splits = {
        name: read_split(source / IDX_FILES[f"{split}_images"], source / IDX_FILES[f"{split}_labels"])
        for name, split in (("train", "train"), ("t10k", "test"))
    }
    images = sum(len(y) for _, y in splits.values())
    rows: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.work or tmp) / "fashion-png"
        if not (folder / "test").is_dir():
            seconds, _ = timed(fashion_folders, folder, splits)
            print(f"exported {images} PNGs to {folder} in {seconds:.1f} s (not part of any figure)")
        for name, uri in (("IDX files", str(source)), ("PNG class folders", str(folder))):
            with tempfile.TemporaryDirectory() as store:
                storage = open_storage(store)
                config = AcquireConfig(source_uri=uri, dataset_name="fashion-mnist")
                acquired, raw = timed(acquire, config, storage)
                validated, ref = timed(validate_raw, raw, storage)
                rows[f"{name}: acquire"] = acquired
                rows[f"{name}: validate (decode, profile, GX)"] = validated
                rows[f"{name}: acquire + validate"] = acquired + validated
                assert sum(sum(c.values()) for c in ref.spec["counts"].values()) == images
                if name == "PNG class folders":
                    again, _ = timed(acquire, config, storage)
                    rows[f"{name}: acquire again (unchanged)"] = again
                    with open_members(storage.local_path(f"raw/{raw.dataset_hash}/images.tar")) as members:
                        listing = list_images(members, "folders")
                        items = list(members.read_many(listing.names))
                    for workers in (1, len(os.sched_getaffinity(0))):
                        seconds, _ = timed(decode_all, items, ImagePolicy(channels=1), workers=workers)
                        rows[f"decode_all alone, {workers} process{'es' if workers > 1 else ''}"] = seconds

    width = max(map(len, rows))
    print(f"{'step':<{width}}  seconds  images/s")
    for name, seconds in rows.items():
        print(f"{name:<{width}}  {seconds:7.2f}  {images / seconds:8.0f}")
    ratio = rows["PNG class folders: acquire + validate"] / rows["IDX files: acquire + validate"]
    print(f"PNG folders / IDX files, acquire + validate: {ratio:.2f}x the time")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "decode_bench",
                "images": images,
                "python": sys.version.split()[0],
                "machine": platform.machine(),
                "cpus": len(os.sched_getaffinity(0)),
                "seconds": rows,
                "images_per_second": {name: images / seconds for name, seconds in rows.items()},
                "png_over_idx": ratio,
            },
            indent=2,
        )
    )
    print(f"saved {out}")


if __name__ == "__main__":
    main()
