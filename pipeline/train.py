"""Train: fit a CNN on the processed splits with PyTorch Lightning, tracked in MLflow.

One MLflow run per training: parameters, per-epoch metrics (``train_loss``, ``val_loss``,
``val_accuracy``, ``lr``) and lineage tags (dataset and processed-data hashes, config hash,
code version). The best checkpoint (by validation accuracy) ends up under
``checkpoints/<run_id>/best.ckpt``, with the temperature that calibrates its probabilities,
fitted on the validation split after the last epoch (metric ``temperature``).

Fault tolerance: after every epoch (and when the process gets SIGTERM, as Airflow sends on a
timeout or when a task is marked failed) the full training state is written atomically to
``checkpoints/<run_id>/last.ckpt`` and the run is tagged with it. A rerun with the same data and
config (an Airflow retry, or ``pipeline train`` again) finds that unfinished run, downloads the
checkpoint and continues the same MLflow run from the next epoch, so the run ends with the
configured number of epochs in total. Checkpoints are read with ``weights_only=True``.

Scale: ``devices``, ``num_nodes`` and ``strategy`` go to Lightning's Trainer. Under DDP only
global rank 0 talks to MLflow and writes to storage; the other ranks train their shard.

Idempotent: unless ``force``, a finished run with the same processed data and training config
is reused instead of training again.

Returns a :class:`~pipeline.refs.TrainResult`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.config import REFERENCE_BATCH, Settings, TrainConfig
from pipeline.errors import ReferenceNotFoundError, TrainingInterruptedError
from pipeline.refs import ProcessedDatasetRef, TrainResult
from pipeline.storage import Storage
from pipeline.tracking import (
    TAG_CHECKPOINT,
    TAG_CODE,
    TAG_CONFIG,
    TAG_DATASET,
    TAG_LAST_CHECKPOINT,
    TAG_PROCESSED,
    code_version,
    experiment_id,
    find_finished_run,
    find_unfinished_runs,
    tracking_client,
)

log = logging.getLogger(__name__)

# Set by global rank 0 before Lightning launches the other local ranks (they inherit the
# environment): the run to join and the checkpoint to resume from ("" for a fresh start).
_ENV_RUN = "PIPELINE_TRAIN_RUN_ID"
_ENV_RESUME = "PIPELINE_TRAIN_RESUME_FROM"


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


def needs_launcher(config: TrainConfig) -> bool:
    """Whether this training starts several processes through Lightning's script launcher
    (DDP over several devices or nodes), which re-runs the current command line."""
    return world_size(config) > 1 and config.strategy in ("auto", "ddp")


def train_command(
    processed_hash: str, config: TrainConfig, *, force: bool = False, tags: dict[str, str] | None = None
) -> list[str]:
    """The ``pipeline train`` command line that trains ``config`` on ``processed_hash``."""
    command = [str(Path(sys.executable).parent / "pipeline"), "train", "--processed", processed_hash, "--json"]
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        flag = "--" + field.name.replace("_", "-")
        if isinstance(value, bool):
            command.append(flag if value else "--no-" + flag[2:])
        else:
            command += [flag, str(value)]
    command += ["--force"] if force else []
    for key, value in (tags or {}).items():
        command += ["--tag", f"{key}={value}"]
    return command


def _callbacks(storage: Storage | None, run_id: str, on_saved: Any) -> list[Any]:
    """The per-epoch log line and the storage checkpoints (both defined here so that Lightning
    is imported only when a training actually runs)."""
    import pytorch_lightning as pl
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    class EpochLog(pl.Callback):
        """One line per epoch (the progress bar is off in Airflow task logs)."""

        def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            # Also set here: a run resumed in the middle of an epoch starts without
            # on_train_epoch_start for it.
            self.started = time.perf_counter()
            sampler = trainer.train_dataloader.sampler.sampler
            log.info("rank %d of %d: training on %d images per epoch from epoch %d",
                     trainer.global_rank, trainer.world_size, sampler.num_samples, trainer.current_epoch + 1)

        def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            self.started = time.perf_counter()

        def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            # Runs after the epoch's validation, so both train and val metrics are this epoch's.
            if trainer.is_global_zero:
                shown = {k: float(v) for k, v in trainer.callback_metrics.items() if k.endswith(("loss", "accuracy"))}
                log.info("epoch %d/%d: %s (%.1f s)", trainer.current_epoch + 1, trainer.max_epochs,
                         ", ".join(f"{k} {v:.4f}" for k, v in sorted(shown.items())),
                         time.perf_counter() - self.started)

    class StorageCheckpoints(pl.Callback):
        """``last.ckpt`` every epoch and on SIGTERM, ``best.ckpt`` when validation accuracy
        improves; both written atomically to storage by rank 0."""

        def __init__(self) -> None:
            self.best = -math.inf
            self.best_epoch = 0

        def state_dict(self) -> dict[str, Any]:
            return {"best": self.best, "best_epoch": self.best_epoch}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.best, self.best_epoch = state["best"], state["best_epoch"]

        def _save(self, trainer: pl.Trainer, names: list[str], completed_epochs: int) -> None:
            with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
                local = Path(tmp) / "state.ckpt"
                trainer.save_checkpoint(local, weights_only=False)  # all ranks call it; rank 0 writes
                if trainer.is_global_zero and storage is not None:
                    for name in names:
                        uri = storage.put_file(local, f"checkpoints/{run_id}/{name}")
                        on_saved(name, uri, completed_epochs)

        def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            accuracy = float(trainer.callback_metrics.get("val_accuracy", math.nan))
            names = ["last.ckpt"]
            if accuracy > self.best:
                self.best, self.best_epoch = accuracy, trainer.current_epoch + 1
                names.append("best.ckpt")
            self._save(trainer, names, trainer.current_epoch + 1)

        def on_exception(self, trainer: pl.Trainer, module: pl.LightningModule, exception: BaseException) -> None:
            if isinstance(exception, SIGTERMException):
                # Raised at a batch boundary, so the state is consistent: resuming continues
                # this epoch with its remaining batches.
                log.warning("SIGTERM: saving the training state before exiting")
                self._save(trainer, ["last.ckpt"], trainer.current_epoch)

    return [EpochLog(), StorageCheckpoints()]


def _result_from_run(run: object, reused: bool) -> TrainResult:
    tags, metrics = run.data.tags, run.data.metrics  # type: ignore[attr-defined]
    return TrainResult(
        run_id=run.info.run_id,  # type: ignore[attr-defined]
        checkpoint_uri=tags[TAG_CHECKPOINT],
        processed_hash=tags[TAG_PROCESSED],
        dataset_hash=tags[TAG_DATASET],
        config_hash=tags[TAG_CONFIG],
        # The best checkpoint's score, as a fresh training reports it (val_accuracy is the last epoch's).
        metrics={
            "val_accuracy": float(metrics.get("best_val_accuracy", metrics.get("val_accuracy", float("nan")))),
            **{k: float(metrics[k]) for k in ("val_loss", "epochs") if k in metrics},
        },
        reused=reused,
    )


def train(
    processed: ProcessedDatasetRef,
    storage: Storage,
    config: TrainConfig,
    settings: Settings,
    *,
    force: bool = False,
    tags: dict[str, str] | None = None,
) -> TrainResult:
    """Train (reuse, or resume) a model on ``processed``; ``tags`` are added to the MLflow run."""
    lineage = {
        TAG_DATASET: processed.dataset_hash,
        TAG_PROCESSED: processed.processed_hash,
        TAG_CONFIG: config.fingerprint(),
    }
    if not is_global_rank_zero():
        return _train_other_rank(processed, storage, config, settings, lineage)

    client = tracking_client(settings)
    experiment = experiment_id(client, settings)
    if not force:
        previous = find_finished_run(client, experiment, lineage)
        if previous is not None and TAG_CHECKPOINT in previous.data.tags:
            log.info("reusing run %s (same data and config; force retrains)", previous.info.run_id)
            return _result_from_run(previous, reused=True)

    resumable = _resumable_run(client, experiment, lineage, storage)
    if resumable is not None:
        run_id = resumable.info.run_id
        client.update_run(run_id, status="RUNNING")
        log.info("resuming run %s from %s", run_id, storage.uri(_last_key(run_id)))
    else:
        run = client.create_run(
            experiment,
            run_name=f"train-{config.architecture}-{processed.processed_hash[:8]}",
            tags={**lineage, TAG_CODE: code_version(), **(tags or {})},
        )
        run_id = run.info.run_id
    try:
        with tempfile.TemporaryDirectory(prefix="train-") as workdir:
            resume_from = None
            if resumable is not None:
                resume_from = Path(workdir) / "resume.ckpt"
                resume_from.write_bytes(storage.get_bytes(_last_key(run_id)))
            # Local ranks that Lightning launches inherit these and join this run.
            os.environ[_ENV_RUN], os.environ[_ENV_RESUME] = run_id, str(resume_from or "")

            def on_saved(name: str, uri: str, epoch: int) -> None:
                if name == "last.ckpt":
                    client.set_tag(run_id, TAG_LAST_CHECKPOINT, uri)
                    client.log_metric(run_id, "checkpoint_epoch", epoch, step=epoch)

            trainer, module = _fit(processed, storage, config, settings, run_id, workdir, resume_from, on_saved)
        best = next(cb for cb in trainer.callbacks if type(cb).__name__ == "StorageCheckpoints")
        checkpoint_uri = storage.uri(f"checkpoints/{run_id}/best.ckpt")
        temperature = _calibrate(processed, storage, run_id, "cuda" if trains_on_gpu(config) else "cpu")
        metrics = {
            "val_accuracy": float(best.best),
            # Absent when a resumed run had already saved its last epoch (nothing left to fit).
            "val_loss": float(trainer.callback_metrics.get("val_loss", math.nan)),
            "epochs": float(trainer.current_epoch),
        }
        client.log_metric(run_id, "epochs", metrics["epochs"])
        client.log_metric(run_id, "best_val_accuracy", metrics["val_accuracy"])
        client.log_metric(run_id, "best_epoch", best.best_epoch)
        client.log_metric(run_id, "temperature", temperature)
        client.set_tag(run_id, TAG_CHECKPOINT, checkpoint_uri)
        client.set_terminated(run_id, "FINISHED")
    except BaseException as exc:
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        if isinstance(exc, SIGTERMException):
            client.set_terminated(run_id, "KILLED")
            raise TrainingInterruptedError(run_id, storage.uri(_last_key(run_id))) from exc
        client.set_terminated(run_id, "FAILED")
        raise
    finally:
        os.environ.pop(_ENV_RUN, None)
        os.environ.pop(_ENV_RESUME, None)
    log.info("run %s: val_accuracy %.4f (best, epoch %d) after %d epochs",
             run_id, metrics["val_accuracy"], best.best_epoch, metrics["epochs"])
    return TrainResult(
        run_id=run_id,
        checkpoint_uri=checkpoint_uri,
        processed_hash=processed.processed_hash,
        dataset_hash=processed.dataset_hash,
        config_hash=lineage[TAG_CONFIG],
        metrics=metrics,
    )


def _calibrate(processed: ProcessedDatasetRef, storage: Storage, run_id: str, device: str) -> float:
    """Fit the temperature of ``best.ckpt``'s predictions on the validation split and write it
    into that checkpoint's hyperparameters, so that evaluation, registration and serving all
    use it (:func:`pipeline.models.fit_temperature`). Rewritten whole through storage, so a
    reader sees the old checkpoint or the new one."""
    import io

    import torch

    from pipeline.data import split_tensors
    from pipeline.models import classifier_from_checkpoint, fit_temperature

    key = f"checkpoints/{run_id}/best.ckpt"
    checkpoint = torch.load(io.BytesIO(storage.get_bytes(key)), map_location="cpu", weights_only=True)
    # Temperature 1 for the logits to fit on, also when a rerun finds the checkpoint calibrated.
    model = classifier_from_checkpoint(checkpoint, temperature=1.0).to(device)
    val = split_tensors(processed, storage, "val")
    with torch.inference_mode():
        logits = torch.cat([model(val.images[i : i + 2048].to(device)).cpu() for i in range(0, len(val), 2048)])
    temperature = fit_temperature(logits, val.labels)
    checkpoint["hyper_parameters"]["temperature"] = temperature
    with tempfile.TemporaryDirectory(prefix="calibrate-") as tmp:
        local = Path(tmp) / "best.ckpt"
        torch.save(checkpoint, local)
        storage.put_file(local, key)
    log.info("temperature %.4f (fitted on %d validation images)", temperature, len(val))
    return temperature


def _last_key(run_id: str) -> str:
    return f"checkpoints/{run_id}/last.ckpt"


def _resumable_run(client: Any, experiment: str, lineage: dict[str, str], storage: Storage) -> Any | None:
    """The newest unfinished run of this data and config whose epoch checkpoint is in storage.

    Storage, not the run's tag, says whether there is a checkpoint: a process killed between
    writing the checkpoint and tagging the run has still saved its epoch."""
    return next((run for run in find_unfinished_runs(client, experiment, lineage)
                 if storage.exists(_last_key(run.info.run_id))), None)


def _train_other_rank(
    processed: ProcessedDatasetRef, storage: Storage, config: TrainConfig, settings: Settings, lineage: dict[str, str]
) -> TrainResult:
    """A rank other than 0: train its shard; no MLflow run, no storage writes."""
    with tempfile.TemporaryDirectory(prefix="train-") as workdir:
        if _ENV_RUN in os.environ:  # launched by rank 0 on this node, which says what to resume
            run_id, resume = os.environ[_ENV_RUN], os.environ[_ENV_RESUME]
            resume_from = Path(resume) if resume else None
        else:  # another node: find the run rank 0 resumes (or start fresh, as it does)
            client = tracking_client(settings)
            resumable = _resumable_run(client, experiment_id(client, settings), lineage, storage)
            run_id, resume_from = "", None
            if resumable is not None:
                run_id, resume_from = resumable.info.run_id, Path(workdir) / "resume.ckpt"
                resume_from.write_bytes(storage.get_bytes(_last_key(run_id)))
        _fit(processed, storage, config, settings, run_id, workdir, resume_from, None)
    return TrainResult(run_id=run_id, checkpoint_uri="", processed_hash=processed.processed_hash,
                       dataset_hash=processed.dataset_hash, config_hash=lineage[TAG_CONFIG], metrics={})


def _fit(
    processed: ProcessedDatasetRef,
    storage: Storage,
    config: TrainConfig,
    settings: Settings,
    run_id: str,
    workdir: str,
    resume_from: Path | None,
    on_saved: Any,
    extra_callbacks: Sequence[Any] = (),
) -> tuple[Any, Any]:
    """Build the module, data and Trainer and fit. ``on_saved`` is None on ranks other than 0,
    which then neither log nor write to storage (nor does bench/gpu_bench.py, which fits
    without MLflow); ``extra_callbacks`` go to the Trainer too."""
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor
    from pytorch_lightning.loggers import MLFlowLogger

    from pipeline.data import ProcessedDataModule
    from pipeline.models import ImageClassifier

    torch.set_num_threads(config.num_threads or usable_cpus())
    pl.seed_everything(config.seed, workers=True, verbose=False)
    world = world_size(config)
    # Linear scaling rule: the configured rate is for a global batch of REFERENCE_BATCH images.
    learning_rate = config.learning_rate * config.batch_size * world / REFERENCE_BATCH
    owner = on_saved is not None
    logger: Any = False
    if owner:
        logger = MLFlowLogger(
            experiment_name=settings.experiment_name, tracking_uri=settings.tracking_uri, run_id=run_id
        )
        if resume_from is None:
            logger.log_hyperparams({
                **dataclasses.asdict(config),
                "world_size": world,
                "effective_learning_rate": learning_rate,
                "effective_precision": resolve_precision(config),
                **{f"data_{k}": v for k, v in processed.counts.items()},
            })
    model = ImageClassifier(
        architecture=config.architecture,
        learning_rate=learning_rate,
        weight_decay=config.weight_decay,
        optimizer=config.optimizer,
        lr_schedule=config.lr_schedule,
        augment=config.augment,
        label_smoothing=config.label_smoothing,
        test_time_flip=config.test_time_flip,
        mean=processed.mean,
        std=processed.std,
        num_classes=len(processed.classes),
        compile=config.compile,
    )
    data = ProcessedDataModule(processed, storage, config.batch_size, config.seed)
    callbacks = [*_callbacks(storage if owner else None, run_id, on_saved), *extra_callbacks]
    if config.early_stopping_patience:
        callbacks.append(EarlyStopping(monitor="val_loss", patience=config.early_stopping_patience))
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    gpu = trains_on_gpu(config)
    trainer = pl.Trainer(
        max_epochs=config.epochs,
        accelerator=config.accelerator,
        devices=config.trainer_devices(),
        num_nodes=config.num_nodes,
        strategy=config.strategy,
        precision=resolve_precision(config),
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,  # StorageCheckpoints does it, to storage
        use_distributed_sampler=False,  # ProcessedDataModule shards the training set itself
        # Same seed, same metrics on the CPU. On a GPU, speed instead: deterministic kernels
        # and no cuDNN autotuning would make the convolutions slower.
        deterministic=False if gpu else "warn",
        benchmark=True if gpu else None,
        enable_progress_bar=sys.stderr.isatty(),
        enable_model_summary=False,
        log_every_n_steps=50,
        default_root_dir=workdir,
    )
    trainer.fit(model, datamodule=data, ckpt_path=resume_from, weights_only=True)
    return trainer, model


def load_train_result(settings: Settings, run_id: str) -> TrainResult:
    """Rebuild a finished training's reference from its MLflow run (for CLI subcommands)."""
    from mlflow.exceptions import MlflowException

    try:
        run = tracking_client(settings).get_run(run_id)
    except MlflowException as exc:
        raise ReferenceNotFoundError("--run-id", f"a run in {settings.tracking_uri}", repr(run_id)) from exc
    if TAG_CHECKPOINT not in run.data.tags:
        raise ReferenceNotFoundError("--run-id", "a finished training run with a checkpoint", f"run {run_id} ({run.info.status})")
    return _result_from_run(run, reused=True)
