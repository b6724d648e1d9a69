"""How training and tuning behave.

Each user-facing field is defined once, with its :class:`~pipeline.config.base.Setting`: the
trigger form's Params, the CLI's flags and the checks are generated from it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.config.base import check_settings, fingerprint, seed_setting, setting
from pipeline.config.settings import Accelerator, Architecture, LrSchedule, Optimizer, Precision, SearchMethod, Strategy
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class TrainConfig:
    """How the model is trained. Part of the idempotence key: same data + same config = same run.

    The defaults are the project's recipe for all of Fashion-MNIST on 2 CPU cores (see
    docs/BENCHMARKS.md). The original design's recipe is ``architecture="seed_cnn", epochs=10,
    optimizer="adam", lr_schedule="constant", augment=False, learning_rate=0.001``.
    """

    architecture: Architecture = setting(
        "resnet_deep",
        title="Network",
        help="resnet_deep: a residual CNN with batch norm in three stages of 32, 64 and 128 channels (the default); "
        "resnet_small: its first two stages; resnet_wide: resnet_small with 48 and 96 channels; "
        "resnet_large: for a GPU, two blocks per stage of 64, 128 and 256 channels; "
        "simple_cnn: two conv blocks with batch norm; "
        "seed_cnn: the original design's baseline (one 3x3 conv, 2x2 max-pool, a 128-unit dense layer).",
        section="model",
    )
    epochs: int = setting(
        15,
        title="Epochs",
        help="Number of epochs; the learning-rate schedule spans them all.",
        section="training",
        minimum=1,
        maximum=200,
    )
    # 64 rather than 128 on the CPU: the extra optimizer steps cost 10% more time per epoch and
    # gave 0.2 points more test accuracy (bench/recipe_bench.py, docs/BENCHMARKS.md).
    batch_size: int = setting(
        64,
        title="Batch size per device",
        help="Images per optimizer step on each device; on a GPU, raise it with the device's memory "
        "(the learning rate follows).",
        section="training",
        minimum=8,
        maximum=8192,
    )
    learning_rate: float = setting(
        0.1,
        title="Peak learning rate",
        help="For a global batch of 128 images; scaled linearly with the global batch (batch size x devices x nodes).",
        section="training",
        exclusive_minimum=0,
        maximum=1,
    )
    weight_decay: float = setting(
        5e-4,
        title="Weight decay",
        help="Decoupled weight decay for adamw, L2 penalty for adam and sgd.",
        section="training",
        minimum=0,
        maximum=1,
    )
    optimizer: Optimizer = setting(
        "sgd",
        title="Optimizer",
        help="adamw, adam (the original design's) or sgd (Nesterov momentum 0.9).",
        section="training",
    )
    label_smoothing: float = setting(
        0.1,
        title="Label smoothing",
        help="Share of each training label's probability spread over the other classes (0: none); "
        "validation and test losses are against the plain labels.",
        section="training",
        minimum=0,
        maximum=0.5,
    )
    lr_schedule: LrSchedule = setting(
        "onecycle",
        title="Learning-rate schedule",
        help="onecycle (warm-up, then cosine decay to about 0 over all epochs), cosine or constant.",
        section="training",
    )
    # Both keep the label of every Fashion-MNIST class; vertical flips and rotations would not.
    augment: bool = setting(
        True,
        title="Augment",
        help="Random crop (zero padding of 2 pixels) and horizontal flip of training images.",
        section="training",
    )
    test_time_flip: bool = setting(
        True,
        title="Test-time flip",
        help="Predict (in validation, evaluation and serving) the mean of the class probabilities "
        "of the image and of its mirror image: a second forward pass per prediction.",
        section="model",
    )
    early_stopping_patience: int = setting(
        0,
        title="Early stopping patience",
        help="Epochs without validation-loss improvement before training stops; 0 turns early stopping off "
        "(a one-cycle schedule needs its whole run).",
        section="training",
        minimum=0,
        maximum=500,
    )
    seed: int = seed_setting()
    accelerator: Accelerator = setting(
        "auto",
        title="Accelerator",
        help="Lightning accelerator: auto takes a GPU when there is one, cpu forces the CPU.",
        section="hardware",
    )
    devices: str = setting(
        "auto",
        title="Devices per node",
        help="Lightning devices: auto, a count (2) or a list of device ids (0,1).",
        section="hardware",
        pattern=r"auto|-1|\d+|\d+(,\d+)+",
        expected="auto, a count or a comma-separated list of device ids",
    )
    num_nodes: int = setting(
        1,
        title="Nodes",
        help="Machines taking part in one training (each runs devices processes).",
        section="hardware",
        minimum=1,
        maximum=1024,
    )
    strategy: Strategy = setting(
        "auto",
        title="Distributed strategy",
        help="auto, ddp (one process per device; the default for several devices) or ddp_spawn.",
        section="hardware",
    )
    precision: Precision = setting(
        "auto",
        title="Precision",
        help="auto: bf16 mixed precision on a GPU that supports it or on a CPU that multiplies bf16 in hardware "
        "(Intel AMX), else 32-bit.",
        section="hardware",
    )
    compile: bool = setting(
        False,
        title="torch.compile the network",
        help="Compile the network for training (pays off on a GPU for long runs).",
        section="hardware",
    )
    num_threads: int = setting(
        0,
        title="CPU threads",
        help="CPU threads for torch; 0: the CPUs this process may use (affinity and cgroup quota, so a container "
        "limited to 2 CPUs does not start one thread per host core).",
        section="hardware",
        minimum=0,
        maximum=1024,
    )

    def __post_init__(self) -> None:
        check_settings(self)

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

    enabled: bool = setting(
        False,
        title="Tune first",
        help="Try candidate training configs on a sample (one mapped task each, MLflow child runs) "
        "and train with the best.",
        section="tuning",
        param="tune",
    )
    space: dict[str, list[Any]] = setting(
        default_factory=lambda: {"learning_rate": [0.05, 0.1, 0.2], "weight_decay": [0.0001, 0.0005]},
        title="Search space",
        help=f"{{field: [values to try]}} over {', '.join(TUNABLE)}.",
        section="tuning",
        param="tune_space",
        metavar="JSON",
        expected='{"field": [values, ...]} with at least one field',
    )
    method: SearchMethod = setting(
        "grid",
        title="Search method",
        help="grid (every combination) or random (trials distinct combinations).",
        section="tuning",
        param="tune_method",
    )
    trials: int = setting(
        4,
        title="Random search: trials",
        help="How many combinations random search draws (grid tries them all).",
        section="tuning",
        param="tune_trials",
        minimum=1,
        maximum=256,
    )
    sample_cap: int = setting(
        6000,
        title="Images per trial",
        help="Training (and test) images per trial, a stratified sample of the processed data.",
        section="tuning",
        param="tune_sample_cap",
        minimum=100,
    )
    trial_epochs: int = setting(
        3,
        title="Epochs per trial",
        help="Epochs per trial (the schedule is compressed into them).",
        section="tuning",
        param="tune_epochs",
        minimum=1,
        maximum=200,
    )
    seed: int = seed_setting()

    def __post_init__(self) -> None:
        if not isinstance(self.space, Mapping) or not self.space:
            raise ConfigError("tune_space", '{"field": [values, ...]} with at least one field', repr(self.space))
        for name, values in self.space.items():
            if name not in TUNABLE:
                raise ConfigError("tune_space", f"fields among {list(TUNABLE)}", repr(name))
            if not isinstance(values, Sequence) or isinstance(values, str) or not values:
                raise ConfigError(f"tune_space.{name}", "a non-empty list of values", repr(values))
        check_settings(self)

    def fingerprint(self) -> str:
        return fingerprint(self)
