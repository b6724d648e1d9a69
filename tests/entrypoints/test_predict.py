"""``pipeline predict``, the edge package: an exported ONNX model classifies real Fashion-MNIST
images from files and folders in a process where torch cannot be imported, with the classes the
serving endpoint gives for the same PNGs; a wrong image is one line naming it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import FASHION_MNIST_CLASSES
from pipeline.models.export import ServingModel
from pipeline.models.networks import build_network
from pipeline.models.onnx_variants import export_onnx
from pipeline.registry.export import signature

PIPELINE = str(Path(sys.executable).parent / "pipeline")
#: Imported first by the child interpreter: beside the standard library, only the edge
#: package's own dependencies may load (onnxruntime with its protobuf, flatbuffers and
#: packaging; numpy; pillow); torch, MLflow, Airflow and the rest fail as if not installed.
EDGE_ONLY = """
import importlib.abc, sys

ALLOWED = {"pipeline", "numpy", "onnxruntime", "PIL", "google", "flatbuffers", "packaging", "_distutils_hack"}

class EdgeOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in sys.stdlib_module_names or top in ALLOWED or top.startswith(("__editable__", "_")):
            return None
        raise ImportError(f"{name} is not installed on this device")

sys.meta_path.insert(0, EdgeOnly())
"""


@pytest.fixture(scope="module")
def edge(tmp_path_factory, small_splits):
    """An exported model (a seeded simple_cnn, as export writes it: model.onnx beside its
    signature.json), the torch module it came from, and 40 real test images as PNG files."""
    from PIL import Image

    root = tmp_path_factory.mktemp("edge")
    torch.manual_seed(0)
    module = ServingModel(build_network("simple_cnn"), 0.286, 0.353).eval()
    images = small_splits["t10k"][0][:40]
    (root / "onnx").mkdir()
    model = export_onnx(module, images[:4, None].astype(np.float32) / 255, root / "onnx" / "model.onnx")
    (root / "onnx" / "signature.json").write_text(json.dumps(signature([1, 28, 28], list(FASHION_MNIST_CLASSES))))
    files = []
    for i, image in enumerate(images):
        folder = root / "images" / ("a" if i < 20 else "b/c")  # a folder, searched recursively
        folder.mkdir(parents=True, exist_ok=True)
        files.append(folder / f"{i:02d}.png")
        Image.fromarray(image).save(files[-1])
    blocker = root / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(EDGE_ONLY)
    return {"model": model, "module": module, "files": files, "root": root, "blocker": blocker}


def predict(edge, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(edge["blocker"])}
    return subprocess.run(
        [PIPELINE, "predict", "--onnx-model", str(edge["model"]), *args], capture_output=True, text=True, env=env
    )


def test_without_torch_it_gives_the_classes_the_server_gives(edge):
    from fastapi.testclient import TestClient

    from pipeline.serving.app import create_app
    from pipeline.serving.slot import ModelSlot, ServedModel

    out = predict(edge, str(edge["root"] / "images"), "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    predictions = json.loads(out.stdout)["predictions"]
    assert [p["file"] for p in predictions] == [str(f) for f in edge["files"]]  # sorted, subfolders too

    slot = ModelSlot("models:/m/1")
    metadata = {"model_name": "m", "version": "1", "classes": list(FASHION_MNIST_CLASSES), "input_shape": [1, 28, 28]}
    slot.swap(ServedModel(edge["module"], metadata))
    with TestClient(create_app(slot)) as client:
        for prediction, file in zip(predictions, edge["files"], strict=True):
            answer = client.post("/predict", content=file.read_bytes(), headers={"content-type": "image/png"})
            [served] = answer.json()["predictions"]
            assert (prediction["class_id"], prediction["class_name"]) == (served["class_id"], served["class_name"])
            assert prediction["probability"] == pytest.approx(served["probabilities"][served["class_id"]], abs=1e-5)

    # The blocker works: the same interpreter set-up cannot import torch.
    probe = subprocess.run(
        [sys.executable, "-c", "import torch"], capture_output=True, text=True, env={"PYTHONPATH": str(edge["blocker"])}
    )
    assert probe.returncode == 1 and "torch is not installed on this device" in probe.stderr


def test_human_output_is_one_line_per_image(edge):
    out = predict(edge, str(edge["files"][0]), str(edge["files"][1]))
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(edge["files"][0]), str(edge["files"][1])]
    assert all(line.split("\t")[1] in FASHION_MNIST_CLASSES for line in lines)


def test_an_image_of_another_size_or_no_image_at_all_is_one_line_naming_it(edge, tmp_path):
    from PIL import Image

    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(big)
    out = predict(edge, str(big))
    assert out.returncode == 2 and out.stderr.strip() == (
        f"error: {big}: expected a 28x28 image (the model's input), found 32x32"
    )
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    out = predict(edge, str(fake))
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert out.stderr.startswith(
        f"error: {fake}: expected an image file the model can read, found UnidentifiedImageError"
    )
    out = predict(edge, str(tmp_path / "missing"))
    assert out.returncode == 2 and "expected an image file or a folder of them, found nothing there" in out.stderr
