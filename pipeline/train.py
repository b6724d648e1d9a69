"""Train: fit a CNN on the processed splits with PyTorch Lightning, tracked in MLflow.

One MLflow run per training: parameters, per-epoch metrics (``train_loss``, ``val_loss``,
``val_accuracy``) and lineage tags (dataset and processed-data hashes, config hash, code
version). The best checkpoint (by validation accuracy) is stored under
``checkpoints/<run_id>/best.ckpt``. Early stopping watches the validation loss. On a GPU the
Trainer uses bf16 mixed precision; on the CPU, 32-bit.

Idempotent: unless ``force``, a finished run with the same processed data and training config
is reused instead of training again.

Returns a :class:`~pipeline.refs.TrainResult`.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import tempfile
from pathlib import Path

from pipeline.config import Settings, TrainConfig
from pipeline.errors import ReferenceNotFoundError
from pipeline.refs import ProcessedDatasetRef, TrainResult
from pipeline.storage import Storage
from pipeline.tracking import (
    TAG_CHECKPOINT,
    TAG_CODE,
    TAG_CONFIG,
    TAG_DATASET,
    TAG_PROCESSED,
    code_version,
    experiment_id,
    find_finished_run,
    tracking_client,
)

log = logging.getLogger(__name__)


def _precision(accelerator: str) -> str:
    import torch

    gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if gpu and torch.cuda.is_bf16_supported() else "32-true"


def _epoch_logger() -> object:
    """A callback that logs one line per epoch (the progress bar is off in Airflow task logs)."""
    import pytorch_lightning as pl

    class EpochLog(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            # Runs after the epoch's validation, so both train and val metrics are this epoch's.
            shown = {k: float(v) for k, v in trainer.callback_metrics.items() if k.endswith(("loss", "accuracy"))}
            log.info("epoch %d/%d: %s", trainer.current_epoch + 1, trainer.max_epochs,
                     ", ".join(f"{k} {v:.4f}" for k, v in sorted(shown.items())))

    return EpochLog()


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
    """Train (or reuse) a model on ``processed``; ``tags`` are added to the MLflow run."""
    client = tracking_client(settings)
    experiment = experiment_id(client, settings)
    lineage = {
        TAG_DATASET: processed.dataset_hash,
        TAG_PROCESSED: processed.processed_hash,
        TAG_CONFIG: config.fingerprint(),
    }
    if not force:
        previous = find_finished_run(client, experiment, lineage)
        if previous is not None and TAG_CHECKPOINT in previous.data.tags:
            log.info("reusing run %s (same data and config; force retrains)", previous.info.run_id)
            return _result_from_run(previous, reused=True)

    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
    from pytorch_lightning.loggers import MLFlowLogger

    from pipeline.data import ProcessedDataModule
    from pipeline.models import ImageClassifier

    run = client.create_run(
        experiment,
        run_name=f"train-{config.architecture}-{processed.processed_hash[:8]}",
        tags={**lineage, TAG_CODE: code_version(), **(tags or {})},
    )
    run_id = run.info.run_id
    try:
        pl.seed_everything(config.seed, workers=True, verbose=False)
        logger = MLFlowLogger(
            experiment_name=settings.experiment_name, tracking_uri=settings.tracking_uri, run_id=run_id
        )
        logger.log_hyperparams({**dataclasses.asdict(config), **{f"data_{k}": v for k, v in processed.counts.items()}})
        model = ImageClassifier(
            architecture=config.architecture,
            learning_rate=config.learning_rate,
            weight_decay=config.weight_decay,
            mean=processed.mean,
            std=processed.std,
            num_classes=len(processed.classes),
        )
        data = ProcessedDataModule(processed, storage, config.batch_size, config.seed)
        with tempfile.TemporaryDirectory(prefix="train-") as workdir:
            checkpoint = ModelCheckpoint(
                dirpath=workdir, filename="best", monitor="val_accuracy", mode="max", save_top_k=1
            )
            trainer = pl.Trainer(
                max_epochs=config.epochs,
                accelerator=config.accelerator,
                devices="auto",
                precision=_precision(config.accelerator),
                logger=logger,
                callbacks=[
                    checkpoint,
                    EarlyStopping(monitor="val_loss", patience=config.early_stopping_patience),
                    _epoch_logger(),
                ],
                deterministic="warn",
                enable_progress_bar=sys.stderr.isatty(),
                enable_model_summary=False,
                log_every_n_steps=50,
                default_root_dir=workdir,
            )
            trainer.fit(model, datamodule=data)
            checkpoint_uri = storage.put_file(Path(checkpoint.best_model_path), f"checkpoints/{run_id}/best.ckpt")
        metrics = {
            "val_accuracy": float(checkpoint.best_model_score),
            "val_loss": float(trainer.callback_metrics["val_loss"]),
            "epochs": float(trainer.current_epoch),
        }
        client.log_metric(run_id, "epochs", metrics["epochs"])
        client.log_metric(run_id, "best_val_accuracy", metrics["val_accuracy"])
        client.set_tag(run_id, TAG_CHECKPOINT, checkpoint_uri)
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    log.info("run %s: val_accuracy %.4f after %d epochs", run_id, metrics["val_accuracy"], metrics["epochs"])
    return TrainResult(
        run_id=run_id,
        checkpoint_uri=checkpoint_uri,
        processed_hash=processed.processed_hash,
        dataset_hash=processed.dataset_hash,
        config_hash=lineage[TAG_CONFIG],
        metrics=metrics,
    )


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
