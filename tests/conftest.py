"""Shared fixtures: real Fashion-MNIST files, small real subsets cut from them, and a pipeline
home (storage + MLflow store) per test in ``tmp_path``.

Airflow reads its configuration when first imported, so its home (a throwaway SQLite metadata
DB) and this checkout's DAG folder are set here, before any test module imports Airflow.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from defects import write_dataset
from recipes import Prepared, prepare_small

ROOT = Path(__file__).resolve().parent.parent
SMALL_TRAIN, SMALL_TEST = 2000, 500


def pytest_configure(config: pytest.Config) -> None:
    airflow_home = Path(tempfile.mkdtemp(prefix="pytest-airflow-home-"))
    os.environ.update(
        {
            "AIRFLOW_HOME": str(airflow_home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "GX_ANALYTICS_ENABLED": "False",
        }
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("requires_gpu"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip("requires_gpu: no CUDA device on this machine")


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """Airflow's metadata DB (SQLite in the throwaway AIRFLOW_HOME set by :func:`pytest_configure`)."""
    home = Path(os.environ["AIRFLOW_HOME"])
    airflow = Path(sys.executable).parent / "airflow"
    out = subprocess.run([str(airflow), "db", "migrate"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return home / "airflow.db"


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    """The real Fashion-MNIST files (Debian's package, or the download scripts/get_dataset.sh made)."""
    out = subprocess.run([str(ROOT / "scripts" / "get_dataset.sh")], capture_output=True, text=True)
    assert out.returncode == 0, f"the dataset is needed for the tests: {out.stderr}"
    return Path(out.stdout.strip())


@pytest.fixture(scope="session")
def real_splits(fashion_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from pipeline.data.idx import read_split

    return {
        "train": read_split(fashion_dir / "train-images-idx3-ubyte.gz", fashion_dir / "train-labels-idx1-ubyte.gz"),
        "t10k": read_split(fashion_dir / "t10k-images-idx3-ubyte.gz", fashion_dir / "t10k-labels-idx1-ubyte.gz"),
    }


@pytest.fixture(scope="session")
def small_splits(real_splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The first 2,000 training and 500 test images of the real files."""
    (xtr, ytr), (xte, yte) = real_splits["train"], real_splits["t10k"]
    return {"train": (xtr[:SMALL_TRAIN], ytr[:SMALL_TRAIN]), "t10k": (xte[:SMALL_TEST], yte[:SMALL_TEST])}


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory, small_splits) -> Path:
    """A folder named ``fashion-mnist`` (so its runs register the default model name) with the
    small real subset as the four gzip IDX files."""
    return write_dataset(tmp_path_factory.mktemp("small") / "fashion-mnist", small_splits)


#: Variables that would point a test's pipeline away from its own home.
STORE_VARIABLES = (
    "PIPELINE_STORAGE_URI",
    "MLFLOW_TRACKING_URI",
    "PIPELINE_ARTIFACT_ROOT",
    "PIPELINE_SOURCE_URI",
    "PIPELINE_MODEL_NAME",
    "PIPELINE_EXPERIMENT",
)


def use_home(mp: pytest.MonkeyPatch, home: Path) -> Path:
    """Point the pipeline at ``home`` alone: local storage and a SQLite MLflow store under it."""
    mp.setenv("PIPELINE_HOME", str(home))
    for name in STORE_VARIABLES:
        mp.delenv(name, raising=False)
    return home


@pytest.fixture
def pipeline_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh embedded pipeline home for one test."""
    return use_home(monkeypatch, tmp_path / "home")


@pytest.fixture(scope="module")
def module_settings(tmp_path_factory: pytest.TempPathFactory):
    """A fresh embedded pipeline home shared by one module's tests (for expensive set-ups)."""
    from pipeline.config import Settings

    with pytest.MonkeyPatch.context() as mp:
        use_home(mp, tmp_path_factory.mktemp("home"))
        yield Settings.from_env()


@pytest.fixture
def settings(pipeline_home: Path):
    from pipeline.config import Settings

    return Settings.from_env()


@pytest.fixture
def storage(settings):
    from pipeline.storage import storage_for

    return storage_for(settings)


@pytest.fixture
def small_processed(small_dataset: Path, storage) -> Prepared:
    """The small real subset, processed in this test's own pipeline home."""
    return prepare_small(storage, small_dataset)
