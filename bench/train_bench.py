"""Benchmark: training speed, Lightning's overhead, and time to accuracy.

One invocation, one machine, the same processed Fashion-MNIST splits for everything:

1. **Overhead**: one epoch of the default model through our Lightning module and data module
   against a plain PyTorch loop over the same network, tensors, batch size, optimizer, schedule
   and augmentation (no validation in either). Alternated ``--repeat`` times; medians, of wall
   time and of the process's CPU time (``time.process_time``), which other work on a shared
   machine disturbs less: it does not count the time the process waits for a core.
2. **Throughput**: training images per second of ``seed_cnn`` and the default model (the
   Lightning path, median epoch).
3. **Time to accuracy** (skip with ``--skip-quality``), the measure fast-training benchmarks
   use: ``seed_cnn`` with the original design's recipe (10 epochs of Adam at 1e-3, no
   augmentation) sets the target, its test accuracy after the 10th epoch, and its wall time;
   then each recipe (``--recipes``: the default and ``quick``) trains its whole run, and the
   wall time at which its test accuracy first reaches the target is reported, with its ratio to
   ``seed_cnn``'s. Every run is the ``train`` stage's Lightning fit (validation and a checkpoint
   every epoch; no MLflow run); test accuracy is measured after every epoch, on the weights of
   that epoch, as the ``evaluate`` stage predicts (with the recipe's test-time flip), and that
   measuring is left out of the clock.

Prints a table and saves JSON (``bench/results/train_bench.json``).

    .venv/bin/python bench/train_bench.py [--source DIR] [--repeat 2] [--skip-quality] [--recipes default,quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
from plain_loop import plain_optimizer, plain_step

ROOT = Path(__file__).resolve().parent.parent
# The original design's recipe. Precision is left to ``auto``, as for the other recipes: each
# network gets this machine's fastest arithmetic, so the time comparison is not tilted.
SEED_RECIPE = {
    "architecture": "seed_cnn",
    "epochs": 10,
    "optimizer": "adam",
    "learning_rate": 1e-3,
    "lr_schedule": "constant",
    "augment": False,
    "weight_decay": 0.0,
    "label_smoothing": 0.0,
    "test_time_flip": False,
}


class TestAccuracyClock(pl.Callback):
    """After every epoch (its validation and checkpoint included), the training wall time since
    :meth:`restart` (and this process's CPU time, which other work on a shared machine disturbs
    less) and the test accuracy of the epoch's weights; the time spent measuring the accuracy is
    left out of both clocks."""

    def __init__(self, images, labels, batch_size: int) -> None:
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.epochs: list[dict] = []
        self.restart()

    def restart(self) -> None:
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        self.excluded = self.cpu_excluded = 0.0

    def on_train_epoch_end(self, trainer, pl_module):
        import torch

        stopped, cpu_stopped = time.perf_counter(), time.process_time()
        was_training = pl_module.training
        pl_module.eval()
        correct = 0
        # fp32, as the evaluate stage predicts; forward() normalises and flips as the recipe says.
        with torch.inference_mode(), torch.autocast("cpu", enabled=False):
            for i in range(0, len(self.labels), self.batch_size):
                logits = pl_module(self.images[i : i + self.batch_size])
                correct += int((logits.argmax(dim=1) == self.labels[i : i + self.batch_size]).sum())
        pl_module.train(was_training)
        self.epochs.append(
            {
                "epoch": trainer.current_epoch + 1,
                "train_seconds": stopped - self.start - self.excluded,
                "train_cpu_seconds": cpu_stopped - self.cpu_start - self.cpu_excluded,
                "test_accuracy": correct / len(self.labels),
            }
        )
        self.excluded += time.perf_counter() - stopped
        self.cpu_excluded += time.process_time() - cpu_stopped
        print(
            f"  epoch {trainer.current_epoch + 1}: {self.epochs[-1]['train_seconds']:.1f} s "
            f"({self.epochs[-1]['train_cpu_seconds']:.1f} CPU s), "
            f"test accuracy {self.epochs[-1]['test_accuracy']:.4f}",
            file=sys.stderr,
            flush=True,
        )


def time_to(epochs: list[dict], target: float) -> dict | None:
    """The first epoch whose test accuracy reaches ``target``, or None."""
    return next((epoch for epoch in epochs if epoch["test_accuracy"] >= target), None)


def plain_epoch(
    module, images, labels, batch_size: int, epochs_total: int, seed: int, precision: str
) -> tuple[float, float]:
    """One epoch of a hand-written loop doing what our LightningModule's training step does."""
    import torch

    from pipeline.models.classifier import random_crop_flip

    torch.manual_seed(seed)
    hp = module.hparams
    net = module.net
    net.train()
    steps = epochs_total * ((len(labels) + batch_size - 1) // batch_size)
    optimizer, schedule = plain_optimizer(net, hp.optimizer, hp.learning_rate, hp.weight_decay, steps)
    order = torch.randperm(len(labels))
    start, cpu_start = time.perf_counter(), time.process_time()
    for i in range(0, len(labels), batch_size):
        index = order[i : i + batch_size]
        x, y = images[index], labels[index]
        if hp.augment:
            x = random_crop_flip(x, hp.crop_padding)
        plain_step(net, module.normalise, x, y, optimizer, schedule, precision, hp.label_smoothing)
    return time.perf_counter() - start, time.process_time() - cpu_start


def lightning_epoch(module, datamodule, precision: str) -> tuple[float, float]:
    import pytorch_lightning as pl

    class Clock(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_train_epoch_end(self, trainer, pl_module):
            self.seconds, self.cpu_seconds = time.perf_counter() - self.start, time.process_time() - self.cpu_start

    clock = Clock()
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[clock],
        use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule=datamodule)
    return clock.seconds, clock.cpu_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--repeat", type=int, default=2, help="epochs timed per side for overhead and throughput")
    parser.add_argument("--skip-quality", action="store_true", help="skip the full trainings (part 3)")
    parser.add_argument(
        "--recipes", default="default,quick", help="comma-separated recipes to time to seed_cnn's accuracy (part 3)"
    )
    parser.add_argument("--skip-overhead", action="store_true", help="skip the overhead and throughput (parts 1, 2)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_bench.json"))
    args = parser.parse_args()

    home = tempfile.mkdtemp(prefix="train-bench-")
    for name in ("PIPELINE_STORAGE_URI", "MLFLOW_TRACKING_URI", "PIPELINE_ARTIFACT_ROOT"):
        os.environ.pop(name, None)
    os.environ["PIPELINE_HOME"] = home
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

    import logging

    import torch

    from pipeline.config import AcquireConfig, PreprocessConfig, Settings, TrainConfig
    from pipeline.config.recipes import recipe_values
    from pipeline.data.acquire import acquire
    from pipeline.data.preprocess import preprocess
    from pipeline.data.processed import load_split
    from pipeline.models.classifier import ImageClassifier
    from pipeline.storage import storage_for
    from pipeline.training.datamodule import ProcessedDataModule, eval_batch_size
    from pipeline.training.hardware import resolve_precision, usable_cpus
    from pipeline.training.trainer import fit

    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    torch.set_num_threads(usable_cpus())
    settings = Settings.from_env()
    storage = storage_for(settings)
    processed = preprocess(acquire(AcquireConfig(source_uri=args.source), storage), storage, PreprocessConfig())
    default = TrainConfig()
    result: dict = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "lightning": pl.__version__,
            "cpus": usable_cpus(),
            "processor": platform.processor(),
        },
        "train_images": processed.counts["train"],
        "default_recipe": dataclasses.asdict(default),
    }
    rows: list[tuple[str, str]] = []
    n = processed.counts["train"]

    def module_for(config: TrainConfig) -> tuple[ImageClassifier, ProcessedDataModule]:
        pl.seed_everything(config.seed, verbose=False)
        module = ImageClassifier(
            architecture=config.architecture,
            learning_rate=config.learning_rate,
            weight_decay=config.weight_decay,
            optimizer=config.optimizer,
            lr_schedule=config.lr_schedule,
            augment=config.augment,
            label_smoothing=config.label_smoothing,
            test_time_flip=config.test_time_flip,
            mean=processed.mean,
            std=processed.std,
        )
        data = ProcessedDataModule(processed, storage, config.batch_size, config.seed)
        return module, data

    # 1 + 2: overhead of our Lightning path, and throughput of both networks.
    precision = resolve_precision(dataclasses.replace(default, accelerator="cpu"))
    result["precision"] = precision
    seed_config = dataclasses.replace(default, **SEED_RECIPE)
    if not args.skip_overhead:
        _, data = module_for(default)
        data.setup()
        images, labels = data.splits["train"].images, data.splits["train"].labels
        plain, ours = [], []
        for _ in range(args.repeat):
            module, _ = module_for(default)
            plain.append(
                plain_epoch(module, images, labels, default.batch_size, default.epochs, default.seed, precision)
            )
            module, datamodule = module_for(default)
            ours.append(lightning_epoch(module, datamodule, precision))
        seed_epochs = []
        for _ in range(args.repeat):
            module, datamodule = module_for(seed_config)
            seed_epochs.append(lightning_epoch(module, datamodule, resolve_precision(seed_config)))

        def median(samples: list[tuple[float, float]], which: int) -> float:
            return statistics.median(sample[which] for sample in samples)

        plain_s, ours_s, seed_s = median(plain, 0), median(ours, 0), median(seed_epochs, 0)
        plain_cpu, ours_cpu = median(plain, 1), median(ours, 1)
        result["overhead"] = {
            "plain_torch_s_per_epoch": [wall for wall, _ in plain],
            "lightning_s_per_epoch": [wall for wall, _ in ours],
            "plain_torch_cpu_s_per_epoch": [cpu for _, cpu in plain],
            "lightning_cpu_s_per_epoch": [cpu for _, cpu in ours],
            "overhead": ours_s / plain_s - 1,
            "overhead_cpu_time": ours_cpu / plain_cpu - 1,
        }
        result["throughput_img_per_s"] = {default.architecture: n / ours_s, "seed_cnn": n / seed_s}
        rows += [
            (f"plain PyTorch loop, {default.architecture}, s/epoch", f"{plain_s:.1f}"),
            (f"our Lightning module, {default.architecture}, s/epoch", f"{ours_s:.1f}"),
            ("Lightning overhead (ours / plain - 1)", f"{ours_s / plain_s - 1:+.1%}"),
            ("the same in CPU time (this process's threads, all cores)", f"{ours_cpu / plain_cpu - 1:+.1%}"),
            (f"throughput {default.architecture}, train img/s", f"{n / ours_s:,.0f}"),
            ("throughput seed_cnn (original recipe), train img/s", f"{n / seed_s:,.0f}"),
        ]

    # 3: time to accuracy: seed_cnn's 10-epoch test accuracy is the target, its wall time the yardstick.
    if not args.skip_quality:
        test_images, test_labels = (torch.from_numpy(a) for a in load_split(processed, storage, "test"))
        test_labels = test_labels.long()
        batch = eval_batch_size(processed.image_shape)

        def timed(config: TrainConfig) -> dict:
            print(f"{config.architecture}, {config.epochs} epochs:", file=sys.stderr, flush=True)
            clock = TestAccuracyClock(test_images, test_labels, batch)
            with tempfile.TemporaryDirectory(prefix="train-bench-fit-") as workdir:
                clock.restart()
                fit(
                    processed,
                    storage,
                    config,
                    settings,
                    run_id="",
                    workdir=workdir,
                    owner=False,
                    extra_callbacks=[clock],
                )
            return {"config": dataclasses.asdict(config), "epochs": clock.epochs}

        seed_run = timed(seed_config)
        last = seed_run["epochs"][-1]
        target, seed_seconds = last["test_accuracy"], last["train_seconds"]
        quality: dict = {"target_test_accuracy": target, "seed_cnn_seconds": seed_seconds, "seed_cnn": seed_run}
        rows.append(
            (
                f"seed_cnn, original recipe ({seed_config.epochs} epochs): test accuracy (the target) / train s",
                f"{target:.4f} / {seed_seconds:.0f}",
            )
        )
        for name in args.recipes.split(","):
            config = dataclasses.replace(default, **recipe_values(name))
            run = timed(config)
            reached = time_to(run["epochs"], target)
            final = run["epochs"][-1]
            run["reached"] = reached
            run["time_to_target_ratio"] = reached["train_seconds"] / seed_seconds if reached else None
            quality[name] = run
            best = max(epoch["test_accuracy"] for epoch in run["epochs"])
            rows += [
                (
                    f"{name} recipe: time to the target, s (epoch) / x seed_cnn's",
                    f"{reached['train_seconds']:.0f} ({reached['epoch']}) / {run['time_to_target_ratio']:.2f}x"
                    if reached
                    else f"not reached (best {best:.4f})",
                ),
                (
                    f"{name} recipe ({config.epochs} epochs): test accuracy / train s",
                    f"{final['test_accuracy']:.4f} / {final['train_seconds']:.0f}",
                ),
            ]
        result["time_to_accuracy"] = quality

    width = max(len(name) for name, _ in rows)
    print(f"training on {n:,} images, {usable_cpus()} CPU threads, torch {torch.__version__}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value:>14}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"saved {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
