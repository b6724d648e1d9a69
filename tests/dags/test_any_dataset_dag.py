"""Datasets other than Fashion-MNIST's IDX files, from source to a served model: the Fashion-MNIST
cut as PNG class folders and scikit-learn's digits as a CSV manifest through the training_pipeline
DAG (``dag.test()``), and the cut as 32x32 RGB JPEGs in a .tar.gz over HTTP through ``pipeline run``. Each registered version
says what it takes (input shape, classes), and the endpoint serving it takes exactly that."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from image_datasets import FOLDERS, cut, digits_manifest, encode, fashion_folders, rgb_archive
from recipes import SMALL_RECIPE, recipe_flags
from services import RecordingServer

from pipeline.config import Settings
from pipeline.tracking import tracking_client

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def training_dag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(Path(__file__).resolve().parents[2] / "dags")).get_dag("training_pipeline")


def only_version(settings: Settings, name: str):
    """The one version registered, under the model ``name``: with no ``PIPELINE_MODEL_NAME``, a
    run registers under its dataset's name, and nothing under the default one."""
    (version,) = tracking_client(settings).search_model_versions(f"name = '{name}'")
    assert not tracking_client(settings).search_registered_models(f"name = '{settings.model_for()}'")
    return version


def serving(settings: Settings, name: str, version: str):
    from fastapi.testclient import TestClient

    from pipeline.serving.app import create_app
    from pipeline.serving.slot import ModelSlot

    slot = ModelSlot(f"models:/{name}/{version}")
    slot.load_first(settings)
    assert slot.current is not None, slot.error
    return TestClient(create_app(slot))


def test_png_class_folders_train_as_well_as_the_idx_files_they_came_from(
    training_dag, tmp_path, settings, small_splits, small_dataset
):
    """The same 2,500 real images, as PNG class folders and as IDX files, same recipe and seed:
    models as good as each other (the validation split is drawn from each layout's own order, so
    not the same model). All 70,000 images, within 0.3 points: bench/layout_bench.py."""
    folders = fashion_folders(tmp_path / "fashion-png", small_splits)
    conf = {**SMALL_RECIPE, "epochs": 2, "batch_size": 64, "gate_min_accuracy": 0.5}
    assert training_dag.test(run_conf={"source_uri": str(folders), **conf}).state == "success"
    png = only_version(settings, "fashion-png-classifier")  # named after its folder
    assert json.loads(png.tags["classes"]) == sorted(FOLDERS) and json.loads(png.tags["input_shape"]) == [1, 28, 28]
    assert training_dag.test(run_conf={"source_uri": str(small_dataset), **conf}).state == "success"
    (idx,) = tracking_client(settings).search_model_versions("name = 'fashion-mnist-classifier'")
    accuracies = {"png": float(png.tags["test_accuracy"]), "idx": float(idx.tags["test_accuracy"])}
    assert accuracies["png"] > 0.6 and abs(accuracies["png"] - accuracies["idx"]) < 0.05, accuracies


def test_digits_from_a_csv_manifest_train_register_and_serve_with_classes_0_to_9(training_dag, tmp_path, settings):
    source = digits_manifest(tmp_path / "digits")
    conf = {"source_uri": str(source), **SMALL_RECIPE, "epochs": 2, "batch_size": 64, "gate_min_accuracy": 0.5}
    assert training_dag.test(run_conf=conf).state == "success"
    version = only_version(settings, "digits-classifier")
    assert json.loads(version.tags["classes"]) == [str(d) for d in range(10)]
    assert json.loads(version.tags["input_shape"]) == [1, 8, 8]
    card = version.description
    assert "8x8 grayscale images like those of the digits dataset" in card and "0, 1, 2, 3, 4, 5, 6, 7, 8, 9" in card
    assert "Fashion" not in card and "T-shirt" not in card
    from sklearn.datasets import load_digits

    digits = load_digits()
    with serving(settings, "digits-classifier", version.version) as client:
        metadata = client.get("/metadata").json()
        assert metadata["classes"] == [str(d) for d in range(10)] and metadata["input_shape"] == [1, 8, 8]
        images = (digits.images[:64] * 255 / 16).astype(np.uint8)
        answer = client.post("/predict", json={"instances": images.tolist()}).json()
        predicted = [p["class_name"] for p in answer["predictions"]]
        assert np.mean([p == str(t) for p, t in zip(predicted, digits.target[:64], strict=True)]) > 0.5
        wrong = client.post("/predict", json={"image": np.zeros((28, 28), int).tolist()})
        assert wrong.status_code == 422 and "expected images of shape (8, 8)" in wrong.json()["detail"]


def test_rgb_jpegs_in_a_tar_gz_over_http_train_a_3_channel_model_that_refuses_grayscale(
    tmp_path, pipeline_home, small_splits, capsys
):
    from pipeline.config import Settings
    from pipeline.entrypoints.cli import main

    archive = rgb_archive(tmp_path / "served", cut(small_splits, 1000, 250))
    with RecordingServer(archive.parent) as server:
        code = main(["run", "--source", f"{server.url}/{archive.name}", "--epochs", "1", *recipe_flags(),
                     "--gate-min-accuracy", "0.3"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    settings = Settings.from_env()
    version = only_version(settings, "fashion-rgb-classifier")
    assert json.loads(version.tags["input_shape"]) == [3, 32, 32]
    assert "32x32 RGB images like those of the fashion-rgb dataset" in version.description
    from PIL import Image

    with serving(settings, "fashion-rgb-classifier", version.version) as client:
        photo = np.asarray(Image.open(next((tmp_path / "served" / "work").rglob("*.jpeg"))).convert("RGB"))
        answer = client.post("/predict", content=encode(photo, "JPEG"), headers={"content-type": "image/jpeg"})
        assert answer.status_code == 200 and answer.json()["model_version"] == str(version.version)
        gray = client.post(
            "/predict", content=encode(small_splits["t10k"][0][0]), headers={"content-type": "image/png"}
        )
        assert gray.status_code == 422
        assert gray.json()["detail"] == "image: expected a 32x32 RGB PNG, found 28x28"
