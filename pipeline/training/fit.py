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
global rank 0 talks to MLflow and writes to storage; the other ranks train their shard. The fit
itself, which every rank runs, is :func:`pipeline.training.trainer.fit`.

Idempotent: unless ``force``, a finished run with the same processed data and training config
is reused instead of training again.

Returns a :class:`~pipeline.refs.TrainResult`.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import Settings, TrainConfig
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
from pipeline.training.hardware import is_global_rank_zero, trains_on_gpu
from pipeline.training.launcher import ENV_RESUME, ENV_RUN
from pipeline.training.trainer import fit

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)


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
    from pipeline.training.calibration import calibrate
    from pipeline.training.callbacks import StorageCheckpoints

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
            os.environ[ENV_RUN], os.environ[ENV_RESUME] = run_id, str(resume_from or "")

            def on_saved(name: str, uri: str, epoch: int) -> None:
                if name == "last.ckpt":
                    client.set_tag(run_id, TAG_LAST_CHECKPOINT, uri)
                    client.log_metric(run_id, "checkpoint_epoch", epoch, step=epoch)

            trainer, module = fit(
                processed,
                storage,
                config,
                settings,
                run_id=run_id,
                workdir=workdir,
                resume_from=resume_from,
                owner=True,
                on_saved=on_saved,
            )
        best = next(cb for cb in trainer.callbacks if isinstance(cb, StorageCheckpoints))
        checkpoint_uri = storage.uri(f"checkpoints/{run_id}/best.ckpt")
        temperature = calibrate(processed, storage, run_id, "cuda" if trains_on_gpu(config) else "cpu")
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
        os.environ.pop(ENV_RUN, None)
        os.environ.pop(ENV_RESUME, None)
    log.info(
        "run %s: val_accuracy %.4f (best, epoch %d) after %d epochs",
        run_id,
        metrics["val_accuracy"],
        best.best_epoch,
        metrics["epochs"],
    )
    return TrainResult(
        run_id=run_id,
        checkpoint_uri=checkpoint_uri,
        processed_hash=processed.processed_hash,
        dataset_hash=processed.dataset_hash,
        config_hash=lineage[TAG_CONFIG],
        metrics=metrics,
    )


def _last_key(run_id: str) -> str:
    return f"checkpoints/{run_id}/last.ckpt"


def _resumable_run(client: MlflowClient, experiment: str, lineage: dict[str, str], storage: Storage) -> Any | None:
    """The newest unfinished run of this data and config whose epoch checkpoint is in storage.

    Storage, not the run's tag, says whether there is a checkpoint: a process killed between
    writing the checkpoint and tagging the run has still saved its epoch."""
    return next(
        (
            run
            for run in find_unfinished_runs(client, experiment, lineage)
            if storage.exists(_last_key(run.info.run_id))
        ),
        None,
    )


def _train_other_rank(
    processed: ProcessedDatasetRef, storage: Storage, config: TrainConfig, settings: Settings, lineage: dict[str, str]
) -> TrainResult:
    """A rank other than 0: train its shard; no MLflow run, no storage writes."""
    with tempfile.TemporaryDirectory(prefix="train-") as workdir:
        if ENV_RUN in os.environ:  # launched by rank 0 on this node, which says what to resume
            run_id, resume = os.environ[ENV_RUN], os.environ[ENV_RESUME]
            resume_from = Path(resume) if resume else None
        else:  # another node: find the run rank 0 resumes (or start fresh, as it does)
            client = tracking_client(settings)
            resumable = _resumable_run(client, experiment_id(client, settings), lineage, storage)
            run_id, resume_from = "", None
            if resumable is not None:
                run_id, resume_from = resumable.info.run_id, Path(workdir) / "resume.ckpt"
                resume_from.write_bytes(storage.get_bytes(_last_key(run_id)))
        fit(processed, storage, config, settings, run_id=run_id, workdir=workdir, resume_from=resume_from, owner=False)
    return TrainResult(
        run_id=run_id,
        checkpoint_uri="",
        processed_hash=processed.processed_hash,
        dataset_hash=processed.dataset_hash,
        config_hash=lineage[TAG_CONFIG],
        metrics={},
    )


def load_train_result(settings: Settings, run_id: str) -> TrainResult:
    """Rebuild a finished training's reference from its MLflow run (for CLI subcommands)."""
    from mlflow.exceptions import MlflowException

    try:
        run = tracking_client(settings).get_run(run_id)
    except MlflowException as exc:
        raise ReferenceNotFoundError("--run-id", f"a run in {settings.tracking_uri}", repr(run_id)) from exc
    if TAG_CHECKPOINT not in run.data.tags:
        raise ReferenceNotFoundError(
            "--run-id", "a finished training run with a checkpoint", f"run {run_id} ({run.info.status})"
        )
    return _result_from_run(run, reused=True)
