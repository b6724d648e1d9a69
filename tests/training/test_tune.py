"""The search space: candidates from a grid or a seeded random draw, bad spaces refused."""

from __future__ import annotations

import json
import re

import pytest
from recipes import recipe_flags

from pipeline.config import TrainConfig, TuneConfig, run_config_from_params
from pipeline.errors import ConfigError
from pipeline.training.tune import candidates, choose

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
        ({"tune_method": "bayes"}, "tune_method: expected one of ['grid', 'random']"),
        ({"tune_sample_cap": 10}, "tune_sample_cap: expected an integer >= 100"),
    ],
)
def test_bad_search_settings_name_the_param(params, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        run_config_from_params(params)


def test_a_bad_value_in_the_space_fails_before_any_trial():
    with pytest.raises(ConfigError, match="^learning_rate: expected a number in"):
        candidates(TuneConfig(space={"learning_rate": [0.001, 5.0]}), TrainConfig())


def test_choose_takes_the_best_and_the_first_of_a_tie():
    trials = [
        {"overrides": {"learning_rate": a}, "val_accuracy": v, "run_id": str(a)}
        for a, v in ((0.001, 0.8), (0.002, 0.9), (0.004, 0.9))
    ]
    assert choose(trials) == {"learning_rate": 0.002}
    assert choose([]) == {}


@pytest.mark.slow
def test_pipeline_run_tunes_on_a_sample_then_trains_with_the_best_trial(small_dataset, settings, capsys):
    from pipeline.entrypoints.cli import main
    from pipeline.tracking import tracking_client

    # A learning rate of 1e-7 learns nothing in one epoch: the search must pick 0.002 (not the default
    # 0.004). One epoch at 0.002 reaches about 0.45, hence the low gate floor.
    argv = [
        "run",
        "--source",
        str(small_dataset),
        *recipe_flags(),
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--gate-min-accuracy",
        "0.3",
        "--tune",
        "--tune-space",
        '{"learning_rate": [1e-7, 0.002]}',
        "--tune-sample-cap",
        "500",
        "--tune-epochs",
        "1",
        "--json",
    ]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)

    assert result["tune"] == {"overrides": {"learning_rate": 0.002}}
    client = tracking_client(settings)
    trained = client.get_run(result["train"]["run_id"])
    assert float(trained.data.params["learning_rate"]) == 0.002 and result["register"]["version"]
    trials = client.search_runs([trained.info.experiment_id], filter_string="tags.`pipeline.tune_trial` = 'true'")
    parents = {run.data.tags["mlflow.parentRunId"] for run in trials}
    assert len(trials) == 2 and len(parents) == 1
    study = client.get_run(parents.pop())
    assert study.data.metrics["best_val_accuracy"] == max(run.data.metrics["val_accuracy"] for run in trials)

    # The same data and search again: the study and its trials are found, nothing is retrained.
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["train"]["run_id"] == result["train"]["run_id"] and again["train"]["reused"]
    assert (
        len(client.search_runs([trained.info.experiment_id], filter_string="tags.`pipeline.tune_trial` = 'true'")) == 2
    )
