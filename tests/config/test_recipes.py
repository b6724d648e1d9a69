"""Training recipes: ``recipe`` sets the training settings it names, a value given for one of them
wins (any flag on the command line; a changed field in the trigger form), and an unknown name is
one line naming the Param, the recipes there are and the name found."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.config import RunConfig, Settings, TrainConfig, run_config_from_params, run_params
from pipeline.config.recipes import RECIPES, recipe_values
from pipeline.entrypoints.cli import build_parser, main
from pipeline.entrypoints.flags import params_of
from pipeline.errors import ConfigError
from pipeline.training.launcher import train_command

SETTINGS = Settings.from_env({})
QUICK = RECIPES["quick"]


def form_defaults() -> dict:
    """What a DAG run's Params hold when nobody changed the trigger form."""
    return {p.name: p.param_default for p in run_params()}


def from_cli(*flags: str) -> RunConfig:
    return run_config_from_params(params_of(build_parser().parse_args(["train", "--processed", "h", *flags])), SETTINGS)


def test_every_recipe_is_a_valid_training_config_and_default_is_the_defaults():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, values in RECIPES.items():
        assert set(values) <= fields, name
        TrainConfig(**values)
    assert RECIPES["default"] == {}
    assert from_cli().train == TrainConfig() and from_cli().recipe == "default"


def test_quick_sets_its_values_from_the_cli_the_params_and_the_form():
    quick = TrainConfig(**QUICK)
    assert quick != TrainConfig()
    assert from_cli("--recipe", "quick").train == quick
    assert run_config_from_params({"recipe": "quick"}, SETTINGS).train == quick
    via_form = run_config_from_params({**form_defaults(), "recipe": "quick"}, SETTINGS, form=True)
    assert via_form.train == quick and via_form.recipe == "quick"


def test_a_value_given_wins_over_the_recipe():
    epochs = QUICK["epochs"] + 3
    config = from_cli("--recipe", "quick", "--epochs", str(epochs), "--seed", "7")
    assert config.train == TrainConfig(**{**QUICK, "epochs": epochs, "seed": 7})
    # On the command line a flag given wins even at the default recipe's value.
    default_epochs = TrainConfig().epochs
    assert from_cli("--recipe", "quick", "--epochs", str(default_epochs)).train.epochs == default_epochs
    # In the trigger form a field changed from its default wins; one left at it takes the recipe's.
    changed = {**form_defaults(), "recipe": "quick", "architecture": "simple_cnn"}
    assert run_config_from_params(changed, SETTINGS, form=True).train == TrainConfig(
        **{**QUICK, "architecture": "simple_cnn"}
    )


@pytest.mark.parametrize("params", [{"recipe": "fast"}, {**form_defaults(), "recipe": "fast"}])
def test_an_unknown_recipe_is_one_line_naming_the_param_the_recipes_and_the_value(params):
    with pytest.raises(ConfigError) as info:
        run_config_from_params(params, SETTINGS, form=True)
    assert str(info.value) == "recipe: expected one of ['default', 'quick'], found 'fast'"
    assert recipe_values("quick") == QUICK
    with pytest.raises(ConfigError):
        RunConfig(recipe="fast")  # type: ignore[arg-type]


@pytest.mark.parametrize("command", ["train", "run"])
def test_the_cli_refuses_an_unknown_recipe_with_exit_2(command, capsys):
    argv = [command, "--recipe", "fast"] + (["--processed", "h"] if command == "train" else [])
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert "--recipe: invalid choice: 'fast'" in error and "default" in error and "quick" in error


def test_a_launched_training_trains_the_recipe_it_was_given():
    # Lightning's launcher re-runs the command line: it carries the resolved values, not the name.
    config = from_cli("--recipe", "quick", "--epochs", "1").train
    args = build_parser().parse_args(train_command("h", config)[1:])
    assert run_config_from_params(params_of(args), SETTINGS).train == config
