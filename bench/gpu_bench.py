"""Benchmark: the GPU recipe on all of Fashion-MNIST: epochs, wall time and test accuracy.

The GPU recipe is the default recipe with a larger network, a larger batch and more epochs
(``GPU_RECIPE``; the learning rate follows the batch by the ``train`` stage's linear scaling
rule). Each run goes through the ``train`` stage's own fitting path (``pipeline.training.fit.fit``:
the Lightning module, data module, Trainer settings, per-epoch checkpoints) but without
MLflow, which the GPU machines this was run on do not have; the test accuracy is the trained
module's on the test split, with the flip-averaged predictions that evaluation and serving
use, and its expected calibration error before and after the temperature that the ``train``
stage fits (``pipeline.training.calibration.calibrate``, run on the training device). After the seeds asked for, ``--compile-epochs`` epochs with ``torch.compile`` time the
compiled network against the eager one; ``--also`` adds runs with other epochs.

A run is started only if it should end within ``--budget-s`` seconds of the start (estimated
from the runs before it), so one invocation fits a fixed slot of device time. Prints a table
and saves JSON (``bench/results/gpu_bench.json``) after every run.

    PYTHONPATH=. python3 bench/gpu_bench.py [--source DIR] [--seeds 42 43] [--compile-epochs 3]

Where great_expectations (the split check of ``preprocess``) is not installed, prepare the
splits elsewhere and pass them: ``--home`` a copy of a ``PIPELINE_HOME`` holding
``storage/processed/<hash>/``, and ``--processed <hash>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The default recipe's optimizer, schedule, augmentation, label smoothing and test-time flip,
# with resnet_large (27x resnet_deep's arithmetic per image), 8x the batch (so a peak learning
# rate of 0.4) and 40 epochs.
GPU_RECIPE = {"architecture": "resnet_large", "batch_size": 512, "epochs": 40}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--home", help="PIPELINE_HOME to use (default: a new temporary folder)")
    parser.add_argument("--processed", help="hash of splits already processed in --home's storage")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument(
        "--also",
        nargs="*",
        default=[],
        metavar="EPOCHS:SEED",
        help="after the seeds, runs of the recipe with other epochs (e.g. 60:42)",
    )
    parser.add_argument(
        "--compile-epochs", type=int, default=0, help="after the seeds, this many epochs with torch.compile (0: none)"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=float("inf"),
        help="start no run that would end later than this after the start",
    )
    parser.add_argument("--accelerator", default="auto", help="cpu: a smoke test of this script on a CPU")
    parser.add_argument("--architecture", default=GPU_RECIPE["architecture"])
    parser.add_argument("--batch-size", type=int, default=GPU_RECIPE["batch_size"])
    parser.add_argument("--epochs", type=int, default=GPU_RECIPE["epochs"])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_bench.json"))
    args = parser.parse_args()
    started = time.perf_counter()

    os.environ["PIPELINE_HOME"] = args.home or tempfile.mkdtemp(prefix="gpu-bench-")
    for name in ("PIPELINE_STORAGE_URI", "MLFLOW_TRACKING_URI", "PIPELINE_ARTIFACT_ROOT"):
        os.environ.pop(name, None)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    logging.getLogger("pipeline").setLevel(logging.INFO)

    import pytorch_lightning as pl
    import torch

    from pipeline.config import AcquireConfig, PreprocessConfig, Settings, TrainConfig
    from pipeline.data.processed import load_processed_ref
    from pipeline.evaluation.report import calibration_bins, expected_calibration_error
    from pipeline.storage import storage_for
    from pipeline.training.calibration import calibrate
    from pipeline.training.datamodule import split_tensors
    from pipeline.training.hardware import resolve_precision, trains_on_gpu, usable_cpus
    from pipeline.training.trainer import fit

    settings = Settings.from_env()
    storage = storage_for(settings)
    if args.processed:
        processed = load_processed_ref(storage, args.processed)
    else:
        from pipeline.data.acquire import acquire
        from pipeline.data.preprocess import preprocess

        processed = preprocess(acquire(AcquireConfig(source_uri=args.source), storage), storage, PreprocessConfig())
    test = split_tensors(processed, storage, "test")
    recipe = TrainConfig(
        architecture=args.architecture, batch_size=args.batch_size, epochs=args.epochs, accelerator=args.accelerator
    )
    gpu = trains_on_gpu(recipe)
    device = torch.device("cuda" if gpu else "cpu")
    result: dict = {
        "machine": {
            "gpu": torch.cuda.get_device_name() if gpu else None,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "lightning": pl.__version__,
            "cpus": usable_cpus(),
        },
        "recipe": dataclasses.asdict(recipe),
        "precision": resolve_precision(recipe),
        "train_images": processed.counts["train"],
        "data_prep_seconds": round(time.perf_counter() - started, 1),
        "runs": [],
    }

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.epochs: list[float] = []

        def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            if gpu:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            if gpu:
                torch.cuda.synchronize()
            self.epochs.append(time.perf_counter() - self.start)

    def test_accuracy(module) -> dict[str, float]:
        module = module.to(device).eval()
        correct_plain, probabilities = 0, []
        with torch.inference_mode():
            for i in range(0, len(test), 2048):
                images, labels = test.images[i : i + 2048].to(device), test.labels[i : i + 2048].to(device)
                probabilities.append(torch.softmax(module(images), 1).cpu())  # as evaluated and served
                correct_plain += (module.net(module.normalise(images)).argmax(1) == labels).sum().item()
        confidence, predicted = torch.cat(probabilities).max(1)
        correct = (predicted == test.labels).numpy()
        return {
            "test_accuracy": float(correct.mean()),
            "test_accuracy_without_flip": correct_plain / len(test),
            "test_ece": expected_calibration_error(calibration_bins(confidence.numpy(), correct)),
        }

    def calibrated(module, name: str) -> dict[str, float]:
        """The ``train`` stage's calibration (``calibrate``, on the training device) of the final
        weights, and the test split's figures with the fitted temperature."""
        checkpoint = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}
        with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
            torch.save(checkpoint, Path(tmp) / "best.ckpt")
            storage.put_file(Path(tmp) / "best.ckpt", f"checkpoints/{name}/best.ckpt")
        module.hparams.temperature = calibrate(processed, storage, name, device.type)
        return {
            "temperature": module.hparams.temperature,
            **{f"calibrated_{k}": v for k, v in test_accuracy(module).items() if k != "test_accuracy_without_flip"},
        }

    def run(config: TrainConfig) -> dict:
        clock = Clock()
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="fit-") as workdir:
            trainer, module = fit(
                processed, storage, config, settings, run_id="", workdir=workdir, owner=False, extra_callbacks=[clock]
            )
        seconds = time.perf_counter() - start
        steady = statistics.median(clock.epochs[1:]) if len(clock.epochs) > 1 else clock.epochs[0]
        return {
            "seed": config.seed,
            "compile": config.compile,
            "epochs": len(clock.epochs),
            "train_seconds": round(seconds, 1),
            "first_epoch_seconds": round(clock.epochs[0], 2),
            "median_epoch_seconds": round(steady, 2),
            "train_img_per_s": round(processed.counts["train"] / steady),
            "val_accuracy_last_epoch": round(float(trainer.callback_metrics["val_accuracy"]), 4),
            **{k: round(v, 4) for k, v in test_accuracy(module).items()},
            **{k: round(v, 4) for k, v in calibrated(module, f"run{len(result['runs'])}").items()},
            "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None,
        }

    def save() -> None:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")

    planned = [dataclasses.replace(recipe, seed=seed) for seed in args.seeds]
    planned += [
        dataclasses.replace(recipe, epochs=int(epochs), seed=int(seed))
        for epochs, seed in (item.split(":") for item in args.also)
    ]
    if args.compile_epochs:
        planned.append(dataclasses.replace(recipe, seed=args.seeds[0], compile=True, epochs=args.compile_epochs))
    save()
    for config in planned:
        done = result["runs"]
        if done:  # estimate from the runs so far: their first epoch and their steady epochs
            first, per_epoch = done[0]["first_epoch_seconds"], max(r["median_epoch_seconds"] for r in done)
            # A compiled run's first epoch also compiles: allow a minute for it.
            estimate = first + (60 if config.compile else 0) + per_epoch * (config.epochs - 1) + 15
            if time.perf_counter() - started + estimate > args.budget_s:
                print(
                    f"skipped (would not end within --budget-s): seed {config.seed}, compile {config.compile}, "
                    f"{config.epochs} epochs, about {estimate:.0f} s",
                    flush=True,
                )
                continue
        done.append(run(config))
        save()
        print(json.dumps(done[-1]), flush=True)

    print(
        f"\n{result['machine']['gpu'] or 'CPU'}, torch {torch.__version__}, {result['precision']}, "
        f"{recipe.architecture}, batch {recipe.batch_size}, data prepared in {result['data_prep_seconds']} s"
    )
    header = (
        "seed",
        "compile",
        "epochs",
        "train s",
        "s/epoch",
        "first epoch s",
        "img/s",
        "test acc",
        "no flip",
        "ECE",
        "T",
        "ECE with T",
    )
    print("  ".join(f"{h:>13}" for h in header))
    for r in result["runs"]:
        cells = (
            r["seed"],
            r["compile"],
            r["epochs"],
            r["train_seconds"],
            r["median_epoch_seconds"],
            r["first_epoch_seconds"],
            r["train_img_per_s"],
            r["test_accuracy"],
            r["test_accuracy_without_flip"],
            r["test_ece"],
            r["temperature"],
            r["calibrated_test_ece"],
        )
        print("  ".join(f"{c!s:>13}" for c in cells))
    print(f"saved {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
