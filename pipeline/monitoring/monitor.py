"""Monitor: check a batch of new images against the data the serving model was trained on.

A batch is a folder or URI prefix (local, ``file://``, ``http(s)://``, ``s3://``) holding
``images-idx3-ubyte.gz`` and, optionally, ``labels-idx1-ubyte.gz``. The batch is fetched into
``incoming/<batch_hash>/``, checked by the ``incoming_profile`` suite (broken data stops here),
then compared by :mod:`pipeline.monitoring.drift` with the reference of the ``production`` model, or of
the latest ``candidate`` when nothing is in production yet: the training split's profile and
the model's outputs on the held-out test split against its outputs on the batch.

The drift report (JSON and HTML) is stored under ``drift/<batch_hash>/v<version>/`` and logged
to an MLflow run of the ``drift_monitor`` experiment. Returns a :class:`MonitorResult`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.config import Settings, SourceLimits
from pipeline.data.acquire import dataset_hash, fetch_file
from pipeline.errors import ReferenceNotFoundError, SourceNotFoundError
from pipeline.monitoring.drift import DriftConfig, OutputStatistics, compute_drift, drift_report_html
from pipeline.redact import redact_uri
from pipeline.refs import Ref
from pipeline.storage import Storage

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

BATCH_IMAGES = "images-idx3-ubyte.gz"
BATCH_LABELS = "labels-idx1-ubyte.gz"
REFERENCE_ALIASES = ("production", "candidate")
EXPERIMENT = "drift_monitor"


@dataclass(frozen=True)
class MonitorResult(Ref):
    batch_hash: str
    batch_size: int
    drifted: bool
    reasons: list[str]
    """One line per flag; empty when nothing drifted."""
    report_uri: str
    """The HTML drift report in storage."""
    model_name: str
    model_version: str
    model_alias: str
    """The alias whose version gave the reference (``production``, else ``candidate``)."""
    run_id: str
    """The MLflow run (experiment ``drift_monitor``) holding the report and its numbers."""


def fetch_batch(
    source_uri: str, storage: Storage, limits: SourceLimits | None = None
) -> tuple[np.ndarray, np.ndarray | None, str]:
    """uint8 images, labels or None, and the batch's content hash; stored once by content.

    Fetched and read within ``limits`` (default :meth:`SourceLimits.from_env`), as ``acquire``
    and ``validate`` read a dataset: the two files' content together within
    ``max_dataset_bytes``, each header's declared size checked before anything is allocated."""
    from pipeline.data.idx import read_idx
    from pipeline.data.sources import open_source

    limits = limits or SourceLimits.from_env()
    source = open_source(source_uri, limits)
    source.fingerprint(BATCH_IMAGES)  # fails early, with the file's name, if there are no images
    try:
        source.fingerprint(BATCH_LABELS)
        names = [BATCH_IMAGES, BATCH_LABELS]
    except SourceNotFoundError:
        names = [BATCH_IMAGES]
    with tempfile.TemporaryDirectory(prefix="batch-") as staging:
        files, budget = {}, limits.max_dataset_bytes
        for name in names:
            files[name] = fetch_file(source, name, Path(staging) / name, limits, budget)
            budget -= files[name]["content_size"]
        digest = dataset_hash({name: info["content_sha256"] for name, info in files.items()})
        for name in names:
            if not storage.exists(f"incoming/{digest}/{name}"):
                storage.put_file(Path(staging) / name, f"incoming/{digest}/{name}")
        images = read_idx(
            Path(staging) / BATCH_IMAGES, ndim=3, dtype=np.dtype(np.uint8), max_bytes=limits.max_dataset_bytes
        )
        labels = None
        if BATCH_LABELS in files:
            labels = read_idx(
                Path(staging) / BATCH_LABELS,
                ndim=1,
                dtype=np.dtype(np.uint8),
                max_bytes=max(1, limits.max_dataset_bytes - images.nbytes),
            )
    if labels is not None and len(labels) != len(images):
        from pipeline.errors import IdxFormatError

        raise IdxFormatError(source.file_uri(BATCH_LABELS), f"{len(images)} labels", f"{len(labels)}")
    return images, labels, digest


def reference_version(client: MlflowClient, model_name: str) -> tuple[Any, str]:
    """The version drift is measured against: ``production``, else ``candidate``."""
    from mlflow.exceptions import MlflowException

    for alias in REFERENCE_ALIASES:
        try:
            return client.get_model_version_by_alias(model_name, alias), alias
        except MlflowException:
            continue
    raise ReferenceNotFoundError(
        f"model {model_name}", "a version with alias production or candidate", "none; train a model first"
    )


def monitor(source_uri: str, storage: Storage, settings: Settings, config: DriftConfig | None = None) -> MonitorResult:
    """Validate a batch of new images and measure its drift from the serving model's data."""
    import pandas as pd

    from pipeline.data.expectations import ephemeral_context, failure_error, load_suite, run_suite
    from pipeline.data.processed import load_processed_ref, load_split
    from pipeline.data.profile import profile_table
    from pipeline.models.export import predict_probabilities
    from pipeline.models.registered import load_registered
    from pipeline.tracking import experiment_id, tracking_client

    config = config or DriftConfig()
    images, labels, batch_hash = fetch_batch(source_uri, storage)
    profile = profile_table({"incoming": (images, labels if labels is not None else np.zeros(len(images), np.uint8))})
    if labels is None:
        profile["label"] = np.nan
    validation = run_suite(ephemeral_context(), load_suite("incoming_profile"), profile, "incoming_profile")
    if not validation.success:
        shown = redact_uri(source_uri.rstrip("/"))
        files = {"incoming_images": f"{shown}/{BATCH_IMAGES}", "incoming_labels": f"{shown}/{BATCH_LABELS}"}
        raise failure_error("incoming_profile", validation, profile, files)

    client = tracking_client(settings)
    version, alias = reference_version(client, settings.model_name)
    reference = pd.read_parquet(storage.local_path(f"reports/{version.tags['dataset_hash']}/profile.parquet"))
    reference = reference[reference["split"] == "train"]
    processed = load_processed_ref(storage, version.tags["processed_hash"])
    test_images, test_labels = load_split(processed, storage, "test")
    model = load_registered(f"models:/{settings.model_name}/{version.version}")
    report = compute_drift(
        reference,
        profile,
        config,
        reference_outputs=OutputStatistics.from_probabilities(predict_probabilities(model, test_images), test_labels),
        batch_outputs=OutputStatistics.from_probabilities(predict_probabilities(model, images), labels),
    )

    prefix = f"drift/{batch_hash}/v{version.version}"
    title = f"Drift of batch {batch_hash} against {settings.model_name} v{version.version} ({alias})"
    page = drift_report_html(report, title)
    storage.put_json(report.to_dict(), f"{prefix}/report.json")
    report_uri = storage.put_bytes(page.encode(), f"{prefix}/report.html")

    run = client.create_run(
        experiment_id(client, settings, EXPERIMENT),
        run_name=f"drift-{batch_hash[:8]}",
        tags={
            "pipeline.batch_hash": batch_hash,
            "pipeline.batch_uri": redact_uri(source_uri),
            "drifted": str(report.drifted).lower(),
            "model_version": str(version.version),
            "model_alias": alias,
        },
    )
    metrics = {f"psi_{name}": values["psi"] for name, values in report.features.items()}
    if report.labels:
        metrics["label_distance"] = report.labels["distance"]
    for key, value in (report.outputs or {}).items():
        if isinstance(value, float):
            metrics[key] = value
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, float(value))
    with tempfile.TemporaryDirectory(prefix="drift-") as tmp:
        (Path(tmp) / "report.html").write_text(page)
        (Path(tmp) / "report.json").write_text(json.dumps(report.to_dict(), indent=2))
        client.log_artifacts(run.info.run_id, tmp, "drift_report")
    client.set_terminated(run.info.run_id, "FINISHED")
    log.info("drift report: %s (%s)", report_uri, "; ".join(report.reasons) or "no drift")
    return MonitorResult(
        batch_hash=batch_hash,
        batch_size=len(images),
        drifted=report.drifted,
        reasons=report.reasons,
        report_uri=report_uri,
        model_name=settings.model_name,
        model_version=str(version.version),
        model_alias=alias,
        run_id=run.info.run_id,
    )
