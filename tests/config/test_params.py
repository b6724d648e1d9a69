"""One definition per setting: the DAG Params, the CLI flags and the checks all come from the
config fields, so the trigger form, the command line and a scheduled run cannot disagree."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import Param
from airflow.sdk.exceptions import ParamValidationError

from pipeline.config import SECTIONS, RunConfig, RunParam, Settings, run_config_from_params, run_params
from pipeline.config.params import COMPONENTS, command_line
from pipeline.entrypoints.cli import build_parser
from pipeline.entrypoints.flags import params_of
from pipeline.errors import ConfigError

DAGS = Path(__file__).resolve().parents[2] / "dags"
SETTINGS = Settings.from_env({"PIPELINE_SOURCE_URI": "/data/from-settings"})


def form() -> dict[str, Param]:
    sys.path.insert(0, str(DAGS))
    try:
        from _common import run_params_form
    finally:
        sys.path.remove(str(DAGS))
    return run_params_form()


def other_value(param: RunParam) -> Any:
    """A valid value of ``param`` that is not its default."""
    kind, s = param.kind, param.setting
    if kind.base is bool:
        return not param.default
    if kind.choices:
        return next(c for c in kind.choices if c != param.default)
    if param.name == "tune_space":
        return {"architecture": ["seed_cnn", "simple_cnn"]}
    if param.name == "expected_sha256":
        return {"t10k-labels-idx1-ubyte.gz": "ab" * 32}
    if param.name == "devices":
        return "0,1"
    if param.name == "dataset_name":
        return "digits-v2"
    if kind.base is str:
        return "/data/somewhere"
    if kind.base is int:
        return int(s.maximum) if s.maximum is not None else int(s.minimum or 0) + 1000
    return s.maximum if s.maximum != param.default else s.minimum


def configured(config: RunConfig, param: RunParam) -> list[Any]:
    return [getattr(config if c == "run" else getattr(config, c), name) for c, name in param.targets]


def run_parser_actions() -> dict[str, Any]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {action.dest: action for action in sub.choices["run"]._actions}


def test_every_stage_config_field_is_a_setting():
    for component, cls in COMPONENTS.items():
        for f in dataclasses.fields(cls):
            if component == "run" and f.name in COMPONENTS:
                continue  # RunConfig's stage configs
            assert "setting" in f.metadata, f"{cls.__name__}.{f.name} has no Setting: no Param or flag sets it"


def test_every_param_is_a_run_flag_with_the_same_choices_and_no_default_of_its_own():
    actions = run_parser_actions()
    for param in run_params():
        action = actions.get(param.name)
        assert action is not None, f"pipeline run has no flag for {param.name}"
        assert action.option_strings[0] == param.flag and action.default is None
        assert tuple(action.choices or ()) == param.kind.choices, param.name
        assert param.setting.help.split(";")[0][:40] in action.help, param.name


def test_no_flag_and_the_form_defaults_give_the_config_defaults():
    expected = RunConfig(acquire=dataclasses.replace(RunConfig().acquire, source_uri="/data/from-settings"))
    args = build_parser().parse_args(["run"])
    assert run_config_from_params(params_of(args), SETTINGS) == expected
    assert run_config_from_params({n: p.value for n, p in form().items()}, SETTINGS) == expected
    assert run_config_from_params({}, SETTINGS) == expected


@pytest.mark.parametrize("param", run_params(), ids=lambda p: p.name)
def test_each_setting_reaches_its_fields_the_same_way_from_a_flag_and_from_a_param(param):
    value = other_value(param)
    from_flag = build_parser().parse_args(["run", *command_line({param.name: value}, [param])])
    via_cli = run_config_from_params(params_of(from_flag), SETTINGS)
    via_form = run_config_from_params({param.name: form()[param.name].resolve(value)}, SETTINGS)
    assert via_cli == via_form
    assert configured(via_cli, param) == [value] * len(param.targets)


@pytest.mark.parametrize("param", run_params(), ids=lambda p: p.name)
def test_the_form_has_the_config_default_choices_and_section(param):
    field = form()[param.name]
    assert field.value == param.param_default
    assert field.schema["section"] == SECTIONS[param.setting.section]
    assert field.schema.get("enum", []) == list(param.kind.choices)
    assert field.schema["title"] == param.setting.title and field.description == param.setting.help
    if param.setting.from_settings:  # empty in the form: the operator's setting decides
        assert configured(run_config_from_params({param.name: None}, SETTINGS), param) == ["/data/from-settings"]
    else:
        assert configured(run_config_from_params({}, SETTINGS), param) == [param.default] * len(param.targets)


def bound_cases() -> list[tuple[RunParam, Any, bool]]:
    cases = []
    for param in run_params():
        s, step = param.setting, (1 if param.kind.base is int else 1e-6)
        if s.minimum is not None:
            cases += [(param, s.minimum, True), (param, s.minimum - step, False)]
        if s.exclusive_minimum is not None:
            cases += [(param, s.exclusive_minimum + step, True), (param, s.exclusive_minimum, False)]
        if s.maximum is not None:
            cases += [(param, s.maximum, True), (param, s.maximum + step, False)]
        for choice in param.kind.choices:
            cases.append((param, choice, True))
        if param.kind.choices:
            cases.append((param, "not-a-choice", False))
    cases.append((next(p for p in run_params() if p.name == "devices"), "two", False))
    return cases


@pytest.mark.parametrize(
    ("param", "value", "valid"), bound_cases(), ids=lambda v: v.name if isinstance(v, RunParam) else repr(v)
)
def test_the_form_and_the_config_accept_and_refuse_the_same_values(param, value, valid):
    if param.kind.base is int:
        value = int(value)
    try:
        form()[param.name].resolve(value)
        form_accepts = True
    except ParamValidationError:
        form_accepts = False
    try:
        run_config_from_params({param.name: value}, SETTINGS)
        config_accepts = True
    except ConfigError as exc:
        assert str(exc).startswith(f"{param.name}: expected "), str(exc)
        config_accepts = False
    assert (form_accepts, config_accepts) == (valid, valid)


def test_a_setting_defined_twice_must_agree():
    seed = next(p for p in run_params() if p.name == "seed")
    assert {c for c, _ in seed.targets} == {"acquire", "preprocess", "train", "tune"}
    config = run_config_from_params({"seed": 7}, SETTINGS)
    assert config.acquire.seed == config.preprocess.seed == config.train.seed == config.tune.seed == 7


def test_help_is_plain_text():
    for param in run_params():
        assert "``" not in param.setting.help and ":class:" not in param.setting.help, param.name
    assert "``" not in build_parser().format_help()


def test_the_configuration_doc_shows_the_generated_params_table():
    from pipeline.entrypoints.flags import BEGIN, END, params_table

    doc = (DAGS.parent / "docs" / "configuration.md").read_text()
    assert BEGIN + params_table() + END in doc, "docs/configuration.md is stale: run make docs"
    assert all(f"| `{p.name}` |" in params_table() for p in run_params())
