"""Tune: try candidate training configurations on a capped sample, keep the best.

A search (:class:`~pipeline.config.TuneConfig`) names :class:`~pipeline.config.TrainConfig` fields and the values to try, for
example ``{"learning_rate": [0.05, 0.1, 0.2], "weight_decay": [0.0001, 0.0005]}``.
``grid`` tries every combination; ``random`` draws ``trials`` of them (seeded, without
repeats). Each trial is a short training (``trial_epochs``) on a stratified sample of
``sample_cap`` images, tracked as an MLflow child run of one parent run per study, so the MLflow
UI shows the trials side by side under it. The best trial by validation accuracy gives the
overrides that the full training then uses.

In Airflow each trial is one mapped task instance (dynamic task mapping), so trials run in
parallel on as many workers as there are; ``pipeline run --tune`` runs them one after another
(:func:`run_study`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.config import PreprocessConfig, Settings, TrainConfig, TuneConfig
from pipeline.refs import ProcessedDatasetRef, RawDatasetRef
from pipeline.storage import Storage

log = logging.getLogger(__name__)

TAG_STUDY = "pipeline.tune_study"


def candidates(config: TuneConfig, base: TrainConfig) -> list[dict[str, Any]]:
    """The overrides to try, each checked against :class:`TrainConfig` before any trial runs."""
    names = sorted(config.space)
    grid = [dict(zip(names, values, strict=True)) for values in itertools.product(*(config.space[n] for n in names))]
    if config.method == "random" and config.trials < len(grid):
        grid = random.Random(config.seed).sample(grid, config.trials)
    for overrides in grid:
        dataclasses.replace(base, **overrides)  # a bad value fails here, naming the field
    return grid


def sample_data(
    raw: RawDatasetRef, storage: Storage, config: TuneConfig, preprocess: PreprocessConfig
) -> ProcessedDatasetRef:
    """The capped, stratified sample the trials train on (content-addressed, made once)."""
    from pipeline.data.preprocess import preprocess as run_preprocess

    return run_preprocess(raw, storage, dataclasses.replace(preprocess, sample_cap=config.sample_cap))


def start_study(settings: Settings, name: str, config: TuneConfig, base: TrainConfig) -> str:
    """The parent MLflow run of a study (found again by name, so a retried task reuses it)."""
    from pipeline.tracking import experiment_id, tracking_client

    client = tracking_client(settings)
    experiment = experiment_id(client, settings)
    found = client.search_runs([experiment], filter_string=f"tags.`{TAG_STUDY}` = '{name}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment, run_name=f"tune-{name}", tags={TAG_STUDY: name})
    client.log_param(run.info.run_id, "space", str(dict(config.space)))
    client.log_param(run.info.run_id, "method", config.method)
    client.log_param(run.info.run_id, "sample_cap", config.sample_cap)
    client.log_param(run.info.run_id, "trial_epochs", config.trial_epochs)
    client.log_param(run.info.run_id, "base_config", str(dataclasses.asdict(base)))
    return run.info.run_id


def run_trial(
    sample: ProcessedDatasetRef,
    storage: Storage,
    base: TrainConfig,
    overrides: dict[str, Any],
    config: TuneConfig,
    settings: Settings,
    parent_run_id: str,
) -> dict[str, Any]:
    """Train one candidate on the sample as a child run; return its overrides and score."""
    from pipeline.training.fit import train

    trial_config = dataclasses.replace(base, **overrides, epochs=config.trial_epochs)
    result = train(
        sample,
        storage,
        trial_config,
        settings,
        tags={"mlflow.parentRunId": parent_run_id, "pipeline.tune_trial": "true"},
    )
    log.info("trial %s: val_accuracy %.4f (run %s)", overrides, result.metrics["val_accuracy"], result.run_id)
    return {"overrides": overrides, "val_accuracy": result.metrics["val_accuracy"], "run_id": result.run_id}


def choose(
    trials: Sequence[Mapping[str, Any]], settings: Settings | None = None, parent_run_id: str | None = None
) -> dict[str, Any]:
    """The best trial's overrides (highest validation accuracy; ties go to the earlier trial)."""
    if not trials:
        return {}
    best = max(enumerate(trials), key=lambda pair: (pair[1]["val_accuracy"], -pair[0]))[1]
    log.info("best of %d trials: %s, val_accuracy %.4f", len(trials), best["overrides"], best["val_accuracy"])
    if settings is not None and parent_run_id:
        from pipeline.tracking import tracking_client

        client = tracking_client(settings)
        client.log_metric(parent_run_id, "best_val_accuracy", best["val_accuracy"])
        client.set_tag(parent_run_id, "pipeline.best_trial_run", best["run_id"])
        client.log_dict(parent_run_id, {"best": best, "trials": list(trials)}, "tune/trials.json")
        client.set_terminated(parent_run_id, "FINISHED")
    return dict(best["overrides"])


def study_name(raw: RawDatasetRef, config: TuneConfig, base: TrainConfig, preprocess: PreprocessConfig) -> str:
    """A name that is the same for the same data and search, so a rerun finds its study (and
    its finished trials) again instead of starting over."""
    return (
        f"pipeline-run/{raw.dataset_hash[:12]}/{config.fingerprint()}-{base.fingerprint()}-{preprocess.fingerprint()}"
    )


def run_study(
    raw: RawDatasetRef,
    storage: Storage,
    config: TuneConfig,
    base: TrainConfig,
    preprocess: PreprocessConfig,
    settings: Settings,
) -> dict[str, Any]:
    """The whole search in this process, trial after trial; return the best trial's overrides."""
    found = candidates(config, base)
    sample = sample_data(raw, storage, config, preprocess)
    parent = start_study(settings, study_name(raw, config, base, preprocess), config, base)
    trials = [run_trial(sample, storage, base, overrides, config, settings, parent) for overrides in found]
    return choose(trials, settings, parent)
