"""Monitor: check a batch of new images against the data the serving model was trained on.

A batch is a folder or URI prefix (local, ``file://``, ``http(s)://``, ``s3://``) holding
``images-idx3-ubyte.gz`` and, optionally, ``labels-idx1-ubyte.gz`` (fetched into
``incoming/<batch_hash>/``), or labelled images in any layout acquisition reads (class folders,
a manifest, an archive of either; acquired into ``raw/<batch_hash>/`` and decoded in the colour
of the model's data). It is checked by the ``incoming_profile`` suite, its bounds (size,
classes) fitted to the model's data (broken data stops here), then compared by :mod:`pipeline.monitoring.drift` with the reference of the ``production`` model, or of
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
from urllib.parse import urlparse

import numpy as np

from pipeline.config import Settings, SourceLimits
from pipeline.data.acquire import dataset_hash, fetch_file
from pipeline.errors import ReferenceNotFoundError, SourceNotFoundError
from pipeline.monitoring.drift import DriftConfig, OutputStatistics, compute_drift, drift_report_html
from pipeline.redact import redact_uri
from pipeline.refs import DatasetSpec, ProcessedDatasetRef, Ref
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


def model_spec(processed: ProcessedDatasetRef) -> DatasetSpec:
    """What a model's training data held (size, channels, classes): what a batch is read as
    and checked against."""
    channels, height, width = processed.image_shape
    return DatasetSpec(processed.dataset_name or "dataset", "", channels, height, width, processed.classes, {})


def fetch_batch(
    source_uri: str, storage: Storage, limits: SourceLimits | None = None, like: DatasetSpec | None = None
) -> tuple[np.ndarray, np.ndarray | None, str]:
    """uint8 images, labels (class ids of ``like``'s classes) or None, and the batch's content
    hash; stored once by content.

    Fetched and read within ``limits`` (default :meth:`SourceLimits.from_env`), as ``acquire``
    and ``validate`` read a dataset: the two IDX files' content together within
    ``max_dataset_bytes``, each header's declared size checked before anything is allocated.
    Images in another layout are acquired and decoded as a dataset is, in ``like``'s colour;
    a size or a class the model does not know is refused in one line naming the batch."""
    from pipeline.data.idx import read_idx
    from pipeline.data.sources import open_source

    limits = limits or SourceLimits.from_env()
    if _holds_image_files(source_uri, limits):
        return _image_batch(source_uri, storage, limits, like)
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


def _holds_image_files(source_uri: str, limits: SourceLimits) -> bool:
    """Whether the batch is images rather than the IDX batch files: it names an archive or a
    manifest, or it is a folder or S3 prefix holding files but not ``images-idx3-ubyte.gz``
    (looked for first, one ``stat`` or ``HEAD``). An HTTP prefix cannot be listed: IDX."""
    from pipeline.data.layouts import MANIFEST_NAMES, is_archive
    from pipeline.data.sources import open_source, split_uri

    _, last = split_uri(source_uri.rstrip("/"))
    if is_archive(last) or last in MANIFEST_NAMES or last.endswith(".parquet"):
        return True
    if urlparse(source_uri).scheme in ("http", "https"):
        return False
    source = open_source(source_uri, limits)
    try:
        source.fingerprint(BATCH_IMAGES)
        return False
    except SourceNotFoundError:
        pass
    try:
        return bool(source.names())
    except SourceNotFoundError:
        return False  # the IDX path names the missing file


def _image_batch(
    source_uri: str, storage: Storage, limits: SourceLimits, like: DatasetSpec | None
) -> tuple[np.ndarray, np.ndarray, str]:
    from pipeline.config import AcquireConfig
    from pipeline.config.settings import ColourMode
    from pipeline.data.acquire import acquire
    from pipeline.data.dataset import load_dataset
    from pipeline.errors import DatasetLayoutError

    colour: ColourMode = "auto" if like is None else "grayscale" if like.channels == 1 else "rgb"
    raw = acquire(AcquireConfig(source_uri=source_uri, colour=colour), storage, limits)
    dataset = load_dataset(raw, storage, limits)
    images = np.concatenate([images for images, _ in dataset.splits.values()])
    ids = np.concatenate([labels for _, labels in dataset.splits.values()])
    if like is None:
        return images, ids, raw.dataset_hash
    where, found = redact_uri(source_uri.rstrip("/")), dataset.spec
    if [found.height, found.width] != [like.height, like.width]:
        raise DatasetLayoutError(
            where, f"{like.width}x{like.height} images like the model's training data", f"{found.width}x{found.height}"
        )
    unknown = [name for name in found.classes if name not in like.classes]
    if unknown:
        raise DatasetLayoutError(
            where, f"classes among the model's ({', '.join(like.classes)})", f"{', '.join(unknown)}"
        )
    to_model = np.array([like.classes.index(name) for name in found.classes], dtype=np.int64)
    return images, to_model[ids], raw.dataset_hash


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
    client = tracking_client(settings)
    try:  # the model's data says what the batch is read as and checked against
        version, alias = reference_version(client, settings.model_for())
        processed: ProcessedDatasetRef | None = load_processed_ref(storage, version.tags["processed_hash"])
    except ReferenceNotFoundError as missing:
        processed, no_model = None, missing  # broken data is still refused first
    spec = model_spec(processed) if processed is not None else None
    images, labels, batch_hash = fetch_batch(source_uri, storage, like=spec)
    profile = profile_table({"incoming": (images, labels if labels is not None else np.zeros(len(images), np.uint8))})
    if labels is None:
        profile["label"] = np.nan
    suite = load_suite("incoming_profile", dataset=spec)
    validation = run_suite(ephemeral_context(), suite, profile, "incoming_profile")
    if not validation.success:
        shown = redact_uri(source_uri.rstrip("/"))
        files = {"incoming_images": f"{shown}/{BATCH_IMAGES}", "incoming_labels": f"{shown}/{BATCH_LABELS}"}
        if not storage.exists(f"incoming/{batch_hash}/{BATCH_IMAGES}"):  # images, not the IDX files
            files = {"incoming_images": shown, "incoming_labels": shown}
        raise failure_error("incoming_profile", validation, profile, files)
    if processed is None:
        raise no_model

    reference = pd.read_parquet(storage.local_path(f"reports/{version.tags['dataset_hash']}/profile.parquet"))
    reference = reference[reference["split"] == "train"]
    test_images, test_labels = load_split(processed, storage, "test")
    model = load_registered(f"models:/{settings.model_for()}/{version.version}")
    report = compute_drift(
        reference,
        profile,
        config,
        reference_outputs=OutputStatistics.from_probabilities(predict_probabilities(model, test_images), test_labels),
        batch_outputs=OutputStatistics.from_probabilities(predict_probabilities(model, images), labels),
    )

    prefix = f"drift/{batch_hash}/v{version.version}"
    title = f"Drift of batch {batch_hash} against {settings.model_for()} v{version.version} ({alias})"
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
        model_name=settings.model_for(),
        model_version=str(version.version),
        model_alias=alias,
        run_id=run.info.run_id,
    )
