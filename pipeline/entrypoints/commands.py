"""What each ``pipeline`` subcommand does: parsed arguments in, one stage function called, its
reference out as a dict (:mod:`pipeline.entrypoints.cli` parses, prints and sets the exit status).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipeline.config import Settings, run_config_from_params
from pipeline.entrypoints.flags import params_of
from pipeline.errors import ConfigError


def _pairs(flag: str, shape: str, values: list[str] | None) -> dict[str, str]:
    pairs = {}
    for item in values or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(flag, shape, repr(item))
        pairs[name] = value
    return pairs


def cmd_run(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from pipeline.entrypoints.run import run_pipeline

    return run_pipeline(run_config_from_params(params_of(args), settings), settings)


def cmd_acquire(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from pipeline.data.acquire import acquire
    from pipeline.storage import storage_for

    config = run_config_from_params(params_of(args), settings).acquire
    return acquire(config, storage_for(settings)).to_dict()


def cmd_validate(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from pipeline.data.acquire import load_raw_ref
    from pipeline.data.validate import validate_raw
    from pipeline.storage import storage_for

    storage = storage_for(settings)
    return validate_raw(load_raw_ref(storage, args.dataset), storage).to_dict()


def cmd_preprocess(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from pipeline.data.acquire import load_raw_ref
    from pipeline.data.preprocess import preprocess
    from pipeline.storage import storage_for

    storage = storage_for(settings)
    config = run_config_from_params(params_of(args), settings).preprocess
    return preprocess(load_raw_ref(storage, args.dataset), storage, config).to_dict()


def cmd_train(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from pipeline.data.processed import load_processed_ref
    from pipeline.storage import storage_for
    from pipeline.training.fit import train

    storage = storage_for(settings)
    config = run_config_from_params(params_of(args), settings)
    processed = load_processed_ref(storage, args.processed)
    tags = _pairs("--tag", "KEY=VALUE", args.tag)
    return train(processed, storage, config.train, settings, force=config.force, tags=config.train_tags(tags)).to_dict()


def cmd_evaluate(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from pipeline.data.processed import load_processed_ref
    from pipeline.evaluation.evaluate import evaluate
    from pipeline.storage import storage_for
    from pipeline.training.fit import load_train_result

    storage = storage_for(settings)
    trained = load_train_result(settings, args.run_id)
    return evaluate(trained, load_processed_ref(storage, trained.processed_hash), storage, settings).to_dict()


def cmd_register(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from pipeline.data.processed import load_processed_ref
    from pipeline.data.validate import load_validation_ref
    from pipeline.evaluation.evaluate import evaluate
    from pipeline.registry.register import register
    from pipeline.storage import storage_for
    from pipeline.training.fit import load_train_result

    storage = storage_for(settings)
    trained = load_train_result(settings, args.run_id)
    processed = load_processed_ref(storage, trained.processed_hash)
    evaluation = evaluate(trained, processed, storage, settings)
    validation = load_validation_ref(storage, trained.dataset_hash)
    return register(trained, evaluation, validation, processed, storage, settings).to_dict()


def cmd_monitor(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from pipeline.entrypoints.tasks import check_drift

    return check_drift({"batch_uri": args.batch})


def _version_ref(settings: Settings, version: str) -> Any:
    from mlflow.exceptions import MlflowException

    from pipeline.errors import ReferenceNotFoundError
    from pipeline.refs import ModelVersionRef
    from pipeline.tracking import tracking_client

    name = settings.model_for()
    try:
        found = tracking_client(settings).get_model_version(name, version)
    except MlflowException as exc:
        raise ReferenceNotFoundError(f"model {name}", f"a version {version}", "none") from exc
    return ModelVersionRef(
        model_name=name,
        version=str(found.version),
        alias="",
        run_id=found.run_id or "",
        model_uri=f"models:/{name}/{found.version}",
        created=False,
    )


def _processed_of(settings: Settings, storage: Any, version: Any, processed_hash: str | None) -> Any:
    """The processed data to test on: given, else the one the version was trained on."""
    from pipeline.data.processed import load_processed_ref
    from pipeline.tracking import tracking_client

    tags = tracking_client(settings).get_model_version(version.model_name, version.version).tags
    return load_processed_ref(storage, processed_hash or tags.get("processed_hash", ""))


def cmd_gate(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from pipeline.registry.gate import gate
    from pipeline.storage import storage_for

    storage = storage_for(settings)
    version = _version_ref(settings, args.version)
    policy = run_config_from_params(params_of(args), settings).gate
    return gate(version, _processed_of(settings, storage, version, args.processed), storage, settings, policy).to_dict()


def cmd_export(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from pipeline.registry.export import export_variants
    from pipeline.storage import storage_for

    storage = storage_for(settings)
    version = _version_ref(settings, args.version)
    policy = run_config_from_params(params_of(args), settings).gate
    processed = _processed_of(settings, storage, version, args.processed)
    return export_variants(version, processed, storage, settings, policy, force=args.force_export).to_dict()


def cmd_predict(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from pipeline.entrypoints.predict import predict_files

    return predict_files(Path(args.onnx_model), [Path(p) for p in args.images])


def cmd_infra_validate(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from pipeline.registry.history import cli_actor
    from pipeline.registry.infra_validate import infra_validate
    from pipeline.storage import storage_for

    storage = storage_for(settings)
    version = _version_ref(settings, args.version)
    processed = _processed_of(settings, storage, version, args.processed)
    return infra_validate(version, processed, storage, settings, cli_actor()).to_dict()


def cmd_promote(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from pipeline.registry.promote import outcome, promote

    return outcome(settings, promote(settings, args.version, reason=args.reason or ""))


def cmd_rollback(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from pipeline.registry.promote import outcome, rollback

    return outcome(settings, rollback(settings, args.to, reason=args.reason or ""))


def cmd_history(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from pipeline.registry.promote import history

    return {"model_name": settings.model_for(), "history": [e.to_dict() for e in history(settings)]}


def cmd_serve(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from pipeline.serving.server import serve

    serve(
        args.model_uri or f"models:/{settings.model_for()}@production",
        settings,
        args.host,
        args.port,
        args.poll_interval,
        args.runtime,
        args.workers,
    )
    return {"stopped": True}


def cmd_summary(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from pipeline.entrypoints.summary import model_summary

    return model_summary(settings, args.alias)
