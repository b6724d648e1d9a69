"""The ``pipeline train`` command line, which Lightning's launcher re-runs on every local rank."""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.config import TrainConfig
from pipeline.config.params import command_line, select
from pipeline.training.hardware import world_size

# Set by global rank 0 before Lightning launches the other local ranks (they inherit the
# environment): the run to join and the checkpoint to resume from ("" for a fresh start).
ENV_RUN = "PIPELINE_TRAIN_RUN_ID"
ENV_RESUME = "PIPELINE_TRAIN_RESUME_FROM"


def needs_launcher(config: TrainConfig) -> bool:
    """Whether this training starts several processes through Lightning's script launcher
    (DDP over several devices or nodes), which re-runs the current command line."""
    return world_size(config) > 1 and config.strategy in ("auto", "ddp")


def train_command(
    processed_hash: str, config: TrainConfig, *, force: bool = False, tags: dict[str, str] | None = None
) -> list[str]:
    """The ``pipeline train`` command line that trains ``config`` on ``processed_hash``."""
    command = [str(Path(sys.executable).parent / "pipeline"), "train", "--processed", processed_hash, "--json"]
    params = select("train")
    command += command_line({p.name: getattr(config, p.field_in("train") or "") for p in params}, params)
    command += ["--force"] if force else []
    for key, value in (tags or {}).items():
        command += ["--tag", f"{key}={value}"]
    return command
