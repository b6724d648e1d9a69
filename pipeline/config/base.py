"""The checks and readers every configuration module shares."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from pipeline.errors import ConfigError


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
