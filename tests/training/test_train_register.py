"""Training, evaluation and registration on a small real subset, with a real MLflow store."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from recipes import SMALL_RECIPE, prepare_small

from pipeline.config import TrainConfig
from pipeline.data.processed import load_split
from pipeline.evaluation.evaluate import ARTIFACTS, CONFUSION, evaluate
from pipeline.models.classifier import load_checkpoint
from pipeline.models.registered import load_registered
from pipeline.registry.register import register
from pipeline.storage import storage_for
from pipeline.tracking import TAG_DATASET, tracking_client
from pipeline.training.fit import train
from pipeline.training.hardware import resolve_precision

pytestmark = pytest.mark.slow
CONFIG = TrainConfig(**SMALL_RECIPE, epochs=2, batch_size=64)


@pytest.fixture(scope="module")
def trained(module_settings, small_dataset):
    """One small training, evaluation and registration shared by the tests below."""
    settings = module_settings
    storage = storage_for(settings)
    prepared = prepare_small(storage, small_dataset)
    raw, validation, processed = prepared.raw, prepared.validation, prepared.processed
    result = train(processed, storage, CONFIG, settings, tags={"airflow.run_id": "manual__test"})
    evaluation = evaluate(result, processed, storage, settings)
    version = register(result, evaluation, validation, processed, storage, settings)
    return {
        "settings": settings,
        "storage": storage,
        "raw": raw,
        "validation": validation,
        "processed": processed,
        "train": result,
        "evaluation": evaluation,
        "version": version,
    }


def test_run_has_params_per_epoch_metrics_and_lineage(trained):
    client = tracking_client(trained["settings"])
    run = client.get_run(trained["train"].run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["architecture"] == "resnet_small" and run.data.params["epochs"] == "2"
    assert run.data.params["data_train"] == str(trained["processed"].counts["train"])
    # What ran, not only what was asked: `auto` resolved for this machine; predictions flip-averaged.
    assert run.data.params["effective_precision"] == resolve_precision(CONFIG)
    assert run.data.params["test_time_flip"] == "True"
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert len(history) == 2
    assert run.data.tags[TAG_DATASET] == trained["raw"].dataset_hash
    assert run.data.tags["airflow.run_id"] == "manual__test"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "training_pipeline"


def test_checkpoint_is_in_storage_and_loads_without_pickled_code(trained):
    path = trained["storage"].local_path(f"checkpoints/{trained['train'].run_id}/best.ckpt")
    torch.load(path, map_location="cpu", weights_only=True)
    model = load_checkpoint(str(path))
    images, labels = load_split(trained["processed"], trained["storage"], "val")
    with torch.inference_mode():
        accuracy = (model(torch.from_numpy(images)).argmax(1).numpy() == labels).mean()
    assert accuracy == pytest.approx(trained["train"].metrics["val_accuracy"], abs=1e-4)


def test_best_checkpoint_carries_the_temperature_fitted_on_the_validation_split(trained):
    run_id = trained["train"].run_id
    model = load_checkpoint(str(trained["storage"].local_path(f"checkpoints/{run_id}/best.ckpt")))
    temperature = model.hparams.temperature
    assert tracking_client(trained["settings"]).get_run(run_id).data.metrics["temperature"] == temperature
    images, labels = load_split(trained["processed"], trained["storage"], "val")
    with torch.inference_mode():
        logits = model(torch.from_numpy(images)) * temperature  # undo it: the uncalibrated logits
    labels = torch.from_numpy(labels.astype(np.int64))

    def nll(t):
        return torch.nn.functional.cross_entropy(logits / t, labels).item()

    # The fitted temperature is the likelihood's minimum: better than none, and than its neighbours.
    assert temperature != 1.0 and nll(temperature) < nll(1.0)
    assert nll(temperature) <= min(nll(temperature * 0.9), nll(temperature * 1.1))
    report = tracking_client(trained["settings"]).download_artifacts(run_id, "evaluation/report.json")
    assert json.loads(open(report).read())["calibration"]["temperature"] == temperature


def test_evaluation_is_logged_and_readable(trained):
    evaluation = trained["evaluation"]
    client = tracking_client(trained["settings"])
    run = client.get_run(evaluation.run_id)
    assert run.data.metrics["test_accuracy"] == pytest.approx(evaluation.test_accuracy)
    assert 0.5 < evaluation.test_accuracy <= 1.0
    assert sum(c["support"] for c in evaluation.per_class.values()) == trained["processed"].counts["test"]
    # A cut of Fashion-MNIST's IDX files is not Fashion-MNIST's label files: its classes are its label ids.
    assert trained["processed"].classes == [str(i) for i in range(10)]
    assert "test_f1_0" in run.data.metrics and "test_recall_9" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(evaluation.run_id, "evaluation")}
    assert artifacts == set(ARTIFACTS) == set(evaluation.artifacts)
    png = client.download_artifacts(evaluation.run_id, CONFUSION)
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_registered_version_has_alias_tags_and_predicts_like_the_checkpoint(trained):
    import mlflow

    version = trained["version"]
    settings = trained["settings"]
    client = tracking_client(settings)
    by_alias = client.get_model_version_by_alias(settings.model_for(), "candidate")
    assert str(by_alias.version) == version.version and by_alias.run_id == trained["train"].run_id
    assert by_alias.tags["dataset_hash"] == trained["raw"].dataset_hash
    assert by_alias.tags["validation"] == "passed: raw_dataset, raw_profile"
    assert float(by_alias.tags["test_accuracy"]) == pytest.approx(trained["evaluation"].test_accuracy, abs=1e-4)
    assert client.get_registered_model(settings.model_for()).description
    assert f"Trained by run {version.run_id}" in by_alias.description
    report = {a.path for a in client.list_artifacts(version.run_id, "data_report")}
    assert {"data_report/index.html", "data_report/raw_profile.html", "data_report/validation.json"} <= report

    # The loader every stage uses, with pickles forbidden: the real model is a pickle-free program.
    served = load_registered(f"models:/{settings.model_for()}@candidate")
    images, _ = load_split(trained["processed"], trained["storage"], "test")
    pixels = torch.from_numpy(images[:16, None].astype(np.float32) / 255.0)
    checkpoint = load_checkpoint(str(trained["storage"].local_path(f"checkpoints/{version.run_id}/best.ckpt")))
    with torch.inference_mode():
        expected = torch.softmax(checkpoint(torch.from_numpy(images[:16])), 1)
        assert torch.allclose(served(pixels), expected, atol=1e-5)
    model_info = mlflow.models.get_model_info(f"models:/{settings.model_for()}/{version.version}")
    assert tuple(model_info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 1, 28, 28)


def test_same_data_and_config_reuse_the_run_and_the_version(trained):
    settings, storage = trained["settings"], trained["storage"]
    again = train(trained["processed"], storage, CONFIG, settings)
    assert again.reused and again.run_id == trained["train"].run_id
    evaluation = evaluate(again, trained["processed"], storage, settings)
    version = register(again, evaluation, trained["validation"], trained["processed"], storage, settings)
    assert not version.created and version.version == trained["version"].version
    client = tracking_client(settings)
    assert len(client.search_model_versions(f"name = '{settings.model_for()}'")) == 1


def test_force_trains_and_registers_a_new_version(trained):
    settings, storage = trained["settings"], trained["storage"]
    config = TrainConfig(**SMALL_RECIPE, epochs=1, batch_size=64)
    first = train(trained["processed"], storage, config, settings)
    forced = train(trained["processed"], storage, config, settings, force=True)
    assert not forced.reused and forced.run_id != first.run_id
    evaluation = evaluate(forced, trained["processed"], storage, settings)
    version = register(forced, evaluation, trained["validation"], trained["processed"], storage, settings)
    assert version.created and int(version.version) > int(trained["version"].version)
    client = tracking_client(settings)
    assert str(client.get_model_version_by_alias(settings.model_for(), "candidate").version) == version.version
