"""Settings from the environment and the one conversion from Params/flags to typed config."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import Settings, TrainConfig, run_config_from_params
from pipeline.errors import ConfigError


def test_embedded_defaults_live_under_one_folder(tmp_path):
    settings = Settings.from_env({"PIPELINE_HOME": str(tmp_path)})
    assert settings.storage_uri == str(tmp_path / "storage")
    assert settings.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert settings.artifact_root == (tmp_path / "mlartifacts").as_uri()


def test_standard_variables_win():
    env = {
        "PIPELINE_HOME": "/x",
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "PIPELINE_STORAGE_URI": "s3://b/p",
        "PIPELINE_MODEL_NAME": "m",
        "PIPELINE_SOURCE_URI": "s3://d/fashion",
    }
    settings = Settings.from_env(env)
    assert (settings.tracking_uri, settings.storage_uri, settings.model_name, settings.source_uri) == (
        "http://mlflow:5000",
        "s3://b/p",
        "m",
        "s3://d/fashion",
    )


def test_default_home_is_the_gitignored_runtime_folder():
    home = Settings.from_env({}).home
    assert home.name == ".runtime" and (home.parent / "pyproject.toml").is_file()
    assert "/.runtime/" in (Path(home.parent) / ".gitignore").read_text()


def test_params_become_typed_config():
    config = run_config_from_params(
        {
            "source_uri": "http://h/d",
            "epochs": 3,
            "batch_size": "64",
            "learning_rate": 0.01,
            "sample_cap": None,
            "architecture": "seed_cnn",
            "force": True,
            "seed": 1,
        }
    )
    assert config.acquire.source_uri == "http://h/d"
    assert (config.train.epochs, config.train.batch_size, config.train.architecture) == (3, 64, "seed_cnn")
    assert config.preprocess.sample_cap is None and config.force and config.preprocess.seed == 1


def test_empty_source_falls_back_to_the_settings():
    settings = Settings.from_env({"PIPELINE_SOURCE_URI": "/data/fashion"})
    assert run_config_from_params({"source_uri": None}, settings).acquire.source_uri == "/data/fashion"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            {"architecture": "resnet999"},
            "architecture: expected one of ['resnet_deep', 'resnet_small', 'resnet_wide', 'resnet_large', 'simple_cnn', 'seed_cnn'], found 'resnet999'",
        ),
        ({"epochs": 0}, "epochs: expected an integer in [1, 200], found 0"),
        ({"learning_rate": -1}, "learning_rate: expected a number in (0, 1], found -1.0"),
        ({"learning_rate": 0}, "learning_rate: expected a number in (0, 1], found 0.0"),
        ({"gate_min_accuracy": 1.5}, "gate_min_accuracy: expected a number in [0, 1], found 1.5"),
        ({"sample_cap": 10}, "sample_cap: expected an integer >= 100 or empty, found 10"),
        ({"epochs": 2.5}, "epochs: expected an integer in [1, 200], found 2.5"),
        ({"batch_size": "many"}, "batch_size: expected an integer, found 'many'"),
        ({"force": "yes"}, "force: expected true or false, found 'yes'"),
        ({"expected_sha256": "abc"}, 'expected_sha256: expected {"file name": "sha256"}, found \'abc\''),
    ],
)
def test_bad_params_name_the_field(params, message):
    with pytest.raises(ConfigError) as info:
        run_config_from_params(params, Settings.from_env({}))
    assert str(info.value).startswith(message)


def test_train_config_fingerprint_follows_the_values():
    assert TrainConfig().fingerprint() == TrainConfig().fingerprint()
    assert TrainConfig(epochs=3).fingerprint() != TrainConfig().fingerprint()


@pytest.mark.parametrize(
    ("source", "name"),
    [
        ("/usr/share/datasets/fashion-mnist", "fashion-mnist"),
        ("/data/photos/", "photos"),
        ("file:///data/digits/labels.csv", "digits"),
        ("s3://team/datasets/flowers.tar.gz", "flowers"),
        ("https://example.org/sets/pets.zip?sig=x", "pets"),
        ("s3://shoes", "shoes"),
        ("http://127.0.0.1:8000", "127.0.0.1"),
    ],
)
def test_the_registered_model_is_named_after_the_dataset_unless_set(source, name):
    assert Settings.from_env({"PIPELINE_SOURCE_URI": source}).model_for() == f"{name}-classifier"
    assert Settings.from_env({"PIPELINE_SOURCE_URI": source}).model_for("cats") == "cats-classifier"
    named = Settings.from_env({"PIPELINE_SOURCE_URI": source, "PIPELINE_MODEL_NAME": "prod-model"})
    assert named.model_for() == named.model_for("cats") == "prod-model"
