"""A training step in plain PyTorch: what ``ImageClassifier.training_step`` does (augmentation
aside), without Lightning. ``train_bench`` times it against our Lightning path; ``recipe_bench``
trains with it."""

from __future__ import annotations


def plain_optimizer(net, optimizer: str, learning_rate: float, weight_decay: float, steps: int):
    """The ``train`` stage's optimizer and one-cycle schedule over ``steps`` steps."""
    import torch

    from pipeline.models.classifier import make_optimizer

    optim = make_optimizer(net.parameters(), optimizer, learning_rate, weight_decay)
    return optim, torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=learning_rate, total_steps=steps)


def plain_step(net, normalise, images, labels, optimizer, schedule, precision: str, label_smoothing: float) -> None:
    """One optimizer step on a uint8 batch: forward under bf16 autocast when asked, the loss in
    fp32, backward, step, schedule step."""
    import torch
    from torch.nn import functional as F

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        logits = net(normalise(images))
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()
