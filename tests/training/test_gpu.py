"""The CUDA branch of training, where a GPU exists (skipped, with the reason shown, elsewhere).

On a GPU the ``train`` stage resolves ``auto`` to the CUDA device and, where it supports bf16, to
bf16 mixed precision; it fits there, calibrates there, and the checkpoint it leaves loads on a
CPU and predicts what the GPU-trained module predicts."""

from __future__ import annotations

import pytest
import torch
from recipes import SMALL_RECIPE

from pipeline.config import TrainConfig
from pipeline.models.classifier import load_checkpoint
from pipeline.training.fit import train
from pipeline.training.hardware import resolve_precision, trains_on_gpu

pytestmark = [pytest.mark.requires_gpu, pytest.mark.slow]


def test_training_runs_on_the_gpu_and_its_checkpoint_serves_on_a_cpu(small_processed, settings, storage):
    config = TrainConfig(**SMALL_RECIPE, epochs=1, batch_size=256)
    assert trains_on_gpu(config)
    assert resolve_precision(config) == ("bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true")

    result = train(small_processed.processed, storage, config, settings)

    assert result.metrics["val_accuracy"] > 0.5
    model = load_checkpoint(str(storage.local_path(f"checkpoints/{result.run_id}/best.ckpt")))
    assert next(model.parameters()).device.type == "cpu"
    assert 0.05 < model.hparams["temperature"] < 20  # fitted on the validation split, on the GPU
    images = torch.randint(0, 256, (16, 28, 28), dtype=torch.uint8)
    with torch.inference_mode():
        on_cpu = model(images).softmax(1)
        on_gpu = model.cuda()(images.cuda()).softmax(1).cpu()
    assert torch.allclose(on_cpu, on_gpu, atol=1e-3)
