"""How training and tuning behave."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.config.base import check_range, fingerprint
from pipeline.config.settings import ACCELERATORS, ARCHITECTURES, LR_SCHEDULES, OPTIMIZERS, PRECISIONS, STRATEGIES
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class TrainConfig:
    """How the model is trained. Part of the idempotence key: same data + same config = same run.

    The defaults are the project's recipe for all of Fashion-MNIST on 2 CPU cores (see
    docs/BENCHMARKS.md). The original design's recipe is ``architecture="seed_cnn", epochs=10,
    optimizer="adam", lr_schedule="constant", augment=False, learning_rate=0.001``.
    """

    architecture: str = "resnet_deep"
    """``resnet_deep`` (a residual CNN with batch norm, stages of 32, 64 and 128 channels at
    14x14, 7x7 and 4x4; the default), ``resnet_small`` (its first two stages), ``resnet_wide``
    (``resnet_small`` with 48 and 96 channels), ``resnet_large`` (for a GPU: two blocks per stage
    of 64, 128 and 256 channels at 28x28, 14x14 and 7x7), ``simple_cnn`` (two conv blocks with
    batch norm) or ``seed_cnn`` (the original design: one 3x3 conv with 32 filters, 2x2 max-pool, 128-unit
    dense layer)."""

    epochs: int = 15
    """Number of epochs (the learning-rate schedule spans them all)."""

    batch_size: int = 64
    """Images per optimizer step on each device. 64 rather than 128 on the CPU: the smaller
    batch's extra optimizer steps cost 10% more time per epoch and gave 0.2 points more
    flip-averaged test accuracy in two plain-loop runs (bench/recipe_bench.py,
    docs/BENCHMARKS.md). On a GPU, raise it with the device's memory; ``learning_rate`` follows."""

    learning_rate: float = 0.1
    """Peak learning rate for a global batch of 128 images; scaled linearly with the global
    batch (``batch_size`` x devices x nodes), so a larger batch on a GPU keeps the recipe."""

    weight_decay: float = 5e-4
    """Decoupled weight decay for ``adamw``, L2 penalty for ``adam`` and ``sgd``."""

    optimizer: str = "sgd"
    """``adamw``, ``adam`` (the original design's) or ``sgd`` (Nesterov momentum 0.9)."""

    label_smoothing: float = 0.1
    """Share of each training label's probability spread over the other classes (0: none).
    Validation and test losses are always against the plain labels."""

    lr_schedule: str = "onecycle"
    """``onecycle`` (warm-up, then cosine decay to ~0 over all epochs), ``cosine`` or ``constant``."""

    augment: bool = True
    """Random crop (zero padding of 2 pixels) and horizontal flip of training images. Both keep
    the label of every Fashion-MNIST class; vertical flips and rotations would not."""

    test_time_flip: bool = True
    """Predict (in validation, evaluation and the served model) the mean of the class
    probabilities for the image and for its mirror image. Costs a second forward pass per
    prediction; added 0.3 points of test accuracy to the default recipe (docs/BENCHMARKS.md)."""

    early_stopping_patience: int = 0
    """Epochs without validation-loss improvement before training stops; 0 turns early
    stopping off (a one-cycle schedule needs its whole run)."""

    seed: int = 42
    """Seed for weights, shuffling, augmentation and dropout: same seed and config give the
    same metrics on CPU."""

    accelerator: str = "auto"
    """Lightning accelerator: ``auto`` takes a GPU when there is one, ``cpu`` forces the CPU."""

    devices: str = "auto"
    """Lightning ``devices``: ``auto``, a count (``"2"``) or a list of ids (``"0,1"``)."""

    num_nodes: int = 1
    """Machines taking part in one training (each runs ``devices`` processes)."""

    strategy: str = "auto"
    """``auto``, ``ddp`` (one process per device; the default for several devices) or
    ``ddp_spawn``."""

    precision: str = "auto"
    """``auto`` is bf16 mixed precision on a GPU that supports it or on a CPU that multiplies
    bf16 in hardware (Intel AMX), else 32-bit."""

    compile: bool = False
    """``torch.compile`` the network for training (pays off on a GPU for long runs)."""

    num_threads: int = 0
    """CPU threads for torch; 0 means the CPUs this process may use (affinity and cgroup
    quota, so a container limited to 2 CPUs does not start one thread per host core)."""

    def __post_init__(self) -> None:
        for name, allowed in (
            ("architecture", ARCHITECTURES),
            ("optimizer", OPTIMIZERS),
            ("accelerator", ACCELERATORS),
            ("lr_schedule", LR_SCHEDULES),
            ("strategy", STRATEGIES),
            ("precision", PRECISIONS),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(name, f"one of {list(allowed)}", repr(getattr(self, name)))
        if not re.fullmatch(r"auto|-1|\d+|\d+(,\d+)+", str(self.devices)):
            raise ConfigError("devices", "auto, a count or a comma-separated list of device ids", repr(self.devices))
        # The same bounds as the DAG's Params, so the CLI accepts what the trigger form accepts.
        check_range("epochs", self.epochs, 1, 200)
        check_range("batch_size", self.batch_size, 8, 8192)
        check_range("learning_rate", self.learning_rate, 1e-7, 1.0)
        check_range("weight_decay", self.weight_decay, 0.0, 1.0)
        check_range("label_smoothing", self.label_smoothing, 0.0, 0.5)
        check_range("early_stopping_patience", self.early_stopping_patience, 0, 500)
        check_range("num_nodes", self.num_nodes, 1, 1024)
        check_range("num_threads", self.num_threads, 0, 1024)

    def fingerprint(self) -> str:
        return fingerprint(self)

    def trainer_devices(self) -> int | str | list[int]:
        """``devices`` as Lightning takes it."""
        if self.devices == "auto":
            return "auto"
        if "," in self.devices:
            return [int(d) for d in self.devices.split(",")]
        return int(self.devices)


#: TrainConfig fields a search may vary: what changes the model, not where or how fast it runs.
TUNABLE = (
    "architecture",
    "batch_size",
    "learning_rate",
    "weight_decay",
    "optimizer",
    "label_smoothing",
    "lr_schedule",
    "augment",
    "test_time_flip",
)


@dataclass(frozen=True)
class TuneConfig:
    """A hyperparameter search. Off unless ``enabled``."""

    enabled: bool = False
    """Run the search before the full training (DAG Param ``tune``)."""

    space: dict[str, list[Any]] = field(
        default_factory=lambda: {"learning_rate": [0.05, 0.1, 0.2], "weight_decay": [0.0001, 0.0005]}
    )
    """``{TrainConfig field: [values to try]}``; fields outside :data:`TUNABLE` are refused."""

    method: str = "grid"
    """``grid`` (every combination) or ``random`` (``trials`` distinct combinations)."""

    trials: int = 4
    """How many combinations ``random`` draws (``grid`` tries them all)."""

    sample_cap: int = 6000
    """Training (and test) images per trial, a stratified sample of the processed data."""

    trial_epochs: int = 3
    """Epochs per trial (the schedule is compressed into them)."""

    seed: int = 42

    def __post_init__(self) -> None:
        if self.method not in ("grid", "random"):
            raise ConfigError("tune_method", "grid or random", repr(self.method))
        if not isinstance(self.space, Mapping) or not self.space:
            raise ConfigError("tune_space", '{"field": [values, ...]} with at least one field', repr(self.space))
        for name, values in self.space.items():
            if name not in TUNABLE:
                raise ConfigError("tune_space", f"fields among {list(TUNABLE)}", repr(name))
            if not isinstance(values, Sequence) or isinstance(values, str) or not values:
                raise ConfigError(f"tune_space.{name}", "a non-empty list of values", repr(values))
        if not 1 <= self.trials <= 256:
            raise ConfigError("tune_trials", "an integer in [1, 256]", repr(self.trials))
        if self.sample_cap < 100:
            raise ConfigError("tune_sample_cap", "an integer >= 100", repr(self.sample_cap))
        if not 1 <= self.trial_epochs <= 200:
            raise ConfigError("tune_epochs", "an integer in [1, 200]", repr(self.trial_epochs))

    def fingerprint(self) -> str:
        return fingerprint(self)
