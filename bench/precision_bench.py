"""Benchmark: CPU training throughput of each network in fp32 and in bf16 mixed precision.

What ``precision=auto`` chooses between on a CPU: bf16 autocast (oneDNN runs the convolutions
and matrix products on Intel AMX tiles where the CPU has them) against plain fp32, for every
architecture, ``channels_last``, SGD steps on random batches (the data path is not what is
measured; ``bench/train_bench.py`` measures real epochs). The two precisions alternate
``--repeat`` times per network; medians. Prints a table and saves JSON
(``bench/results/precision_bench.json``).

    .venv/bin/python bench/precision_bench.py [--batch-size 128] [--steps 30] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def images_per_second(architecture: str, bf16: bool, batch_size: int, steps: int) -> float:
    import torch
    from torch.nn import functional as F

    from pipeline.models.networks import build_network

    torch.manual_seed(0)
    net = build_network(architecture).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(batch_size, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):  # oneDNN picks and caches its kernels on the first steps
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch_size * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "precision_bench.json"))
    args = parser.parse_args()

    import torch

    from pipeline.config import ARCHITECTURES
    from pipeline.training.hardware import cpu_has_bf16_matmul, usable_cpus

    torch.set_num_threads(usable_cpus())
    rows = []
    for architecture in ARCHITECTURES:
        fp32, bf16 = [], []
        for _ in range(args.repeat):
            fp32.append(images_per_second(architecture, False, args.batch_size, args.steps))
            bf16.append(images_per_second(architecture, True, args.batch_size, args.steps))
        rows.append(
            {
                "architecture": architecture,
                "fp32_img_per_s": statistics.median(fp32),
                "bf16_img_per_s": statistics.median(bf16),
                "fp32_runs": fp32,
                "bf16_runs": bf16,
            }
        )
    amx = cpu_has_bf16_matmul()
    print(f"{usable_cpus()} CPU threads, batch {args.batch_size}, AMX: {amx}, torch {torch.__version__}")
    print(f"  {'network':<14}{'fp32 img/s':>12}{'bf16 img/s':>12}{'bf16 / fp32':>13}")
    for row in rows:
        ratio = row["bf16_img_per_s"] / row["fp32_img_per_s"]
        print(
            f"  {row['architecture']:<14}{row['fp32_img_per_s']:>12,.0f}{row['bf16_img_per_s']:>12,.0f}{ratio:>12.2f}x"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "amx": amx,
                "cpus": usable_cpus(),
                "torch": torch.__version__,
                "batch_size": args.batch_size,
                "networks": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"saved {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
