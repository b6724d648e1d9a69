"""Benchmark: training speed, Lightning's overhead, and test accuracy against wall time.

One invocation, one machine, the same processed Fashion-MNIST splits for everything:

1. **Overhead**: one epoch of the default model through our Lightning module and data module
   against a plain PyTorch loop over the same network, tensors, batch size, optimizer, schedule
   and augmentation (no validation in either). Alternated ``--repeat`` times; medians, of wall
   time and of the process's CPU time (``time.process_time``), which other work on a shared
   machine disturbs less: it does not count the time the process waits for a core.
2. **Throughput**: training images per second of ``seed_cnn`` and the default model (the
   Lightning path, median epoch).
3. **Quality against time** (skip with ``--skip-quality``): the real ``train`` and ``evaluate``
   stages, wall time and test accuracy, for ``seed_cnn`` with the original design's recipe
   (10 epochs of Adam at 1e-3, no augmentation), for the default recipe, and for the default
   recipe cut to the epochs that fit in ``seed_cnn``'s wall time.

Prints a table and saves JSON (``bench/results/train_bench.json``).

    .venv/bin/python bench/train_bench.py [--source DIR] [--repeat 2] [--skip-quality]
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

from plain_loop import plain_optimizer, plain_step

ROOT = Path(__file__).resolve().parent.parent
# The original design's recipe. Precision is left to ``auto``, as for the default recipe: each
# network gets this machine's fastest arithmetic, so the equal-time comparison is not tilted.
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
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_bench.json"))
    args = parser.parse_args()

    home = tempfile.mkdtemp(prefix="train-bench-")
    for name in ("PIPELINE_STORAGE_URI", "MLFLOW_TRACKING_URI", "PIPELINE_ARTIFACT_ROOT"):
        os.environ.pop(name, None)
    os.environ["PIPELINE_HOME"] = home
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

    import logging

    import pytorch_lightning as pl
    import torch

    from pipeline.config import AcquireConfig, PreprocessConfig, Settings, TrainConfig
    from pipeline.data.acquire import acquire
    from pipeline.data.preprocess import preprocess
    from pipeline.evaluation.evaluate import evaluate
    from pipeline.models.classifier import ImageClassifier
    from pipeline.storage import storage_for
    from pipeline.training.datamodule import ProcessedDataModule
    from pipeline.training.fit import train
    from pipeline.training.hardware import resolve_precision, usable_cpus

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
    _, data = module_for(default)
    data.setup()
    images, labels = data.splits["train"].images, data.splits["train"].labels
    plain, ours = [], []
    for _ in range(args.repeat):
        module, _ = module_for(default)
        plain.append(plain_epoch(module, images, labels, default.batch_size, default.epochs, default.seed, precision))
        module, datamodule = module_for(default)
        ours.append(lightning_epoch(module, datamodule, precision))
    seed_config = dataclasses.replace(default, **SEED_RECIPE)
    seed_epochs = []
    for _ in range(args.repeat):
        module, datamodule = module_for(seed_config)
        seed_epochs.append(lightning_epoch(module, datamodule, resolve_precision(seed_config)))
    n = len(labels)

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

    # 3: quality against time, through the real stages (MLflow run, checkpoints, evaluation).
    if not args.skip_quality:

        def full(config: TrainConfig) -> dict:
            start = time.perf_counter()
            trained = train(processed, storage, config, settings, force=True)
            seconds = time.perf_counter() - start
            accuracy = evaluate(trained, processed, storage, settings).test_accuracy
            return {
                "epochs": config.epochs,
                "train_seconds": seconds,
                "test_accuracy": accuracy,
                "config": dataclasses.asdict(config),
            }

        seed_run = full(seed_config)
        default_run = full(default)
        per_epoch = default_run["train_seconds"] / default.epochs
        budget_epochs = max(1, int(seed_run["train_seconds"] // per_epoch))
        budget_run = full(dataclasses.replace(default, epochs=budget_epochs))
        result["quality"] = {
            "seed_cnn_original": seed_run,
            "default": default_run,
            "default_in_seed_time": budget_run,
            "gain_in_seed_time_points": 100 * (budget_run["test_accuracy"] - seed_run["test_accuracy"]),
        }
        rows += [
            (
                "seed_cnn, original recipe (10 epochs): test accuracy / train s",
                f"{seed_run['test_accuracy']:.4f} / {seed_run['train_seconds']:.0f}",
            ),
            (
                f"default recipe ({default.epochs} epochs): test accuracy / train s",
                f"{default_run['test_accuracy']:.4f} / {default_run['train_seconds']:.0f}",
            ),
            (
                f"default recipe in seed_cnn's time ({budget_epochs} epochs): test accuracy / train s",
                f"{budget_run['test_accuracy']:.4f} / {budget_run['train_seconds']:.0f}",
            ),
            ("gain over seed_cnn at equal time, points", f"{result['quality']['gain_in_seed_time_points']:+.2f}"),
        ]

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
