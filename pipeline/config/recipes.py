"""Training recipes: named sets of :class:`~pipeline.config.TrainConfig` values, chosen by the
Param and flag ``recipe``.

``default`` is the config's own defaults, tuned for final accuracy on all of Fashion-MNIST.
``quick`` is tuned for time to accuracy: it reaches ``seed_cnn``'s 10-epoch test accuracy in
less than half of ``seed_cnn``'s wall time on 2 CPU cores (``bench/train_bench.py``,
docs/BENCHMARKS.md), for fast iterations. A recipe sets only the fields it names, and a value
given for one of them wins (:func:`~pipeline.config.params.run_config_from_params`).
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pipeline.errors import ConfigError

Recipe = Literal["default", "quick"]

RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "quick": {
        # seed_cnn's network with a one-cycle schedule: 5 epochs of Adam peaking at 3e-3, no
        # augmentation (and so no test-time flip, which a network never shown mirrored images
        # gets wrong). It passes seed_cnn's 10-epoch test accuracy at its 4th epoch.
        "architecture": "seed_cnn",
        "epochs": 5,
        "batch_size": 128,
        "learning_rate": 3e-3,
        "optimizer": "adam",
        "lr_schedule": "onecycle",
        "weight_decay": 0.0,
        "label_smoothing": 0.0,
        "augment": False,
        "test_time_flip": False,
    },
}
"""The TrainConfig values of each recipe, by name."""

if tuple(RECIPES) != get_args(Recipe):
    raise TypeError(f"RECIPES names {list(RECIPES)}, the Recipe type {list(get_args(Recipe))}")


def recipe_values(name: str) -> dict[str, Any]:
    """The TrainConfig values the recipe ``name`` sets; an unknown name is a ConfigError naming
    the Param ``recipe``."""
    if name not in RECIPES:
        raise ConfigError("recipe", f"one of {list(RECIPES)}", repr(name))
    return dict(RECIPES[name])


def describe(name: str) -> str:
    """The recipe's values in words, for help texts: ``epochs=4, batch_size=256``."""
    return ", ".join(f"{key}={value}" for key, value in RECIPES[name].items())
