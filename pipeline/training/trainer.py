"""The Lightning fit of a training config on the processed splits, as every rank of the ``train``
stage (:mod:`pipeline.training.fit`) runs it, and bench/gpu_bench.py too: the LightningModule with
its network, the data module, the callbacks and the Trainer, the learning rate scaled to the
global batch.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import REFERENCE_BATCH, Settings, TrainConfig
from pipeline.refs import ProcessedDatasetRef
from pipeline.storage import Storage
from pipeline.training.hardware import resolve_precision, trains_on_gpu, usable_cpus, world_size

if TYPE_CHECKING:
    from pipeline.training.callbacks import OnSaved


def fit(
    processed: ProcessedDatasetRef,
    storage: Storage,
    config: TrainConfig,
    settings: Settings,
    *,
    run_id: str,
    workdir: str,
    resume_from: Path | None = None,
    owner: bool,
    on_saved: OnSaved | None = None,
    extra_callbacks: Sequence[Any] = (),
) -> tuple[Any, Any]:
    """Build the module, data and Trainer and fit ``config`` on ``processed``; returns the
    Trainer and the trained module.

    The ``owner`` of the MLflow run ``run_id`` (global rank 0 of :func:`train`) logs to it and
    writes checkpoints to ``checkpoints/<run_id>/`` in ``storage``, calling ``on_saved`` after
    each. Other ranks, and fits that own no run (bench/gpu_bench.py), do neither.
    ``extra_callbacks`` go to the Trainer too."""
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor
    from pytorch_lightning.loggers import MLFlowLogger

    from pipeline.models.classifier import ImageClassifier
    from pipeline.models.networks import build_network
    from pipeline.training.callbacks import EpochLog, StorageCheckpoints
    from pipeline.training.datamodule import ProcessedDataModule

    torch.set_num_threads(config.num_threads or usable_cpus())
    pl.seed_everything(config.seed, workers=True, verbose=False)
    world = world_size(config)
    # Linear scaling rule: the configured rate is for a global batch of REFERENCE_BATCH images.
    learning_rate = config.learning_rate * config.batch_size * world / REFERENCE_BATCH
    logger: Any = False
    if owner:
        logger = MLFlowLogger(
            experiment_name=settings.experiment_name, tracking_uri=settings.tracking_uri, run_id=run_id
        )
        if resume_from is None:
            logger.log_hyperparams(
                {
                    **dataclasses.asdict(config),
                    "world_size": world,
                    "effective_learning_rate": learning_rate,
                    "effective_precision": resolve_precision(config),
                    **{f"data_{k}": v for k, v in processed.counts.items()},
                }
            )
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
        in_channels=processed.image_shape[0],
        image_size=list(processed.image_shape[1:]),
        net=build_network(
            config.architecture, len(processed.classes), processed.image_shape[0], processed.image_shape[1:]
        ),
    )
    data = ProcessedDataModule(processed, storage, config.batch_size, config.seed)
    callbacks = [EpochLog(), StorageCheckpoints(storage if owner else None, run_id, on_saved), *extra_callbacks]
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
        precision=resolve_precision(config),  # type: ignore[arg-type]  # one of PRECISIONS, checked by TrainConfig
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
