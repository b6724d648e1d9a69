"""The whole chain without Airflow: the same stage functions the DAG calls, in the same order.

``acquire -> validate -> preprocess -> [tune] -> train -> evaluate -> register -> export -> gate ->
infra_validate`` (alias ``staging``) and, with ``promotion`` ``auto``, ``promote`` (alias
``production``; ``approval`` waits for a person in Airflow and is refused here); a failing stage raises and nothing after it runs. With tuning on, the search
runs its trials one after another and ``train`` uses the best one's configuration.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pipeline.config import RunConfig, Settings
from pipeline.errors import ConfigError
from pipeline.storage import storage_for


def run_pipeline(config: RunConfig, settings: Settings, tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Run every stage; return each stage's reference as a dict, keyed by stage."""
    from pipeline.data.acquire import acquire
    from pipeline.data.preprocess import preprocess
    from pipeline.data.validate import validate_raw
    from pipeline.evaluation.evaluate import evaluate
    from pipeline.registry.export import export_variants
    from pipeline.registry.gate import gate
    from pipeline.registry.history import cli_actor
    from pipeline.registry.infra_validate import infra_validate
    from pipeline.registry.promote import outcome, promote
    from pipeline.registry.register import register
    from pipeline.training.fit import train
    from pipeline.training.hardware import is_global_rank_zero

    if config.promotion == "approval":
        raise ConfigError(
            "promotion", "manual or auto without Airflow (an approval waits in the Airflow UI)", "approval"
        )
    storage = storage_for(settings)
    raw = acquire(config.acquire, storage)
    validation = validate_raw(raw, storage)
    processed = preprocess(raw, storage, config.preprocess)
    chosen = {}
    if config.tune.enabled:
        from pipeline.training.tune import run_study

        chosen = run_study(raw, storage, config.tune, config.train, config.preprocess, settings)
    train_config = dataclasses.replace(config.train, **chosen)
    trained = train(processed, storage, train_config, settings, force=config.force, tags=config.train_tags(tags))
    if not is_global_rank_zero():
        return {}  # a DDP rank Lightning launched by re-running this command: its part is done
    evaluation = evaluate(trained, processed, storage, settings)
    actor = cli_actor()
    version = register(trained, evaluation, validation, processed, storage, settings, actor)
    settings = settings.for_model(version.model_name)  # named after the dataset unless set
    exported = (
        export_variants(version, processed, storage, settings, config.gate).to_dict()
        if config.export_variants
        else None
    )
    verdict = gate(version, processed, storage, settings, config.gate)
    served = infra_validate(version, processed, storage, settings, actor)
    promoted = (
        promote(settings, version.version, actor, "pipeline run --promotion auto", forward_only=True)
        if config.promotion == "auto"
        else None
    )
    return {
        "acquire": raw.to_dict(),
        "validate": validation.to_dict(),
        "preprocess": processed.to_dict(),
        "tune": {"overrides": chosen} if config.tune.enabled else None,
        "train": trained.to_dict(),
        "evaluate": evaluation.to_dict(),
        "register": version.to_dict(),
        "export": exported,
        "gate": verdict.to_dict(),
        "infra_validate": served.to_dict(),
        "promote": outcome(settings, promoted) if config.promotion == "auto" else None,
    }
