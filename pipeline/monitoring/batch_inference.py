"""Batch inference: the ``production`` model over a whole batch of images, into Parquet.

A batch is what :mod:`pipeline.monitoring.monitor` reads: a folder or URI prefix (local, ``file://``,
``http(s)://``, ``s3://``) holding ``images-idx3-ubyte.gz`` and, optionally,
``labels-idx1-ubyte.gz``. The predictions go to
``predictions/<batch_hash>/<model name>/v<version>/predictions.parquet`` in storage, one row per image: ``id``
(its index in the batch file), ``class_id``, ``class_name``, ``probabilities`` (one per class)
and ``model_version``, plus ``label`` when the batch has labels. The same batch and version are
predicted once. A summary (images, predicted class shares, mean confidence, accuracy when
labelled) is logged to an MLflow run of the ``batch_inference`` experiment.

Returns a :class:`BatchPredictions`.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import Settings
from pipeline.errors import ReferenceNotFoundError
from pipeline.redact import redact_uri
from pipeline.refs import DatasetSpec, Ref
from pipeline.storage import Storage

log = logging.getLogger(__name__)

EXPERIMENT = "batch_inference"


@dataclass(frozen=True)
class BatchPredictions(Ref):
    batch_hash: str
    images: int
    predictions_uri: str
    """The Parquet file in storage."""
    model_name: str
    model_version: str
    alias: str
    run_id: str
    """The MLflow run (experiment ``batch_inference``) with the summary."""
    reused: bool = False
    """True when this batch was already predicted by this version."""


def predictions_table(probabilities: np.ndarray, classes: list[str], version: str, labels: np.ndarray | None):
    import pandas as pd

    ids = probabilities.argmax(axis=1)
    table = pd.DataFrame(
        {
            "id": np.arange(len(ids), dtype=np.int64),
            "class_id": ids.astype(np.int64),
            "class_name": [classes[i] for i in ids],
            "probabilities": list(probabilities.astype(np.float32)),
            "model_version": version,
        }
    )
    if labels is not None:
        table["label"] = labels.astype(np.int64)
    return table


def summary(probabilities: np.ndarray, classes: list[str], labels: np.ndarray | None) -> dict[str, float]:
    from pipeline.evaluation.evaluate import metric_key

    ids = probabilities.argmax(axis=1)
    numbers = {"images": float(len(ids)), "mean_confidence": float(probabilities.max(axis=1).mean())}
    for i, name in enumerate(classes):
        numbers[f"share_{metric_key(name)}"] = float((ids == i).mean())
    if labels is not None:
        numbers["accuracy"] = float((ids == labels).mean())
    return numbers


def batch_inference(
    source_uri: str, storage: Storage, settings: Settings, alias: str = "production"
) -> BatchPredictions:
    """Predict every image of the batch at ``source_uri`` with the version behind ``alias``."""
    from pipeline.models.export import predict_probabilities
    from pipeline.models.registered import load_registered, resolve
    from pipeline.monitoring.monitor import fetch_batch
    from pipeline.tracking import experiment_id, tracking_client

    name = settings.model_for()
    try:
        facts = resolve(f"models:/{name}@{alias}", settings)
    except ReferenceNotFoundError as exc:
        raise ReferenceNotFoundError(
            f"model {name}", f"a version with alias {alias}", "none; promote one first"
        ) from exc
    channels, height, width = facts["input_shape"]
    like = DatasetSpec(name, "", channels, height, width, list(facts["classes"]), {})
    images, labels, batch_hash = fetch_batch(source_uri, storage, like=like)
    shape = [1 if images.ndim == 3 else images.shape[3], *images.shape[1:3]]
    if shape != [channels, height, width] or not len(images):
        from pipeline.errors import IdxFormatError

        colour = "grayscale" if channels == 1 else "RGB" if channels == 3 else f"{channels}-channel"
        raise IdxFormatError(
            f"{redact_uri(source_uri.rstrip('/'))}/images-idx3-ubyte.gz",
            f"one or more {width}x{height} {colour} images (version {facts['version']}'s input shape)",
            f"shape {images.shape}",
        )
    version = facts["version"]
    key = f"predictions/{batch_hash}/{name}/v{version}/predictions.parquet"
    client = tracking_client(settings)
    experiment = experiment_id(client, settings, EXPERIMENT)
    done = client.search_runs(
        [experiment],
        f"tags.`pipeline.batch_hash` = '{batch_hash}' and "
        f"tags.model_name = '{name}' and tags.model_version = '{version}' and "
        "attributes.status = 'FINISHED'",
        max_results=1,
    )
    if done and storage.exists(key):
        log.info("batch %s was predicted by version %s already: %s", batch_hash, version, storage.uri(key))
        return BatchPredictions(
            batch_hash=batch_hash,
            images=len(images),
            predictions_uri=storage.uri(key),
            model_name=name,
            model_version=version,
            alias=alias,
            run_id=done[0].info.run_id,
            reused=True,
        )

    probabilities = predict_probabilities(load_registered(f"models:/{name}/{version}"), images)
    table = predictions_table(probabilities, facts["classes"], version, labels)
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    uri = storage.put_bytes(buffer.getvalue(), key)  # atomic: a reader never sees half a file

    numbers = summary(probabilities, facts["classes"], labels)
    run = client.create_run(
        experiment,
        run_name=f"predict-{batch_hash[:8]}-v{version}",
        tags={
            "pipeline.batch_hash": batch_hash,
            "pipeline.batch_uri": redact_uri(source_uri),
            "model_name": name,
            "model_version": version,
            "model_alias": alias,
            "predictions_uri": uri,
        },
    )
    for key_, value in numbers.items():
        client.log_metric(run.info.run_id, key_, value)
    with tempfile.TemporaryDirectory(prefix="batch-summary-") as tmp:
        (Path(tmp) / "summary.json").write_text(
            json.dumps({"predictions_uri": uri, "classes": facts["classes"], **numbers}, indent=2)
        )
        client.log_artifacts(run.info.run_id, tmp, "batch_inference")
    client.set_terminated(run.info.run_id, "FINISHED")
    log.info("batch %s: %d images predicted by %s v%s -> %s", batch_hash, len(images), name, version, uri)
    return BatchPredictions(
        batch_hash=batch_hash,
        images=len(images),
        predictions_uri=uri,
        model_name=name,
        model_version=version,
        alias=alias,
        run_id=run.info.run_id,
    )
