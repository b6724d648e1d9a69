"""Exploration: test accuracy of a training recipe, in a plain PyTorch loop.

For trying recipes (optimizer, peak learning rate, label smoothing, epochs) on all of
Fashion-MNIST faster than through the pipeline: the same processed splits, network, crop-and-flip
augmentation and one-cycle schedule as the ``train`` stage, no validation, no MLflow. Reports the
test accuracy, also with the prediction averaged with the mirrored image's (test-time flip), and
the training time. Prints a table and saves JSON (``bench/results/recipe_bench.json``).

    .venv/bin/python bench/recipe_bench.py --architecture resnet_deep --precision bf16-mixed \
        --optimizer sgd --learning-rate 0.05 --batch-size 64 --label-smoothing 0.1 --epochs 15

``--learning-rate`` is the rate used as given (the ``train`` stage scales its setting with the
batch: 0.1 at 128 images is 0.05 at 64).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from plain_loop import plain_optimizer, plain_step

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--architecture", default="resnet_small")
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--learning-rate", type=float, default=4e-3)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--precision", choices=("32-true", "bf16-mixed"), default="32-true")
    parser.add_argument("--no-crop", action="store_true", help="flip only, no random crop")
    parser.add_argument(
        "--cutout",
        type=int,
        default=0,
        help="zero a random square of this side in each training image with probability 0.5 (0: off)",
    )
    parser.add_argument(
        "--ema",
        type=float,
        default=0.0,
        help="also evaluate an exponential moving average of the weights with this decay per step (0: off)",
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "recipe_bench.json"))
    args = parser.parse_args()

    os.environ["PIPELINE_HOME"] = tempfile.mkdtemp(prefix="recipe-bench-")
    for name in ("PIPELINE_STORAGE_URI", "MLFLOW_TRACKING_URI", "PIPELINE_ARTIFACT_ROOT"):
        os.environ.pop(name, None)

    import torch
    from torch.nn import functional as F

    from pipeline.config import AcquireConfig, PreprocessConfig, Settings
    from pipeline.data.acquire import acquire
    from pipeline.data.preprocess import preprocess
    from pipeline.data.processed import load_split
    from pipeline.models.classifier import ImageClassifier, random_crop_flip
    from pipeline.storage import storage_for
    from pipeline.training.hardware import usable_cpus

    torch.set_num_threads(usable_cpus())
    torch.manual_seed(args.seed)
    storage = storage_for(Settings.from_env())
    processed = preprocess(acquire(AcquireConfig(source_uri=args.source), storage), storage, PreprocessConfig())
    (train_x, train_y), (test_x, test_y) = (
        tuple(torch.from_numpy(a) for a in load_split(processed, storage, split)) for split in ("train", "test")
    )
    train_y, test_y = train_y.long(), test_y.long()
    module = ImageClassifier(architecture=args.architecture, mean=processed.mean, std=processed.std)
    net = module.net
    steps = args.epochs * ((len(train_y) + args.batch_size - 1) // args.batch_size)
    optimizer, schedule = plain_optimizer(net, args.optimizer, args.learning_rate, args.weight_decay, steps)

    ema = (
        torch.optim.swa_utils.AveragedModel(
            net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(args.ema), use_buffers=True
        )
        if args.ema
        else None
    )
    start = time.perf_counter()
    for epoch in range(args.epochs):
        net.train()
        order = torch.randperm(len(train_y))
        for i in range(0, len(train_y), args.batch_size):
            index = order[i : i + args.batch_size]
            x = random_crop_flip(train_x[index], 0 if args.no_crop else 2)
            if args.cutout:
                n = len(x)
                cy, cx = torch.randint(0, 28, (2, n, 1, 1))
                rows, cols = torch.arange(28).view(1, 28, 1), torch.arange(28).view(1, 1, 28)
                half = args.cutout // 2
                hole = ((rows - cy).abs() <= half) & ((cols - cx).abs() <= half) & (torch.rand(n, 1, 1) < 0.5)
                x = x.masked_fill(hole, 0)
            plain_step(
                net, module.normalise, x, train_y[index], optimizer, schedule, args.precision, args.label_smoothing
            )
            if ema is not None:
                ema.update_parameters(net)
        print(f"epoch {epoch + 1}/{args.epochs}: {time.perf_counter() - start:.0f} s", flush=True)
    seconds = time.perf_counter() - start

    def accuracies(model, prefix):
        model.eval()
        with torch.inference_mode():

            def probabilities(images):
                return torch.cat(
                    [F.softmax(model(module.normalise(images[i : i + 2048])), 1) for i in range(0, len(images), 2048)]
                )

            def shifted(images, dy, dx):  # translate by (dy, dx) pixels, zero fill
                padded = F.pad(images, (1, 1, 1, 1))
                return padded[:, 1 + dy : 29 + dy, 1 + dx : 29 + dx]

            plain, mirrored = probabilities(test_x), probabilities(test_x.flip(-1))
            shifts = [
                probabilities(shifted(x, dy, dx))
                for x in (test_x, test_x.flip(-1))
                for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0))
            ]

        def accuracy(p):
            return round((p.argmax(1) == test_y).float().mean().item(), 4)

        return {
            f"{prefix}test_accuracy": accuracy(plain),
            f"{prefix}test_accuracy_flip_averaged": accuracy(plain + mirrored),
            f"{prefix}test_accuracy_flip_shift_averaged": accuracy(2 * (plain + mirrored) + sum(shifts) / 2),
        }

    result = {
        "recipe": {k: v for k, v in vars(args).items() if k not in ("source", "out")},
        "train_seconds": round(seconds, 1),
        **accuracies(net, ""),
        **(accuracies(ema.module, "ema_") if ema is not None else {}),
        "torch": torch.__version__,
        "cpus": usable_cpus(),
    }
    torch.save(net.state_dict(), Path(args.out).with_suffix(".pt"))
    for key, value in result.items():
        if key not in ("recipe", "torch", "cpus"):
            print(f"  {key:<40} {value}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
