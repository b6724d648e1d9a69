"""A run's DAG Params and CLI flags, generated from the config fields' :class:`Setting`\\ s, and
the one conversion of Param or flag values into a :class:`RunConfig`.

``dags/_common.py`` turns :func:`run_params` into Airflow ``Param``\\ s, the CLI into argparse
flags, ``pipeline train``'s launcher into a command line: nothing repeats a field's default,
bounds, choices or help. Importing this imports only the config package (DAG parsing stays cheap).
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.config.base import SECTIONS, FieldKind, Setting, expectation, field_default, setting_fields
from pipeline.config.data import AcquireConfig, PreprocessConfig
from pipeline.config.gate import GatePolicy
from pipeline.config.recipes import recipe_values
from pipeline.config.run import RunConfig
from pipeline.config.settings import Settings
from pipeline.config.training import TrainConfig, TuneConfig
from pipeline.errors import ConfigError

#: The stage configs of a :class:`RunConfig`, by attribute; ``"run"`` is RunConfig's own fields.
#: In this order within each form section (``train`` first: the shared ``seed`` is a training Param).
COMPONENTS: dict[str, type] = {
    "acquire": AcquireConfig,
    "train": TrainConfig,
    "preprocess": PreprocessConfig,
    "tune": TuneConfig,
    "gate": GatePolicy,
    "run": RunConfig,
}

_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", dict: "object"}


@dataclass(frozen=True)
class RunParam:
    """One DAG Param and CLI flag, and the config fields it sets (``seed`` sets four)."""

    name: str
    setting: Setting
    kind: FieldKind
    default: Any
    targets: tuple[tuple[str, str], ...]
    """``(component, field name)`` pairs; the component is a key of :data:`COMPONENTS`."""

    @property
    def flag(self) -> str:
        return self.setting.flag or "--" + self.name.replace("_", "-")

    @property
    def param_default(self) -> Any:
        """The trigger form's default: empty where the default comes from the settings."""
        return None if self.setting.from_settings else copy.deepcopy(self.default)

    def field_in(self, component: str) -> str | None:
        return next((name for c, name in self.targets if c == component), None)

    def json_schema(self) -> dict[str, Any]:
        """The Param's JSON schema, with the trigger form's title, description and section."""
        s, kind = self.setting, self.kind
        json_type = _JSON_TYPES[kind.base]
        # Nullable where empty means "derived" (from the settings, the data): the trigger form
        # marks a field whose type excludes null as required, and refuses an empty one.
        derived = kind.optional or s.from_settings or (kind.base is str and self.default == "")
        schema: dict[str, Any] = {
            "type": ["null", json_type] if derived else json_type,
            "title": s.title,
            "description": s.help,
            "section": SECTIONS[s.section],
        }
        if kind.choices:
            schema["enum"] = list(kind.choices)
        for key, value in (("minimum", s.minimum), ("maximum", s.maximum), ("exclusiveMinimum", s.exclusive_minimum)):
            if value is not None:
                schema[key] = value
        if s.pattern:
            schema["pattern"] = f"^(?:{s.pattern})$"
        return schema

    def convert(self, value: Any) -> Any:
        """A Param's or flag's value as the field's type; a value of another type names the Param."""
        base = self.kind.base
        if base is bool:
            if not isinstance(value, bool):
                raise ConfigError(self.name, "true or false", repr(value))
            return value
        if base is dict:
            if not isinstance(value, Mapping):
                raise ConfigError(self.name, expectation(self.setting, self.kind), repr(value))
            return dict(value)
        if isinstance(value, bool) or (base is int and isinstance(value, float) and not value.is_integer()):
            raise ConfigError(self.name, expectation(self.setting, self.kind), repr(value))
        try:
            return base(value)
        except (TypeError, ValueError):
            raise ConfigError(
                self.name, {int: "an integer", float: "a number"}.get(base, "a string"), repr(value)
            ) from None


@functools.cache
def run_params() -> tuple[RunParam, ...]:
    """Every Param of a run, in the trigger form's order: by section, then as the fields are declared."""
    found: dict[str, RunParam] = {}
    for component, cls in COMPONENTS.items():
        for f, s, kind in setting_fields(cls):
            name = s.param or f.name
            param = RunParam(name, s, kind, field_default(f), ((component, f.name),))
            if name in found:
                first = found[name]
                if (first.setting, first.kind, first.default) != (s, kind, param.default):
                    raise TypeError(f"Param {name!r} is defined twice, differently ({first.targets}, {component})")
                param = RunParam(name, s, kind, first.default, first.targets + param.targets)
            found[name] = param
    order = list(SECTIONS)
    return tuple(sorted(found.values(), key=lambda p: order.index(p.setting.section)))


def select(*keys: str) -> tuple[RunParam, ...]:
    """The Params that set a field of the given components, or that have the given names."""
    return tuple(p for p in run_params() if p.name in keys or any(c in keys for c, _ in p.targets))


def run_config_from_params(
    params: Mapping[str, Any], settings: Settings | None = None, *, form: bool = False
) -> RunConfig:
    """Build a :class:`RunConfig` from Airflow Params or CLI flags (missing or empty ones take the
    config's defaults, or the settings' where a field says so).

    The Param ``recipe`` (:mod:`pipeline.config.recipes`) sets the training fields it names
    unless a value is given for them. ``form``: the params are a DAG run's, which holds every
    Param, at its default unless a person changed it; there a field left at its default takes
    the recipe's value (from the CLI, which passes only the flags given, any given value wins)."""
    given = {k: v for k, v in params.items() if v is not None and v != ""}
    by_name = {param.name: param for param in run_params()}
    recipe = recipe_values(by_name["recipe"].convert(given["recipe"]) if "recipe" in given else "default")
    values: dict[str, dict[str, Any]] = {component: {} for component in COMPONENTS}
    for param in by_name.values():
        if param.name in given:
            value = param.convert(given[param.name])
            if form and value == param.default and any(c == "train" and n in recipe for c, n in param.targets):
                continue  # a form field left at its default: the recipe's value
        elif param.setting.from_settings:
            value = getattr(settings or Settings.from_env(), param.setting.from_settings)
        else:
            continue
        for component, name in param.targets:
            values[component][name] = value
    for name, value in recipe.items():
        values["train"].setdefault(name, value)
    stages = {component: cls(**values[component]) for component, cls in COMPONENTS.items() if component != "run"}
    return RunConfig(**stages, **values["run"])


def command_line(values: Mapping[str, Any], params: Sequence[RunParam]) -> list[str]:
    """The CLI flags that give ``values`` (``{param name: value}``) for ``params``
    (:mod:`pipeline.entrypoints.flags` parses them back)."""
    line: list[str] = []
    for param in params:
        if param.name not in values:
            continue
        value = values[param.name]
        if param.kind.base is bool:
            line.append(param.flag if value else "--no-" + param.flag[2:])
        elif param.setting.pairs:
            for name, item in value.items():
                line += [param.flag, f"{name}={item}"]
        elif param.kind.base is dict:
            line += [param.flag, json.dumps(value)]
        elif value is not None:
            line += [param.flag, str(value)]
    return line
