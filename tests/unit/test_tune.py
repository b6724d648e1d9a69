"""The search space: candidates from a grid or a seeded random draw, bad spaces refused."""

from __future__ import annotations

import pytest

from pipeline.config import TrainConfig, TuneConfig, run_config_from_params
from pipeline.errors import ConfigError
from pipeline.tune import candidates, choose

SPACE = {"learning_rate": [0.001, 0.004], "weight_decay": [0.0, 0.0005], "augment": [True, False]}


def test_grid_tries_every_combination():
    found = candidates(TuneConfig(space=SPACE), TrainConfig())
    assert len(found) == 8 and len({tuple(sorted(c.items())) for c in found}) == 8
    assert {"learning_rate": 0.004, "weight_decay": 0.0, "augment": False} in found


def test_random_draws_distinct_combinations_reproducibly():
    config = TuneConfig(space=SPACE, method="random", trials=3, seed=1)
    first, again = candidates(config, TrainConfig()), candidates(config, TrainConfig())
    assert first == again and len(first) == 3 and len({tuple(sorted(c.items())) for c in first}) == 3
    assert candidates(TuneConfig(space=SPACE, method="random", trials=3, seed=2), TrainConfig()) != first


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"tune_space": {"devices": ["1", "2"]}}, "tune_space: expected fields among"),
        ({"tune_space": {"learning_rate": []}}, "tune_space.learning_rate: expected a non-empty list"),
        ({"tune_space": "lr=0.1"}, "tune_space: expected {"),
        ({"tune_method": "bayes"}, "tune_method: expected grid or random"),
        ({"tune_sample_cap": 10}, "tune_sample_cap: expected an integer >= 100"),
    ],
)
def test_bad_search_settings_name_the_param(params, message):
    with pytest.raises(ConfigError, match="^" + message.replace("{", r"\{").replace(".", r"\.")):
        run_config_from_params(params)


def test_a_bad_value_in_the_space_fails_before_any_trial():
    with pytest.raises(ConfigError, match="^learning_rate: expected a value in"):
        candidates(TuneConfig(space={"learning_rate": [0.001, 5.0]}), TrainConfig())


def test_choose_takes_the_best_and_the_first_of_a_tie():
    trials = [{"overrides": {"learning_rate": a}, "val_accuracy": v, "run_id": str(a)}
              for a, v in ((0.001, 0.8), (0.002, 0.9), (0.004, 0.9))]
    assert choose(trials) == {"learning_rate": 0.002}
    assert choose([]) == {}
