"""Registered model versions: what the registry says about one, and loading it safely."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from pipeline.models.onnx_runtime import OnnxClassifier

from pipeline.config import FASHION_MNIST_CLASSES, FASHION_MNIST_SHAPE, Settings
from pipeline.errors import ReferenceNotFoundError

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


PT2_FILE = "model.pt2"
"""The file of a torch.export program inside a logged model's ``data/`` folder."""


def forbid_pickle() -> None:
    """Make MLflow refuse pickled models in this process and its children.

    MLflow 3 defaults ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION`` to true, which lets whoever can
    write to the registry run code on every machine that loads a model. With it false, MLflow's
    own loader also checks that a pt2 archive holds no pickled record.
    """
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"


def model_format(model_dir: Path) -> str:
    """``pt2`` for a torch.export program; otherwise what the logged model holds instead."""
    data = model_dir / "data"
    if not (model_dir / "MLmodel").is_file():
        return "no MLmodel file"
    if (data / PT2_FILE).is_file() and not (data / "model.pth").exists():
        return "pt2"
    if (data / "model.pth").exists():
        return "pickle (data/model.pth)"
    return "no torch.export program (data/model.pt2)"


def _download_checked(model_uri: str, into: str) -> Path:
    from mlflow.artifacts import download_artifacts

    from pipeline.errors import UnsafeModelError

    local = Path(download_artifacts(artifact_uri=model_uri, dst_path=into))
    found = model_format(local)
    if found != "pt2":
        raise UnsafeModelError(model_uri, "a torch.export program (pt2), which loads without running code", found)
    return local


def require_loadable_format(model_uri: str) -> None:
    """Raise :class:`~pipeline.errors.UnsafeModelError` unless ``model_uri`` is a pt2 program."""
    with tempfile.TemporaryDirectory(prefix="model-check-") as tmp:
        _download_checked(model_uri, tmp)


def load_registered(model_uri: str) -> nn.Module:
    """A registered model (``models:/<name>/<version>`` or ``models:/<name>@<alias>``) on the CPU.

    Only torch.export programs (pt2) load: a pickle-format version (which would run whatever code
    its pickle names) is refused with :class:`~pipeline.errors.UnsafeModelError` before anything
    is deserialised, and MLflow's pickle switch is off for anything else.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.errors import UnsafeModelError

    forbid_pickle()
    with tempfile.TemporaryDirectory(prefix="model-") as tmp:
        local = _download_checked(model_uri, tmp)
        try:
            return mlflow.pytorch.load_model(str(local), map_location="cpu")
        except MlflowException as exc:
            if "pickle" not in str(exc):
                raise
            first = str(exc).split(". ")[0]
            raise UnsafeModelError(model_uri, "a pt2 program free of pickled records", first) from exc


def resolve(model_uri: str, settings: Settings) -> dict[str, Any]:
    """The registry's facts about ``models:/<name>/<version>`` or ``models:/<name>@<alias>``."""
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import tracking_client

    match = MODEL_URI.match(model_uri)
    if not match:
        raise ReferenceNotFoundError(
            "--model-uri", "models:/<name>/<version> or models:/<name>@<alias>", repr(model_uri)
        )
    client = tracking_client(settings)
    try:
        if match["alias"]:
            version = client.get_model_version_by_alias(match["name"], match["alias"])
        else:
            version = client.get_model_version(match["name"], match["version"])
    except MlflowException as exc:
        raise ReferenceNotFoundError(model_uri, "a registered model version", "none") from exc
    return {
        "model_name": version.name,
        "version": str(version.version),
        "alias": match["alias"],
        "run_id": version.run_id,
        "dataset_hash": version.tags.get("dataset_hash"),
        "processed_hash": version.tags.get("processed_hash"),
        # Registered with the version; versions registered before that were all Fashion-MNIST.
        "classes": json.loads(version.tags["classes"]) if "classes" in version.tags else list(FASHION_MNIST_CLASSES),
        "input_shape": json.loads(version.tags["input_shape"])
        if "input_shape" in version.tags
        else list(FASHION_MNIST_SHAPE),
    }


def variant_tag(variant: str, key: str) -> str:
    """The version tag holding ``key`` of an exported ``variant`` (``export.onnx_int8.verdict``;
    written by :mod:`pipeline.registry.export`)."""
    return f"export.{variant}.{key}"


def load_variant(
    name: str, version: str, runtime: str, settings: Settings, threads: int | None = None
) -> OnnxClassifier:
    """Version ``version`` of ``name`` as its ONNX (``runtime`` ``onnx``) or INT8 (``onnx-int8``)
    variant on ONNX Runtime, if it passed its checks at export; else
    :class:`~pipeline.errors.ReferenceNotFoundError` says what its verdict was."""
    from pipeline.models.onnx_runtime import OnnxClassifier
    from pipeline.tracking import tracking_client

    variant = runtime.replace("-", "_")
    client = tracking_client(settings)
    found = client.get_model_version(name, version)
    verdict = found.tags.get(variant_tag(variant, "verdict"))
    if verdict != "passed":
        raise ReferenceNotFoundError(
            f"{name} version {version}", f"an {variant} variant that passed its checks", verdict or "none exported"
        )
    with tempfile.TemporaryDirectory(prefix="variant-") as tmp:
        path = client.download_artifacts(str(found.run_id), found.tags[variant_tag(variant, "artifact")], tmp)
        return OnnxClassifier(Path(path).read_bytes(), threads=threads)
