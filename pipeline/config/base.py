"""What every configuration module shares: the :class:`Setting` a user-facing field carries (its
one definition, from which the DAG Params, the CLI flags and the checks are made), and the
readers of operator settings from the environment."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.errors import ConfigError

#: The sections of the trigger form, in the order it shows them (``Setting.section``).
SECTIONS = {
    "data": "Data",
    "model": "Model",
    "training": "Training",
    "hardware": "Hardware",
    "tuning": "Tuning",
    "gate": "Quality gate",
    "promotion": "Promotion",
}


@dataclass(frozen=True)
class Setting:
    """What a person sees of one config field, wherever they set it: the trigger form's label
    (``title``), the form's description and the CLI's ``--help`` (``help``), the form section,
    and the bounds. Choices are the field's ``Literal[...]`` type; the type is the field's."""

    title: str
    help: str
    section: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    pattern: str | None = None
    """A regular expression the whole (string) value must match; ``expected`` says it in words."""
    expected: str | None = None
    """How a bad value's error describes what was expected, where the type and bounds cannot."""
    param: str | None = None
    """The DAG Param and CLI flag name, when it is not the field's name (``gate_min_accuracy``)."""
    flag: str | None = None
    """The CLI flag, when it is not ``--`` and the param name with dashes (``--source``)."""
    metavar: str | None = None
    pairs: bool = False
    """A ``{name: value}`` field the CLI takes as a repeatable ``--flag NAME=VALUE``."""
    from_settings: str | None = None
    """The :class:`~pipeline.config.Settings` attribute an empty Param falls back to."""

    def __post_init__(self) -> None:
        if self.section not in SECTIONS:
            raise ValueError(f"section {self.section!r} is not one of {list(SECTIONS)}")


def setting(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, **meta: Any) -> Any:
    """A dataclass field with its :class:`Setting` (the arguments after the default)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"setting": Setting(**meta)})


def seed_setting() -> Any:
    """The one seed of a run: of the split and the sample cap, of training, of the search."""
    return setting(
        42,
        title="Seed",
        help="Seed of the split, the sample cap, the weights, shuffling, augmentation and the search: "
        "the same seed and config give the same metrics on CPU.",
        section="training",
        minimum=0,
    )


@dataclass(frozen=True)
class FieldKind:
    """A field's type as the checks and the generators need it."""

    base: type
    """``bool``, ``int``, ``float``, ``str`` or ``dict``."""
    optional: bool = False
    choices: tuple[Any, ...] = ()


def _kind(annotation: Any) -> FieldKind:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return FieldKind(type(args[0]), choices=args)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return dataclasses.replace(_kind(inner), optional=True)
    if origin is dict or annotation is dict:
        return FieldKind(dict)
    if annotation in (bool, int, float, str):
        return FieldKind(annotation)
    raise TypeError(f"a Setting field of type {annotation!r}: expected bool, int, float, str, dict or a Literal")


@functools.cache
def setting_fields(cls: type) -> tuple[tuple[dataclasses.Field[Any], Setting, FieldKind], ...]:
    """Every field of the dataclass ``cls`` that carries a :class:`Setting`, with its kind."""
    hints = typing.get_type_hints(cls)
    return tuple(
        (f, f.metadata["setting"], _kind(hints[f.name])) for f in dataclasses.fields(cls) if "setting" in f.metadata
    )


def field_default(f: dataclasses.Field[Any]) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _number(value: float) -> str:
    return repr(value) if isinstance(value, float) and not value.is_integer() else repr(int(value))


def expectation(s: Setting, kind: FieldKind) -> str:
    """What a value of this setting must be, in words, for an error line."""
    if s.expected:
        return s.expected
    if kind.choices:
        return f"one of {list(kind.choices)}"
    what = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "an object"}[kind.base]
    low = s.exclusive_minimum if s.exclusive_minimum is not None else s.minimum
    if low is not None and s.maximum is not None:
        opening = "(" if s.exclusive_minimum is not None else "["
        what += f" in {opening}{_number(low)}, {_number(s.maximum)}]"
    elif low is not None:
        what += f" {'>' if s.exclusive_minimum is not None else '>='} {_number(low)}"
    elif s.maximum is not None:
        what += f" <= {_number(s.maximum)}"
    return what + (" or empty" if kind.optional else "")


def _valid(s: Setting, kind: FieldKind, value: Any) -> bool:
    if value is None:
        return kind.optional
    if kind.choices:
        return value in kind.choices and type(value) is type(kind.choices[0])
    if kind.base is bool or isinstance(value, bool):
        return kind.base is bool and isinstance(value, bool)
    if kind.base is float and isinstance(value, int):
        value = float(value)
    if not isinstance(value, kind.base):
        return False
    if isinstance(value, (int, float)):
        if s.minimum is not None and value < s.minimum:
            return False
        if s.exclusive_minimum is not None and value <= s.exclusive_minimum:
            return False
        if s.maximum is not None and value > s.maximum:
            return False
    return not (s.pattern and not re.fullmatch(s.pattern, str(value)))


def check_settings(obj: Any) -> None:
    """Check every :class:`Setting` field of the dataclass ``obj`` against its type, choices
    and bounds; the first bad one is a :class:`ConfigError` naming its Param."""
    cls: Any = type(obj)
    for f, s, kind in setting_fields(cls):
        value = getattr(obj, f.name)
        if not _valid(s, kind, value):
            raise ConfigError(s.param or f.name, expectation(s, kind), repr(value))


def fingerprint(obj: Any) -> str:
    """A short, stable hash of a config dataclass's values (part of a run's lineage)."""
    blob = json.dumps(dataclasses.asdict(obj), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(name, f"a value in [{low}, {high}]", repr(value))


def env_number(
    env: Mapping[str, str], name: str, kind: type, default: Any, low: float | None = None, high: float | None = None
) -> Any:
    """``env[name]`` as an int or float (``default`` when unset or blank), within ``[low, high]``
    when given; a bad value is a :class:`ConfigError` naming the variable."""
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        what = {int: "an integer", float: "a number"}.get(kind, f"a {kind.__name__}")
        raise ConfigError(
            name, what if low is None or high is None else f"{what} in [{low}, {high}]", repr(text)
        ) from None
    if low is not None and high is not None:
        check_range(name, value, low, high)
    return value


def env_flag(env: Mapping[str, str], name: str) -> bool:
    text = env.get(name, "").strip().lower()
    if text not in ("", "true", "false", "1", "0", "yes", "no"):
        raise ConfigError(name, "true or false", repr(env[name]))
    return text in ("true", "1", "yes")
