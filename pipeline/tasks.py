"""Adapters between Airflow task bodies and the stage functions.

A DAG task passes its run's Params and the upstream tasks' XCom dicts; each function here turns
them into typed config and references (:func:`~pipeline.config.run_config_from_params` is the
one conversion), calls one stage, and returns the stage's reference as a dict for XCom. The
same functions can be called without Airflow.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.config import RunConfig, Settings, run_config_from_params
from pipeline.refs import (
    EvaluationResult,
    ModelVersionRef,
    ProcessedDatasetRef,
    RawDatasetRef,
    TrainResult,
    ValidationRef,
)
from pipeline.storage import Storage, storage_for

Params = Mapping[str, Any]


def _context(params: Params | None) -> tuple[Settings, Storage, RunConfig]:
    settings = Settings.from_env()
    return settings, storage_for(settings), run_config_from_params(params or {}, settings)


def acquire(params: Params | None) -> dict[str, Any]:
    from pipeline.acquire import acquire as stage

    _, storage, config = _context(params)
    return stage(config.acquire, storage).to_dict()


def validate(params: Params | None, raw: dict[str, Any]) -> dict[str, Any]:
    from pipeline.validate import validate_raw

    _, storage, _ = _context(params)
    return validate_raw(RawDatasetRef.from_dict(raw), storage).to_dict()


def preprocess(params: Params | None, raw: dict[str, Any]) -> dict[str, Any]:
    from pipeline.preprocess import preprocess as stage

    _, storage, config = _context(params)
    return stage(RawDatasetRef.from_dict(raw), storage, config.preprocess).to_dict()


def train(params: Params | None, processed: dict[str, Any], run_tags: dict[str, str] | None = None) -> dict[str, Any]:
    from pipeline.train import train as stage

    settings, storage, config = _context(params)
    result = stage(
        ProcessedDatasetRef.from_dict(processed), storage, config.train, settings, force=config.force, tags=run_tags
    )
    return result.to_dict()


def evaluate(params: Params | None, trained: dict[str, Any], processed: dict[str, Any]) -> dict[str, Any]:
    from pipeline.evaluate import evaluate as stage

    settings, storage, _ = _context(params)
    return stage(TrainResult.from_dict(trained), ProcessedDatasetRef.from_dict(processed), storage, settings).to_dict()


def register(
    params: Params | None,
    trained: dict[str, Any],
    evaluation: dict[str, Any],
    validation: dict[str, Any],
    processed: dict[str, Any],
) -> dict[str, Any]:
    from pipeline.register import register as stage

    settings, storage, _ = _context(params)
    version: ModelVersionRef = stage(
        TrainResult.from_dict(trained),
        EvaluationResult.from_dict(evaluation),
        ValidationRef.from_dict(validation),
        ProcessedDatasetRef.from_dict(processed),
        storage,
        settings,
    )
    return version.to_dict()


def check_drift(params: Params | None) -> dict[str, Any]:
    """The drift monitor's one stage; ``params["batch_uri"]`` defaults to the incoming folder."""
    from pipeline.monitor import monitor

    settings, storage, _ = _context({})
    batch_uri = (params or {}).get("batch_uri") or settings.incoming_uri
    return monitor(batch_uri, storage, settings).to_dict()
