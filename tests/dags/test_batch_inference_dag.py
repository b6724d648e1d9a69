"""`dag.test()` of batch_inference on a small real batch: its Parquet predictions are the ones
the serving endpoint gives for the same images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from recipes import SMALL_RECIPE

from pipeline.config import TrainConfig
from pipeline.data.idx import write_idx

pytestmark = pytest.mark.slow


@pytest.fixture
def production_model(small_dataset, settings, storage):
    """A model trained for one epoch on the small subset, registered and put in production."""
    from pipeline.config import AcquireConfig, PreprocessConfig
    from pipeline.data.acquire import acquire
    from pipeline.data.preprocess import preprocess
    from pipeline.data.validate import validate_raw
    from pipeline.evaluation.evaluate import evaluate
    from pipeline.registry.history import PRODUCTION
    from pipeline.registry.promote import move_alias
    from pipeline.registry.register import register
    from pipeline.training.fit import train

    raw = acquire(AcquireConfig(source_uri=str(small_dataset)), storage)
    validation = validate_raw(raw, storage)
    processed = preprocess(raw, storage, PreprocessConfig())
    trained = train(processed, storage, TrainConfig(**SMALL_RECIPE, epochs=1, batch_size=64), settings)
    version = register(
        trained, evaluate(trained, processed, storage, settings), validation, processed, storage, settings
    )
    move_alias(settings, PRODUCTION, version.version, "promote", "test", "batch inference test")
    return version


def test_batch_predictions_in_parquet_match_the_service(
    production_model, settings, storage, real_splits, tmp_path, airflow_db
):
    import pandas as pd
    from airflow.dag_processing.dagbag import DagBag
    from fastapi.testclient import TestClient

    from pipeline.serving.app import create_app
    from pipeline.serving.slot import ModelSlot, load
    from pipeline.tracking import tracking_client

    images, labels = real_splits["t10k"][0][600:900], real_splits["t10k"][1][600:900]
    batch = tmp_path / "batch"
    batch.mkdir()
    write_idx(images, batch / "images-idx3-ubyte.gz")
    write_idx(labels, batch / "labels-idx1-ubyte.gz")
    dag = DagBag(dag_folder=str(Path(__file__).resolve().parents[2] / "dags")).get_dag("batch_inference")

    dag_run = dag.test(run_conf={"batch_uri": str(batch)})

    assert dag_run.state == "success"
    table = pd.read_parquet(next((Path(settings.storage_uri) / "predictions").rglob("predictions.parquet")))
    assert list(table.columns) == ["id", "class_id", "class_name", "probabilities", "model_version", "label"]
    assert len(table) == 300 and set(table["model_version"]) == {production_model.version}
    assert (table["label"].to_numpy() == labels).all()

    slot = ModelSlot(f"models:/{settings.model_for()}@production")
    slot.swap(load(slot.model_uri, settings))
    with TestClient(create_app(slot)) as service:
        answer = service.post("/predict", json={"instances": images.tolist()}).json()
    served = np.asarray([p["probabilities"] for p in answer["predictions"]])
    assert answer["model_version"] == production_model.version
    assert (table["class_id"].to_numpy() == served.argmax(axis=1)).all()
    np.testing.assert_allclose(np.stack(table["probabilities"].to_numpy()), served, atol=1e-5)

    client = tracking_client(settings)
    [run] = client.search_runs([client.get_experiment_by_name("batch_inference").experiment_id])
    assert run.data.metrics["images"] == 300 and 0 <= run.data.metrics["accuracy"] <= 1
    assert run.data.tags["model_version"] == production_model.version
    again = dag.test(run_conf={"batch_uri": str(batch)})  # the same batch and version: predicted once
    assert again.state == "success" and len(client.search_runs([run.info.experiment_id])) == 1
