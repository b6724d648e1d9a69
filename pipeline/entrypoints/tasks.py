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
    # A DAG run's Params hold every field of the trigger form: one left at its default takes the recipe's value.
    return settings, storage_for(settings), run_config_from_params(params or {}, settings, form=True)


def acquire(params: Params | None) -> dict[str, Any]:
    from pipeline.data.acquire import acquire as stage

    _, storage, config = _context(params)
    return stage(config.acquire, storage).to_dict()


def validate(params: Params | None, raw: dict[str, Any]) -> dict[str, Any]:
    from pipeline.data.validate import validate_raw

    _, storage, _ = _context(params)
    return validate_raw(RawDatasetRef.from_dict(raw), storage).to_dict()


def preprocess(params: Params | None, raw: dict[str, Any]) -> dict[str, Any]:
    from pipeline.data.preprocess import preprocess as stage

    _, storage, config = _context(params)
    return stage(RawDatasetRef.from_dict(raw), storage, config.preprocess).to_dict()


def tune_setup(params: Params | None, raw: dict[str, Any], study: str) -> list[dict[str, Any]]:
    """One spec per trial (candidate overrides, the sample, the study's parent run); an empty
    list when tuning is off, so that the mapped trial task is skipped."""
    from pipeline.training import tune

    settings, storage, config = _context(params)
    if not config.tune.enabled:
        return []
    found = tune.candidates(config.tune, config.train)
    sample = tune.sample_data(RawDatasetRef.from_dict(raw), storage, config.tune, config.preprocess)
    parent = tune.start_study(settings, study, config.tune, config.train)
    return [{"overrides": overrides, "parent_run_id": parent, "sample": sample.to_dict()} for overrides in found]


def tune_trial(params: Params | None, spec: dict[str, Any]) -> dict[str, Any]:
    from pipeline.training import tune

    settings, storage, config = _context(params)
    sample = ProcessedDatasetRef.from_dict(spec["sample"])
    result = tune.run_trial(
        sample, storage, config.train, spec["overrides"], config.tune, settings, spec["parent_run_id"]
    )
    return {**result, "parent_run_id": spec["parent_run_id"]}


def tune_choose(params: Params | None, trials: list[dict[str, Any]]) -> dict[str, Any]:
    """The winning overrides for ``train`` ({} when tuning is off)."""
    from pipeline.training import tune

    parent = trials[0]["parent_run_id"] if trials else None
    return tune.choose(trials, Settings.from_env(), parent)


def train(
    params: Params | None,
    processed: dict[str, Any],
    run_tags: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train with the run's config, with ``overrides`` (a tuning study's choice) applied."""
    import dataclasses

    from pipeline.training.fit import train as stage
    from pipeline.training.launcher import needs_launcher, train_command

    settings, storage, config = _context(params)
    if overrides:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, **overrides))
    if needs_launcher(config.train):
        # Lightning's DDP launcher starts the other ranks by re-running this process's command
        # line, which inside an Airflow worker is the task runner: run `pipeline train` instead.
        ref = ProcessedDatasetRef.from_dict(processed)
        command = train_command(ref.processed_hash, config.train, force=config.force, tags=config.train_tags(run_tags))
        return _run_json(command)
    result = stage(
        ProcessedDatasetRef.from_dict(processed),
        storage,
        config.train,
        settings,
        force=config.force,
        tags=config.train_tags(run_tags),
    )
    return result.to_dict()


def _run_json(command: list[str]) -> dict[str, Any]:
    """Run a ``pipeline ... --json`` command; its log goes to this task's log, its result back."""
    import json
    import subprocess
    import sys

    from pipeline.errors import PipelineError

    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
    if done.returncode != 0:
        error = PipelineError(f"{' '.join(command[:3])} ...: exited with status {done.returncode} (see the log above)")
        error.exit_code = done.returncode
        raise error
    return json.loads(done.stdout)


def evaluate(params: Params | None, trained: dict[str, Any], processed: dict[str, Any]) -> dict[str, Any]:
    from pipeline.evaluation.evaluate import evaluate as stage

    settings, storage, _ = _context(params)
    return stage(TrainResult.from_dict(trained), ProcessedDatasetRef.from_dict(processed), storage, settings).to_dict()


def actor(dag_id: str, run_id: str, user: str | None = None) -> str:
    """Who moved an alias, for the promotion history: the person who triggered the run, if any,
    and the DAG run."""
    return f"{user + ' via ' if user else ''}airflow:{dag_id}/{run_id}"


def register(
    params: Params | None,
    trained: dict[str, Any],
    evaluation: dict[str, Any],
    validation: dict[str, Any],
    processed: dict[str, Any],
    actor: str | None = None,
) -> dict[str, Any]:
    from pipeline.registry.register import register as stage

    settings, storage, _ = _context(params)
    version: ModelVersionRef = stage(
        TrainResult.from_dict(trained),
        EvaluationResult.from_dict(evaluation),
        ValidationRef.from_dict(validation),
        ProcessedDatasetRef.from_dict(processed),
        storage,
        settings,
        actor,
    )
    return version.to_dict()


def export(params: Params | None, version: dict[str, Any], processed: dict[str, Any]) -> dict[str, Any]:
    """The version's ONNX and INT8 variants, exported, scored and tagged (``export_variants``
    off: nothing, and the result says so)."""
    from pipeline.registry.export import export_variants

    settings, storage, config = _context(params)
    if not config.export_variants:
        return {"exported": False, "reason": "export_variants is off"}
    ref = ModelVersionRef.from_dict(version)
    result = export_variants(ref, ProcessedDatasetRef.from_dict(processed), storage, settings, config.gate)
    return {"exported": True, **result.to_dict()}


def gate(params: Params | None, version: dict[str, Any], processed: dict[str, Any]) -> dict[str, Any]:
    from pipeline.registry.gate import gate as stage

    settings, storage, config = _context(params)
    ref = ModelVersionRef.from_dict(version)
    return stage(ref, ProcessedDatasetRef.from_dict(processed), storage, settings, config.gate).to_dict()


def infra_validate(
    params: Params | None, version: dict[str, Any], processed: dict[str, Any], actor: str
) -> dict[str, Any]:
    from pipeline.registry.infra_validate import infra_validate as stage

    settings, storage, _ = _context(params)
    return stage(
        ModelVersionRef.from_dict(version), ProcessedDatasetRef.from_dict(processed), storage, settings, actor
    ).to_dict()


def _registry_settings(model_name: str | None) -> Settings:
    """The settings acting on ``model_name`` when one is given (empty: the default model)."""
    settings = Settings.from_env()
    return settings.for_model(model_name) if model_name else settings


def decided(
    params: Params | None, version: dict[str, Any], approval: dict[str, Any], dag_id: str, run_id: str, user: str | None
) -> dict[str, Any]:
    """``training_pipeline``'s ``promote``: production to the run's own version (forward only),
    by the ``approve`` task's ``approval`` (``auto``, or a person's Approve, recorded with their
    name and comment in the history and the version's tags)."""
    from pipeline.registry.promote import tag_decision

    if approval.get("decision") == "auto":
        reason = "promotion auto: passed the gate and infra validation"
        return promote(params, actor(dag_id, run_id, user), version["version"], reason, version["model_name"])
    approver = actor(dag_id, run_id, approval.get("by") or None)
    reason = f"approved: {approval['comment']}" if approval.get("comment") else "approved"
    moved = promote(params, approver, version["version"], reason, version["model_name"])
    tag_decision(_registry_settings(version["model_name"]), version["version"], "approved", approver, reason)
    return moved


def promote_requested(
    params: Params | None, approval: dict[str, Any], dag_id: str, run_id: str, user: str | None
) -> dict[str, Any]:
    """``promote_model``'s ``promote``: as the person who triggered it asked (no approval step),
    or the version a second person approved, recorded with both of them."""
    from pipeline.registry.promote import tag_decision

    params = params or {}
    if approval.get("decision") == "auto":
        return promote(params, actor(dag_id, run_id, user))
    approver = actor(dag_id, run_id, approval.get("by") or None)
    asked = f"asked by {user or 'someone'}: {params.get('reason') or 'no reason given'}"
    reason = f"approved: {approval['comment']} ({asked})" if approval.get("comment") else f"approved ({asked})"
    moved = promote(params, approver, None, reason, approval["model_name"], pinned=approval["version"])
    tag_decision(_registry_settings(approval["model_name"]), approval["version"], "approved", approver, reason)
    return moved


def reject(version: dict[str, Any], approval: dict[str, Any], dag_id: str, run_id: str) -> dict[str, Any]:
    """``training_pipeline``'s ``reject``: a person's Reject; production stays, and the history
    and the version's tags say who and why."""
    from pipeline.registry.promote import reject as stage

    settings = _registry_settings(version["model_name"])
    reason = f"rejected: {approval['comment']}" if approval.get("comment") else "rejected"
    entry = stage(settings, version["version"], actor(dag_id, run_id, approval.get("by") or None), reason)
    return {"moved": False, "model_name": settings.model_for(), **entry.to_dict()}


def promote(
    params: Params | None,
    actor: str,
    version: str | None = None,
    reason: str | None = None,
    model_name: str | None = None,
    pinned: str | None = None,
) -> dict[str, Any]:
    """Move ``production`` to ``version`` (a training run's own, forward only), else to
    ``pinned`` (a version a person chose), else to the Param ``version``, else to the staging
    version (a person's choice), of ``model_name`` (a training run's own), else of the Param
    ``model_name``, else of the default model."""
    from pipeline.registry.promote import outcome
    from pipeline.registry.promote import promote as stage

    params = params or {}
    settings = _registry_settings(model_name or params.get("model_name"))
    chosen = version or pinned or (str(params["version"]) if params.get("version") not in (None, "") else None)
    move = stage(settings, chosen, actor, reason or params.get("reason") or "", forward_only=version is not None)
    return outcome(settings, move)


def rollback(params: Params | None, actor: str) -> dict[str, Any]:
    from pipeline.registry.promote import outcome
    from pipeline.registry.promote import rollback as stage

    params = params or {}
    settings = _registry_settings(params.get("model_name"))
    to = str(params["to_version"]) if params.get("to_version") not in (None, "") else None
    return outcome(settings, stage(settings, to, actor, params.get("reason") or ""))


def check_drift(params: Params | None) -> dict[str, Any]:
    """The drift monitor's one stage; ``params["batch_uri"]`` defaults to the incoming folder."""
    from pipeline.monitoring.monitor import monitor

    settings, storage, _ = _context({})
    batch_uri = (params or {}).get("batch_uri") or settings.incoming_uri
    return monitor(batch_uri, storage, settings).to_dict()


def request_retraining(result: dict[str, Any], dag_id: str, run_id: str) -> dict[str, Any]:
    """Drift was found: the drift asset event's extra (what the triggered training run sees),
    and an alert to the people who watch the model."""
    from pipeline.entrypoints import alerts

    settings = Settings.from_env()
    extra = {k: result[k] for k in ("batch_hash", "reasons", "report_uri", "model_version")}
    alerts.send(alerts.drift_detected(result, dag_id, run_id, settings, alerts.airflow_url()), settings)
    return extra


def batch_inference(params: Params | None) -> dict[str, Any]:
    """Predict the batch at ``params["batch_uri"]`` with the version behind ``params["alias"]``."""
    from pipeline.errors import ConfigError
    from pipeline.monitoring.batch_inference import batch_inference as stage

    settings, storage, _ = _context({})
    params = params or {}
    if not params.get("batch_uri"):
        raise ConfigError(
            "batch_uri", "a folder or URI prefix holding images-idx3-ubyte.gz", repr(params.get("batch_uri"))
        )
    return stage(params["batch_uri"], storage, settings, params.get("alias") or "production").to_dict()
