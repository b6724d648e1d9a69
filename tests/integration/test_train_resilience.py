"""Training as it runs in production: killed and resumed, interrupted by SIGTERM, repeated
for determinism, and spread over two DDP processes on the CPU (gloo). Real data (a small
subset), a real MLflow store, the real ``pipeline train`` command in a subprocess."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from recipes import SMALL_RECIPE, prepare_small, recipe_flags
from services import run_cli

from pipeline.config import Settings, TrainConfig
from pipeline.storage import storage_for
from pipeline.tracking import experiment_id, tracking_client
from pipeline.training.fit import train

pytestmark = pytest.mark.integration
PIPELINE = str(Path(sys.executable).parent / "pipeline")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, small_dataset):
    """A pipeline home holding the small real subset, acquired and processed."""
    home = tmp_path_factory.mktemp("home")
    env = {
        "PIPELINE_HOME": str(home),
        "PIPELINE_STORAGE_URI": "",
        "MLFLOW_TRACKING_URI": "",
        "PIPELINE_ARTIFACT_ROOT": "",
    }
    settings = Settings.from_env({**os.environ, **env})
    storage = storage_for(settings)
    processed = prepare_small(storage, small_dataset).processed
    return {"env": env, "settings": settings, "storage": storage, "processed": processed}


@pytest.fixture
def private(prepared, tmp_path):
    """Storage and MLflow store of one test, holding the prepared processed splits, so that a
    checkpoint or run the test finds is its own."""
    env = {
        **prepared["env"],
        "PIPELINE_STORAGE_URI": str(tmp_path / "storage"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PIPELINE_ARTIFACT_ROOT": tmp_path.as_uri(),
    }
    # The processed splits are content-addressed and immutable: a copy is the same dataset.
    source = Path(prepared["storage"].uri(f"processed/{prepared['processed'].processed_hash}"))
    (tmp_path / "storage" / "processed").mkdir(parents=True)
    subprocess.run(["cp", "-r", str(source), str(tmp_path / "storage" / "processed")], check=True)
    settings = Settings.from_env({**os.environ, **env})
    return {
        "env": env,
        "settings": settings,
        "root": tmp_path / "storage",
        "processed": prepared["processed"].processed_hash,
        "train_images": prepared["processed"].counts["train"],
    }


def runs_of(settings: Settings) -> list:
    client = tracking_client(settings)
    return client.search_runs([experiment_id(client, settings)])


def start_training(env: dict[str, str], processed_hash: str, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [PIPELINE, "train", "-v", "--processed", processed_hash, "--accelerator", "cpu", *flags],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_checkpoint(storage_root: Path, proc: subprocess.Popen, timeout: float = 300) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(storage_root.glob("checkpoints/*/last.ckpt"))
        if found:
            return found[0]
        if proc.poll() is not None:
            raise AssertionError(f"training ended before its first checkpoint: {proc.communicate()[1][-2000:]}")
        time.sleep(0.02)
    raise TimeoutError("no epoch checkpoint appeared")


def wait_for_next_checkpoint(last: Path, proc: subprocess.Popen, timeout: float = 300) -> float:
    """Wait for the epoch checkpoint ``last`` to be replaced (checkpoints are written
    atomically) and return how long that took: the length of one epoch."""
    started, seen = time.monotonic(), last.stat().st_mtime_ns
    while time.monotonic() - started < timeout:
        if last.stat().st_mtime_ns != seen:
            return time.monotonic() - started
        if proc.poll() is not None:
            raise AssertionError(f"training ended before its next checkpoint: {proc.communicate()[1][-2000:]}")
        time.sleep(0.02)
    raise TimeoutError(f"{last} was not replaced within {timeout:.0f} s")


def test_sigkill_in_the_second_epoch_then_the_retry_resumes_there(private):
    env, settings = private["env"], private["settings"]
    flags = ("--epochs", "4", "--batch-size", "16", "--architecture", "simple_cnn")
    proc = start_training(env, private["processed"], *flags)
    last = wait_for_checkpoint(private["root"], proc)
    proc.send_signal(signal.SIGKILL)  # no handler runs: only what was stored survives
    proc.wait(timeout=60)
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["epoch"] == 0, "the kill must land in the second epoch (the first one is saved)"
    [killed] = runs_of(settings)
    assert killed.info.status == "RUNNING"  # a SIGKILLed process cannot say otherwise

    retry = run_cli(
        "train", "-v", "--processed", private["processed"], "--accelerator", "cpu", *flags, "--json", env=env
    )
    assert retry.returncode == 0, retry.stderr[-3000:]
    assert f"resuming run {killed.info.run_id}" in retry.stderr
    assert f"training on {private['train_images']} images per epoch from epoch 2" in retry.stderr
    result = json.loads(retry.stdout)
    assert result["run_id"] == killed.info.run_id and result["metrics"]["epochs"] == 4

    [run] = runs_of(settings)
    assert run.info.status == "FINISHED"
    client = tracking_client(settings)
    # Epoch 1's checkpoint survived the kill (its tag and metric may not have); 2 to 4 ran once each.
    saved_epochs = [int(m.value) for m in client.get_metric_history(run.info.run_id, "checkpoint_epoch")]
    assert saved_epochs[-3:] == [2, 3, 4] and saved_epochs.count(2) == 1


def test_sigterm_saves_the_state_and_exits_143_then_resumes(private):
    env, settings = private["env"], private["settings"]
    flags = ("--epochs", "4", "--batch-size", "16", "--architecture", "simple_cnn")
    proc = start_training(env, private["processed"], *flags)
    last = wait_for_checkpoint(private["root"], proc)
    # An epoch lasts 0.7 s on an idle machine and several seconds on a busy one: time the
    # second one, then signal a third of the way into the third, with the fourth as margin.
    epoch_length = wait_for_next_checkpoint(last, proc)
    first_step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    time.sleep(epoch_length / 3)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    assert "interrupted by SIGTERM; state saved to" in stderr.strip().splitlines()[-1]
    [run] = runs_of(settings)
    assert run.info.status == "KILLED"
    # Saved at the batch where the signal arrived, after the end-of-epoch checkpoint.
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] > first_step

    again = run_cli("train", "--processed", private["processed"], "--accelerator", "cpu", *flags, "--json", env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["run_id"] == run.info.run_id
    [run] = runs_of(settings)
    assert run.info.status == "FINISHED" and run.data.metrics["epochs"] == 4


def test_same_seed_and_config_give_the_same_metrics(prepared):
    config = TrainConfig(epochs=2, batch_size=64, accelerator="cpu")
    first = train(prepared["processed"], prepared["storage"], config, prepared["settings"])
    second = train(prepared["processed"], prepared["storage"], config, prepared["settings"], force=True)
    assert second.run_id != first.run_id
    for name in ("val_accuracy", "val_loss"):
        assert round(first.metrics[name], 4) == round(second.metrics[name], 4), name
    other = train(
        prepared["processed"],
        prepared["storage"],
        TrainConfig(epochs=2, batch_size=64, seed=7, accelerator="cpu"),
        prepared["settings"],
    )
    assert round(other.metrics["val_loss"], 4) != round(first.metrics["val_loss"], 4)


def test_two_process_ddp_on_the_cpu(private):
    env, settings = private["env"], private["settings"]
    out = run_cli(
        "train",
        "-v",
        "--processed",
        private["processed"],
        "--accelerator",
        "cpu",
        "--devices",
        "2",
        "--strategy",
        "ddp",
        *recipe_flags(),
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--num-threads",
        "1",
        "--json",
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # Each rank trains its half of the training images (DistributedSampler rounds up).
    half = math.ceil(private["train_images"] / 2)
    assert f"rank 0 of 2: training on {half} images per epoch" in out.stderr
    assert f"rank 1 of 2: training on {half} images per epoch" in out.stderr
    result = json.loads(out.stdout)
    [run] = runs_of(settings)  # only rank 0 created a run and logged to it
    assert run.info.run_id == result["run_id"] and run.info.status == "FINISHED"
    assert run.data.params["world_size"] == "2"
    assert float(run.data.params["effective_learning_rate"]) == pytest.approx(SMALL_RECIPE["learning_rate"] / 2)
    assert 0.5 < run.data.metrics["val_accuracy"] <= 1 and run.data.metrics["epochs"] == 2
    checkpoints = sorted(str(p.relative_to(private["root"])) for p in private["root"].glob("checkpoints/**/*.ckpt"))
    assert checkpoints == [f"checkpoints/{run.info.run_id}/best.ckpt", f"checkpoints/{run.info.run_id}/last.ckpt"]
    assert len(tracking_client(settings).get_metric_history(run.info.run_id, "val_accuracy")) == 2
