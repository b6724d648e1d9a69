"""Temperature scaling: one scalar that makes the predicted probabilities honest, fitted on the
validation split after training and kept in the best checkpoint."""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path

import torch
from torch.nn import functional as F

from pipeline.refs import ProcessedDatasetRef
from pipeline.storage import Storage

log = logging.getLogger(__name__)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature ``T`` that minimises the negative log-likelihood of ``softmax(logits / T)``
    on held-out ``labels`` (temperature scaling, Guo et al. 2017). One scalar for all classes:
    every prediction keeps its class and only its confidence moves. Label smoothing and flip
    averaging leave the default recipe underconfident (``T`` below 1 sharpens).

    The likelihood is unimodal in ``log T``, so a golden-section search over [0.05, 20] finds the
    minimum to about 1e-4, deterministically and without gradients."""
    logits, labels = logits.detach().double(), labels.long()

    def nll(log_t: float) -> float:
        return F.cross_entropy(logits / math.exp(log_t), labels).item()

    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    low, high = math.log(0.05), math.log(20.0)
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    nll_a, nll_b = nll(a), nll(b)
    while high - low > 1e-5:
        if nll_a < nll_b:
            high, b, nll_b = b, a, nll_a
            a = high - ratio * (high - low)
            nll_a = nll(a)
        else:
            low, a, nll_a = a, b, nll_b
            b = low + ratio * (high - low)
            nll_b = nll(b)
    return round(math.exp((low + high) / 2.0), 4)


def calibrate(processed: ProcessedDatasetRef, storage: Storage, run_id: str, device: str) -> float:
    """Fit the temperature of ``best.ckpt``'s predictions on the validation split and write it
    into that checkpoint's hyperparameters, so that evaluation, registration and serving all
    use it (:func:`fit_temperature`). Rewritten whole through storage, so a
    reader sees the old checkpoint or the new one."""
    import io

    import torch

    from pipeline.models.classifier import classifier_from_checkpoint
    from pipeline.training.datamodule import eval_batch_size, split_tensors

    key = f"checkpoints/{run_id}/best.ckpt"
    checkpoint = torch.load(io.BytesIO(storage.get_bytes(key)), map_location="cpu", weights_only=True)
    # Temperature 1 for the logits to fit on, also when a rerun finds the checkpoint calibrated.
    model = classifier_from_checkpoint(checkpoint, temperature=1.0).to(device)
    val = split_tensors(processed, storage, "val")
    step = 2 * eval_batch_size(processed.image_shape)
    with torch.inference_mode():
        logits = torch.cat([model(val.images[i : i + step].to(device)).cpu() for i in range(0, len(val), step)])
    temperature = fit_temperature(logits, val.labels)
    checkpoint["hyper_parameters"]["temperature"] = temperature
    with tempfile.TemporaryDirectory(prefix="calibrate-") as tmp:
        local = Path(tmp) / "best.ckpt"
        torch.save(checkpoint, local)
        storage.put_file(local, key)
    log.info("temperature %.4f (fitted on %d validation images)", temperature, len(val))
    return temperature
