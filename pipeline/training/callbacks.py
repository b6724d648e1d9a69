"""The training's Lightning callbacks: one log line per epoch, and checkpoints kept in storage.

Imported only when a training runs (it imports Lightning)."""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import SIGTERMException

from pipeline.storage import Storage

log = logging.getLogger(__name__)

OnSaved = Callable[[str, str, int], None]
"""Called by rank 0 with a checkpoint's file name, its storage URI and the completed epochs."""


class EpochLog(pl.Callback):
    """One line per epoch (the progress bar is off in Airflow task logs)."""

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        # Also set here: a run resumed in the middle of an epoch starts without
        # on_train_epoch_start for it.
        self.started = time.perf_counter()
        from pipeline.training.datamodule import epoch_images

        log.info(
            "rank %d of %d: training on %d images per epoch from epoch %d",
            trainer.global_rank,
            trainer.world_size,
            epoch_images(trainer.train_dataloader),  # type: ignore[arg-type]
            trainer.current_epoch + 1,
        )

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        # Runs after the epoch's validation, so both train and val metrics are this epoch's.
        if trainer.is_global_zero:
            shown = {k: float(v) for k, v in trainer.callback_metrics.items() if k.endswith(("loss", "accuracy"))}
            log.info(
                "epoch %d/%d: %s (%.1f s)",
                trainer.current_epoch + 1,
                trainer.max_epochs,
                ", ".join(f"{k} {v:.4f}" for k, v in sorted(shown.items())),
                time.perf_counter() - self.started,
            )


class StorageCheckpoints(pl.Callback):
    """``last.ckpt`` every epoch and on SIGTERM, ``best.ckpt`` when validation accuracy
    improves; both written atomically to ``checkpoints/<run_id>/`` in ``storage`` by rank 0.

    With ``storage`` None (ranks other than 0, or a fit that owns no run) every rank still takes
    part in saving (Lightning's collective), and nothing is written."""

    def __init__(self, storage: Storage | None, run_id: str, on_saved: OnSaved | None = None) -> None:
        self.storage, self.run_id, self.on_saved = storage, run_id, on_saved
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
            if trainer.is_global_zero and self.storage is not None:
                for name in names:
                    uri = self.storage.put_file(local, f"checkpoints/{self.run_id}/{name}")
                    if self.on_saved is not None:
                        self.on_saved(name, uri, completed_epochs)

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
