"""Two registrations and two promotions started at the same instant, from two processes, on a
real PostgreSQL-backed MLflow store, directly and through an MLflow server on it: distinct
versions, a history with both moves in order, no lost alias. Repeated 10 times, each on a
fresh registered model."""

from __future__ import annotations

import dataclasses
import multiprocessing
import uuid
from concurrent.futures import ProcessPoolExecutor

import pytest

from pipeline.config import Settings
from pipeline.registry.history import CANDIDATE, PRODUCTION, alias_version
from pipeline.registry.promote import history, promote
from pipeline.registry.register import register_version
from pipeline.tracking import experiment_id, tracking_client

pytestmark = [pytest.mark.slow, pytest.mark.integration]
POSTGRES = "postgresql://postgres@127.0.0.1:5432"
REPEATS = 10


@pytest.fixture(scope="module")
def postgres_tracking_uri():
    """A database of its own on the PostgreSQL server these machines run, dropped afterwards."""
    import psycopg2

    name = f"mlflow_concurrency_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(f"{POSTGRES}/postgres")
    admin.autocommit = True
    admin.cursor().execute(f"CREATE DATABASE {name}")
    try:
        yield f"{POSTGRES.replace('postgresql', 'postgresql+psycopg2')}/{name}"
    finally:
        admin.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


@pytest.fixture(scope="module")
def two_logged_models(postgres_tracking_uri, tmp_path_factory):
    """Two training runs, each with a small logged model (the registrations' sources)."""
    import mlflow
    import torch

    from pipeline.models.export import ServingModel
    from pipeline.models.networks import build_network

    home = tmp_path_factory.mktemp("home")
    settings = dataclasses.replace(Settings.from_env({"PIPELINE_HOME": str(home)}), tracking_uri=postgres_tracking_uri)
    client = tracking_client(settings)
    experiment = experiment_id(client, settings)
    example = torch.zeros(2, 1, 28, 28)
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        with mlflow.start_run(experiment_id=experiment) as run:
            model = ServingModel(build_network("simple_cnn"), 0.3, 0.35).eval()
            info = mlflow.pytorch.log_model(
                model,
                name="model",
                input_example=example.numpy(),
                serialization_format="pt2",
                pip_requirements=["torch"],
            )
        models.append((run.info.run_id, info.model_uri))
    return settings, models


def _register(settings: Settings, run_id: str, model_uri: str, barrier) -> str:
    barrier.wait()  # both processes leave the barrier together
    return register_version(settings, run_id, model_uri, f"worker-{run_id[:6]}")[0]


def _promote(settings: Settings, version: str, barrier) -> str:
    barrier.wait()
    return promote(settings, version, f"worker-{version}", "concurrency test").to_version


@pytest.fixture(params=["postgresql store", "mlflow server"])
def tracking(request, two_logged_models):
    settings, models = two_logged_models
    if request.param == "postgresql store":
        yield settings, models
        return
    from services import MlflowServer

    with MlflowServer(settings.tracking_uri, settings.artifact_root) as server:
        yield dataclasses.replace(settings, tracking_uri=server.url), models


def test_simultaneous_registrations_and_promotions_lose_nothing(tracking):
    settings, models = tracking
    client = tracking_client(settings)
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        for attempt in range(REPEATS):
            model = dataclasses.replace(settings, model_name=f"concurrency-{uuid.uuid4().hex[:8]}-{attempt}")
            barrier = manager.Barrier(2)
            versions = list(pool.map(_register, [model] * 2, *zip(*models, strict=True), [barrier] * 2))
            assert sorted(versions) == ["1", "2"], f"attempt {attempt}: versions {versions}"
            registered = {
                v.run_id: str(v.version) for v in client.search_model_versions(f"name = '{model.model_name}'")
            }
            assert registered == {run_id: version for (run_id, _), version in zip(models, versions, strict=True)}
            # `candidate` only moves forward: it ends at the newer version whichever moved first,
            # and each recorded move starts where the one before it ended.
            candidate_moves = [(e.from_version, e.to_version) for e in history(model) if e.alias == CANDIDATE]
            assert candidate_moves in ([(None, "1"), ("1", "2")], [(None, "2")])
            assert alias_version(client, model.model_name, CANDIDATE) == "2"

            for version in versions:
                for tag in ("gate.decision", "infra_validation"):
                    client.set_model_version_tag(model.model_name, version, tag, "passed")
            barrier = manager.Barrier(2)
            promoted = list(pool.map(_promote, [model] * 2, versions, [barrier] * 2))
            assert sorted(promoted) == ["1", "2"]
            moves = [e for e in history(model) if e.alias == PRODUCTION]
            assert [(m.from_version, m.to_version) for m in moves] in (
                [(None, "1"), ("1", "2")],
                [(None, "2"), ("2", "1")],
            )
            assert [e.seq for e in history(model)] == list(range(1, len(candidate_moves) + 3))
            assert alias_version(client, model.model_name, PRODUCTION) == moves[-1].to_version
            assert not client.search_registered_models(f"name = '{model.model_name}.lock'")  # released
