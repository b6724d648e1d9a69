"""The networks, the augmentation and the training settings, without training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import ARCHITECTURES, TrainConfig, run_config_from_params
from pipeline.errors import ConfigError
from pipeline.evaluation.evaluate import predict
from pipeline.models.classifier import ImageClassifier, random_crop_flip
from pipeline.models.export import export_for_serving
from pipeline.models.networks import build_network
from pipeline.training.calibration import fit_temperature
from pipeline.training.hardware import (
    cpu_has_bf16_matmul,
    is_global_rank_zero,
    resolve_precision,
    trains_on_gpu,
    usable_cpus,
    world_size,
)


def test_seed_cnn_is_the_original_design():
    # One 3x3 convolution with 32 filters, 2x2 max-pooling, a 128-unit dense layer, 10 classes.
    net = build_network("seed_cnn")
    layers = [m for m in net if not isinstance(m, (nn.ReLU, nn.Flatten))]
    conv, pool, dense, out = layers
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding) == (1, 32, (3, 3), (0, 0))
    assert isinstance(pool, nn.MaxPool2d) and pool.kernel_size == 2
    assert (dense.in_features, dense.out_features) == (32 * 13 * 13, 128)
    assert (out.in_features, out.out_features) == (128, 10)
    assert sum(p.numel() for p in net.parameters()) == 693_962


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_network_maps_uint8_images_to_logits(architecture):
    model = ImageClassifier(architecture=architecture, mean=0.29, std=0.35).eval()
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    with torch.inference_mode():
        logits = model(images)
    assert logits.shape == (5, 10) and torch.isfinite(logits).all()


def test_resnet_small_has_residual_blocks_and_batch_norm():
    net = build_network("resnet_small")
    names = {type(m).__name__ for m in net.modules()}
    assert {"ResidualBlock", "BatchNorm2d", "AdaptiveAvgPool2d"} <= names


def test_residual_networks_have_their_stages_widths_and_resolutions():
    def widths(architecture):
        return [m.out_channels for m in build_network(architecture).modules() if isinstance(m, nn.Conv2d)]

    assert widths("resnet_small") == [32, 32, 32, 64, 64, 64]
    assert widths("resnet_wide") == [48, 48, 48, 96, 96, 96]
    assert widths("resnet_deep") == [32, 32, 32, 64, 64, 64, 128, 128, 128]
    # resnet_deep's third stage works at 4x4: the feature map its classifier pools.
    features = build_network("resnet_deep")[:-3](torch.zeros(1, 1, 28, 28))
    assert features.shape == (1, 128, 4, 4)
    # resnet_large keeps 28x28 through its first stage (no max-pool), two blocks per stage.
    assert widths("resnet_large") == [64] * 5 + [128] * 5 + [256] * 5
    large = build_network("resnet_large")
    assert not any(isinstance(m, nn.MaxPool2d) for m in large.modules())
    assert large[:-3](torch.zeros(1, 1, 28, 28)).shape == (1, 256, 7, 7)
    # Checkpoints of the two-stage networks written before the stage table keep their keys.
    assert "4.body.0.weight" in build_network("resnet_small").state_dict()
    assert "11.weight" in build_network("resnet_wide").state_dict()


def test_test_time_flip_predicts_the_mean_of_the_image_and_its_mirror_offline_and_served():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8)
    model = ImageClassifier(architecture="resnet_small", test_time_flip=True, mean=0.29, std=0.35).eval()
    with torch.inference_mode():
        plain, mirrored = (torch.softmax(model.net(model.normalise(x)), 1) for x in (images, images.flip(-1)))
    averaged = predict(model, images.numpy())
    assert np.allclose(averaged, ((plain + mirrored) / 2).numpy(), atol=1e-6)
    assert not np.allclose(averaged, plain.numpy(), atol=1e-3)
    # An image and its mirror get the same answer; the served module (what register logs)
    # gives the offline answer.
    assert np.allclose(predict(model, images.flip(-1).numpy()), averaged, atol=1e-6)
    served = export_for_serving(model)
    with torch.inference_mode():
        assert np.allclose(served(images[:, None].float() / 255.0).numpy(), averaged, atol=1e-6)
    # Training steps see the plain network (in train mode, batch statistics, on both sides).
    with torch.no_grad():
        assert torch.equal(model.train()(images), model.net(model.normalise(images)))
    # Without the setting, predictions are the plain network's.
    model = ImageClassifier(architecture="resnet_small", test_time_flip=False, mean=0.29, std=0.35).eval()
    with torch.inference_mode():
        assert np.allclose(predict(model, images.numpy()), torch.softmax(model.net(model.normalise(images)), 1).numpy())


def test_fitted_temperature_undoes_a_known_scaling_of_the_logits():
    # Labels drawn from softmax(z) are calibrated for z; logits z * s are not, and the fit finds
    # T = s (within sampling error), whether the model is under- (s < 1) or over-confident.
    generator = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(20_000, 10, generator=generator)
    labels = torch.multinomial(torch.softmax(z, 1), 1, generator=generator).squeeze(1)
    for scale in (0.4, 1.0, 2.5):
        assert fit_temperature(z * scale, labels) == pytest.approx(scale, rel=0.05)


def test_temperature_changes_confidence_not_the_answer_offline_and_served():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (8, 28, 28), dtype=torch.uint8)
    plain = ImageClassifier(architecture="resnet_small", test_time_flip=True, mean=0.29, std=0.35).eval()
    scaled = ImageClassifier(architecture="resnet_small", test_time_flip=True, mean=0.29, std=0.35, temperature=0.5)
    scaled.load_state_dict(plain.state_dict())
    scaled.eval()
    probabilities, base = predict(scaled, images.numpy()), predict(plain, images.numpy())
    # softmax(logits / 0.5) is p ** 2 renormalised, for p = softmax(logits).
    assert np.allclose(probabilities, base**2 / (base**2).sum(1, keepdims=True), atol=1e-5)
    assert (probabilities.argmax(1) == base.argmax(1)).all()
    assert probabilities.max(1).mean() > base.max(1).mean()  # T < 1 sharpens
    with torch.inference_mode():
        assert np.allclose(
            export_for_serving(scaled)(images[:, None].float() / 255.0).numpy(), probabilities, atol=1e-6
        )
    # Training steps ignore it: the fit happens after training, on the validation split.
    with torch.no_grad():
        assert torch.equal(scaled.train()(images), scaled.net(scaled.normalise(images)))


def test_auto_precision_is_bf16_on_a_cpu_with_amx_and_32_bit_without(monkeypatch):
    assert resolve_precision(TrainConfig(accelerator="cpu")) == ("bf16-mixed" if cpu_has_bf16_matmul() else "32-true")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert resolve_precision(TrainConfig(accelerator="cpu")) == "bf16-mixed"
    assert resolve_precision(TrainConfig(accelerator="cpu", precision="32-true")) == "32-true"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert resolve_precision(TrainConfig(accelerator="cpu")) == "32-true"
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert resolve_precision(TrainConfig(accelerator="cpu")) == "32-true"


def test_a_gpu_is_used_when_there_is_one_unless_the_cpu_is_asked_for(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert trains_on_gpu(TrainConfig()) and trains_on_gpu(TrainConfig(accelerator="gpu"))
    assert resolve_precision(TrainConfig()) == "bf16-mixed"
    assert not trains_on_gpu(TrainConfig(accelerator="cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not trains_on_gpu(TrainConfig())


def test_crop_and_flip_give_shifted_copies_of_each_image():
    torch.manual_seed(0)
    images = torch.randint(1, 256, (64, 28, 28), dtype=torch.uint8)
    out = random_crop_flip(images, padding=2)
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = nn.functional.pad(images, (2, 2, 2, 2))
    flipped = 0
    for i in range(len(images)):
        candidates = [
            (padded[i, dy : dy + 28, dx : dx + 28], flip)
            for dy in range(5)
            for dx in range(5)
            for flip in (False, True)
        ]
        matches = [flip for crop, flip in candidates if torch.equal(out[i], crop.flip(-1) if flip else crop)]
        assert matches, f"image {i} is not a crop of its padded original"
        flipped += all(matches)
    assert 10 < flipped < 54  # about half are mirrored
    assert not torch.equal(out, images)


def test_learning_rate_schedules_reach_the_optimizer():
    for schedule in ("onecycle", "cosine"):
        model = ImageClassifier(lr_schedule=schedule, learning_rate=0.01)
        model.trainer = type("T", (), {"estimated_stepping_batches": 100})()
        config = model.configure_optimizers()
        assert config["lr_scheduler"]["interval"] == "step"
    model = ImageClassifier(lr_schedule="constant", optimizer="adam", learning_rate=0.01)
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.param_groups[0]["lr"] == 0.01


def test_sgd_and_label_smoothing_reach_the_training_step():
    config = run_config_from_params({"optimizer": "sgd", "label_smoothing": 0.1, "learning_rate": 0.1}).train
    model = ImageClassifier(
        optimizer=config.optimizer,
        label_smoothing=config.label_smoothing,
        learning_rate=config.learning_rate,
        lr_schedule="constant",
        augment=False,
    )
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["nesterov"] and optimizer.param_groups[0]["momentum"] == 0.9
    # The training loss is against smoothed labels (augmentation is off, so the step sees these images).
    torch.manual_seed(0)
    images, labels = torch.randint(0, 256, (8, 28, 28), dtype=torch.uint8), torch.arange(8)
    model.trainer = type("T", (), {"num_training_batches": 10})()
    with torch.no_grad():
        logits = model(images)
    smoothed = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    plain = torch.nn.functional.cross_entropy(logits, labels)
    loss = model.training_step((images, labels), 0).item()
    assert loss == pytest.approx(smoothed.item(), rel=1e-5) and abs(loss - plain.item()) > 1e-3


def test_training_settings_from_params_name_the_bad_field():
    config = run_config_from_params({"devices": "2", "strategy": "ddp", "num_nodes": 2, "augment": False}).train
    assert config.trainer_devices() == 2 and world_size(config) == 4 and config.augment is False
    assert TrainConfig(devices="0,1").trainer_devices() == [0, 1]
    for params, field in (
        ({"devices": "two"}, "devices"),
        ({"strategy": "horovod"}, "strategy"),
        ({"lr_schedule": "step"}, "lr_schedule"),
        ({"augment": "yes"}, "augment"),
        ({"test_time_flip": "no"}, "test_time_flip"),
        ({"precision": "fp8"}, "precision"),
        ({"num_nodes": 0}, "num_nodes"),
        ({"label_smoothing": 0.9}, "label_smoothing"),
        ({"optimizer": "lion"}, "optimizer"),
    ):
        with pytest.raises(ConfigError, match=f"^{field}: expected "):
            run_config_from_params(params)


def test_rank_zero_is_read_from_the_launchers_environment(monkeypatch):
    for name in ("RANK", "NODE_RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert is_global_rank_zero()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not is_global_rank_zero()
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("NODE_RANK", "1")
    assert not is_global_rank_zero()
    monkeypatch.setenv("RANK", "0")  # torchrun's global rank wins
    assert is_global_rank_zero()


def test_usable_cpus_respects_the_affinity():
    import os

    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))


def test_the_launcher_command_carries_the_whole_config():
    # Several devices from an Airflow task: `pipeline train` in a subprocess must train exactly
    # the config the task was given.
    from pipeline.config import run_config_from_params
    from pipeline.entrypoints.cli import build_parser
    from pipeline.entrypoints.flags import params_of
    from pipeline.training.launcher import needs_launcher, train_command

    config = TrainConfig(
        architecture="seed_cnn",
        augment=False,
        compile=True,
        devices="0,1",
        strategy="ddp",
        learning_rate=0.01,
        num_threads=3,
    )
    assert needs_launcher(config) and not needs_launcher(TrainConfig(devices="1"))
    assert not needs_launcher(TrainConfig(devices="2", strategy="ddp_spawn"))
    command = train_command("abc123", config, force=True, tags={"airflow.run_id": "manual__1"})
    args = build_parser().parse_args(command[1:])
    assert args.processed == "abc123" and args.force and args.json and args.tag == ["airflow.run_id=manual__1"]
    assert run_config_from_params(params_of(args)).train == config


def test_the_module_defaults_are_the_training_recipe_and_a_given_network_is_the_one_trained():
    import dataclasses

    from pipeline.config import TrainConfig

    recipe = dataclasses.asdict(TrainConfig())
    hparams = ImageClassifier().hparams
    shared = set(hparams) & set(recipe)
    assert {"architecture", "learning_rate", "optimizer", "augment", "label_smoothing", "test_time_flip"} <= shared
    assert {name: hparams[name] for name in shared} == {name: recipe[name] for name in shared}

    net = build_network("simple_cnn", 10)
    model = ImageClassifier(architecture="simple_cnn", net=net)
    assert model.net is net and "net" not in model.hparams
