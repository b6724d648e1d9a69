"""Loading a registered model runs no code: a pickle-format version is refused everywhere.

An attacker with write access to the registry (the embedded store has no login) logs a model
with ``serialization_format="pickle"`` whose pickle calls a function of their choice on load. The
tests register such a version in a real MLflow store and check that ``pipeline serve``, every
loader (gate, infra validation, the monitor and batch inference share one) and registration refuse
it with one line naming the version and the format, and that the payload never ran.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from recipes import log_model
from services import free_port
from torch import nn

from pipeline.command_lines import serve_command
from pipeline.errors import UnsafeModelError
from pipeline.models.registered import load_registered
from pipeline.registry.register import register_version
from pipeline.tracking import tracking_client


class Payload(nn.Module):
    """A module whose unpickling creates ``marker`` (a stand-in for running a shell command)."""

    def __init__(self, marker: Path) -> None:
        super().__init__()
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def pickled_version(settings, tmp_path: Path) -> tuple[str, Path]:
    """A pickle-format version registered behind the pipeline's back, as an attacker would."""
    import mlflow

    marker = tmp_path / "payload-ran"
    _, model_uri = log_model(settings, Payload(marker), "pickle")
    version = mlflow.register_model(model_uri, settings.model_for()).version
    assert not marker.exists()
    return f"models:/{settings.model_for()}/{version}", marker


def test_finding_pickle_version_runs_code_in_pipeline_serve(settings, pickled_version):
    model_uri, marker = pickled_version
    # Even with MLflow's switch set to allow pickles in the environment, nothing is unpickled.
    out = subprocess.run(
        serve_command(model_uri, port=free_port()),
        capture_output=True,
        text=True,
        env={**os.environ, **settings.to_env(), "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "true"},
        timeout=600,
    )
    assert out.returncode == 2, out.stderr
    error = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and model_uri in error[0] and "pickle" in error[0], out.stderr
    assert "Traceback" not in out.stderr
    assert not marker.exists(), "the pickled payload ran"


def test_finding_pickle_version_refused_by_the_loader_of_gate_infra_validation_and_monitor(settings, pickled_version):
    model_uri, marker = pickled_version
    os.environ.pop("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", None)
    with pytest.raises(UnsafeModelError) as refused:
        load_registered(model_uri)
    assert str(refused.value) == (
        f"{model_uri}: expected a torch.export program (pt2), which loads without running "
        "code, found pickle (data/model.pth)"
    )
    assert refused.value.exit_code == 2
    assert not marker.exists()
    assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"


def test_finding_registration_refuses_a_pickle_format_model(settings, tmp_path):
    marker = tmp_path / "payload-ran"
    run_id, model_uri = log_model(settings, Payload(marker), "pickle")
    with pytest.raises(UnsafeModelError, match="found pickle"):
        register_version(settings, run_id, model_uri, "test")
    client = tracking_client(settings)
    assert client.search_model_versions(f"name = '{settings.model_for()}'") == []
    assert not marker.exists()


def test_a_pt2_program_is_registered_and_loads_with_pickle_forbidden(settings):
    net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10), nn.Softmax(dim=1)).eval()
    run_id, model_uri = log_model(settings, net, "pt2")
    version, created = register_version(settings, run_id, model_uri, "test")
    assert created
    loaded = load_registered(f"models:/{settings.model_for()}/{version}")
    pixels = torch.rand(3, 1, 28, 28)
    with torch.inference_mode():
        assert torch.allclose(loaded(pixels), net(pixels), atol=1e-6)
