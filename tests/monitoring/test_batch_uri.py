"""The batch's URI in the MLflow runs of batch inference and of the drift monitor (the tag
``pipeline.batch_uri``) carries no credentials: the batch is fetched with them, over HTTP on
loopback, and the tag keeps the scheme, host, port, path and query names, with ``***`` for the
password and the token (:func:`pipeline.redact.redact_uri`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from recipes import log_model
from services import RecordingServer
from torch import nn

from pipeline.data.idx import write_idx
from pipeline.monitoring.batch_inference import batch_inference
from pipeline.monitoring.monitor import monitor
from pipeline.registry.register import register_version
from pipeline.tracking import tracking_client

SECRET = "s3cr3t-only-in-this-test"


@pytest.fixture
def served_batch(tmp_path: Path, real_splits):
    """200 real test images and their labels under ``/batch`` of an HTTP server on loopback."""
    folder = tmp_path / "served" / "batch"
    folder.mkdir(parents=True)
    images, labels = real_splits["t10k"]
    write_idx(images[500:700], folder / "images-idx3-ubyte.gz")
    write_idx(labels[500:700], folder / "labels-idx1-ubyte.gz")
    with RecordingServer(folder.parent) as server:
        yield server


def registered(settings, tags: dict[str, str] | None = None) -> None:
    """A small untrained network registered as ``candidate`` (with ``tags`` on the version)."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10), nn.Softmax(dim=1)).eval()
    run_id, model_uri = log_model(settings, net, "pt2")
    register_version(settings, run_id, model_uri, "test", tags=tags)


def with_credentials(url: str) -> tuple[str, str]:
    """The batch's URI with a password and a token, and that URI as the tag must show it."""
    host = url.removeprefix("http://")
    return f"http://reader:{SECRET}@{host}/batch?token={SECRET}", f"http://***@{host}/batch?token=***"


def batch_uri_tag(settings, run_id: str) -> str:
    """The run's ``pipeline.batch_uri``, after checking that no tag of the run holds the secret."""
    tags = tracking_client(settings).get_run(run_id).data.tags
    assert not [key for key, value in tags.items() if SECRET in value]
    return tags["pipeline.batch_uri"]


def test_batch_inference_tags_its_run_with_the_batch_uri_redacted(settings, storage, served_batch):
    registered(settings)
    uri, shown = with_credentials(served_batch.url)
    predicted = batch_inference(uri, storage, settings, alias="candidate")
    assert predicted.images == 200
    assert ("GET", f"/batch/images-idx3-ubyte.gz?token={SECRET}") in served_batch.requests
    assert batch_uri_tag(settings, predicted.run_id) == shown


def test_the_drift_monitor_tags_its_run_with_the_batch_uri_redacted(settings, storage, small_processed, served_batch):
    registered(
        settings,
        {
            "dataset_hash": small_processed.raw.dataset_hash,
            "processed_hash": small_processed.processed.processed_hash,
        },
    )
    uri, shown = with_credentials(served_batch.url)
    result = monitor(uri, storage, settings)
    assert result.batch_size == 200 and result.model_alias == "candidate"
    assert batch_uri_tag(settings, result.run_id) == shown
