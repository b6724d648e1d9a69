"""One pipeline run's configuration, and its conversion from Airflow Params or CLI flags."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.config.data import AcquireConfig, PreprocessConfig
from pipeline.config.gate import GatePolicy
from pipeline.config.settings import Settings
from pipeline.config.training import TrainConfig, TuneConfig
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class RunConfig:
    """Everything one pipeline run needs, as built from DAG Params or CLI flags."""

    acquire: AcquireConfig
    preprocess: PreprocessConfig
    train: TrainConfig
    tune: TuneConfig = field(default_factory=TuneConfig)
    gate: GatePolicy = field(default_factory=GatePolicy)
    auto_promote: bool = False
    """Move ``production`` to the new version when it passes the gate and infra validation
    (off: the run stops at ``staging`` and a person promotes)."""
    force: bool = False
    """Retrain and register a new version even if this data and config were trained before."""


def _typed(params: Mapping[str, Any], name: str, kind: type, default: Any) -> Any:
    """``params[name]`` converted to ``kind`` (``default`` when absent); a bad value names the field."""
    if name not in params:
        return default
    value = params[name]
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(name, "true or false", repr(value))
    try:
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(name, {int: "an integer", float: "a number", str: "a string"}[kind], repr(value)) from exc


def run_config_from_params(params: Mapping[str, Any], settings: Settings | None = None) -> RunConfig:
    """Build a :class:`RunConfig` from Airflow Params or CLI flags (missing keys take defaults)."""
    settings = settings or Settings.from_env()
    p = {k: v for k, v in params.items() if v is not None and v != ""}
    train, prep, tune, gate = TrainConfig(), PreprocessConfig(), TuneConfig(), GatePolicy()
    checksums = p.get("expected_sha256") or {}
    if not isinstance(checksums, Mapping):
        raise ConfigError("expected_sha256", '{"file name": "sha256"}', repr(checksums))
    return RunConfig(
        acquire=AcquireConfig(
            source_uri=_typed(p, "source_uri", str, settings.source_uri), expected_sha256=dict(checksums)
        ),
        preprocess=PreprocessConfig(
            val_fraction=_typed(p, "val_fraction", float, prep.val_fraction),
            sample_cap=_typed(p, "sample_cap", int, None),
            seed=_typed(p, "seed", int, prep.seed),
        ),
        train=TrainConfig(
            architecture=_typed(p, "architecture", str, train.architecture),
            epochs=_typed(p, "epochs", int, train.epochs),
            batch_size=_typed(p, "batch_size", int, train.batch_size),
            learning_rate=_typed(p, "learning_rate", float, train.learning_rate),
            weight_decay=_typed(p, "weight_decay", float, train.weight_decay),
            optimizer=_typed(p, "optimizer", str, train.optimizer),
            label_smoothing=_typed(p, "label_smoothing", float, train.label_smoothing),
            lr_schedule=_typed(p, "lr_schedule", str, train.lr_schedule),
            augment=_typed(p, "augment", bool, train.augment),
            test_time_flip=_typed(p, "test_time_flip", bool, train.test_time_flip),
            early_stopping_patience=_typed(p, "early_stopping_patience", int, train.early_stopping_patience),
            seed=_typed(p, "seed", int, train.seed),
            accelerator=_typed(p, "accelerator", str, train.accelerator),
            devices=_typed(p, "devices", str, train.devices),
            num_nodes=_typed(p, "num_nodes", int, train.num_nodes),
            strategy=_typed(p, "strategy", str, train.strategy),
            precision=_typed(p, "precision", str, train.precision),
            compile=_typed(p, "compile", bool, train.compile),
            num_threads=_typed(p, "num_threads", int, train.num_threads),
        ),
        tune=TuneConfig(
            enabled=_typed(p, "tune", bool, tune.enabled),
            space=p.get("tune_space", tune.space),
            method=_typed(p, "tune_method", str, tune.method),
            trials=_typed(p, "tune_trials", int, tune.trials),
            sample_cap=_typed(p, "tune_sample_cap", int, tune.sample_cap),
            trial_epochs=_typed(p, "tune_epochs", int, tune.trial_epochs),
            seed=_typed(p, "seed", int, tune.seed),
        ),
        gate=GatePolicy(
            min_accuracy=_typed(p, "gate_min_accuracy", float, gate.min_accuracy),
            max_accuracy_drop=_typed(p, "gate_max_accuracy_drop", float, gate.max_accuracy_drop),
            max_class_drop=_typed(p, "gate_max_class_drop", float, gate.max_class_drop),
            min_improvement=_typed(p, "gate_min_improvement", float, gate.min_improvement),
        ),
        auto_promote=_typed(p, "auto_promote", bool, False),
        force=_typed(p, "force", bool, False),
    )
