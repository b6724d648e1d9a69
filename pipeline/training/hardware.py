"""What this machine and process can train on: CPUs, bf16, GPUs, the processes of a DDP run."""

from __future__ import annotations

import math
import os
from pathlib import Path

from pipeline.config import TrainConfig


def is_global_rank_zero() -> bool:
    """True in the process that owns tracking and storage: global rank 0, or no DDP at all.

    Read from the environment that launchers set (``RANK`` from torchrun and SLURM-style
    launchers; ``NODE_RANK`` and ``LOCAL_RANK`` from Lightning's own launcher)."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"]) == 0
    return int(os.environ.get("NODE_RANK", 0)) == 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity, capped by a cgroup v2 CPU quota."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return count


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX): there, bf16 mixed
    precision trains the residual networks about 1.6x faster than fp32
    (bench/precision_bench.py); elsewhere it is emulated and slower."""
    import torch

    check = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private; absent in some builds
    return bool(check and check())


def trains_on_gpu(config: TrainConfig) -> bool:
    """Whether Lightning will put this training on CUDA devices."""
    import torch

    return config.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def resolve_precision(config: TrainConfig) -> str:
    """``auto``: bf16 mixed precision on a GPU that supports it, or on a CPU with AMX when
    training there; else 32-bit."""
    import torch

    if config.precision != "auto":
        return config.precision
    if trains_on_gpu(config):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if cpu_has_bf16_matmul() else "32-true"


def world_size(config: TrainConfig) -> int:
    """Processes taking part: devices per node (resolved as Lightning will) times nodes."""
    import torch

    devices = config.trainer_devices()
    if devices in ("auto", -1):
        per_node = torch.cuda.device_count() if trains_on_gpu(config) else 1
    elif isinstance(devices, list):
        per_node = len(devices)
    else:
        per_node = int(devices)
    return max(1, per_node) * config.num_nodes
