"""Register: log the trained model with ``mlflow.pytorch`` and add it to the model registry.

The logged model is :class:`~pipeline.models.export.ServingModel` (pixels in [0, 1] in, class
probabilities out) with a signature and a real input example. The version carries lineage tags
(dataset hash, processed-data hash, code version, run id, validation outcome, test accuracy) and
gets the alias ``candidate`` (aliases, not the deprecated stages), a move recorded in the
promotion history (``pipeline.registry.promote``). Its description is the evaluation's model card. A run
that already has a version is not registered twice: the existing version is returned.

Returns a :class:`~pipeline.refs.ModelVersionRef`.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

import numpy as np

from pipeline.config import Settings
from pipeline.errors import ReferenceNotFoundError
from pipeline.refs import EvaluationResult, ModelVersionRef, ProcessedDatasetRef, TrainResult, ValidationRef
from pipeline.registry.history import CANDIDATE, cli_actor
from pipeline.registry.lock import registry_lock
from pipeline.registry.promote import move_alias
from pipeline.storage import Storage
from pipeline.tracking import TAG_CODE, tracking_client

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

DATA_REPORT = "data_report"
DESCRIPTION_LIMIT = 5000
"""Characters a version description may hold in MLflow's SQL stores (PostgreSQL enforces it)."""
MODEL_CARD = "evaluation/model_card.md"  # written by pipeline.evaluation.evaluate


def model_description(processed: ProcessedDatasetRef) -> str:
    """The registered model's description, from the data its first version was trained on."""
    channels, height, width = processed.image_shape
    return (
        f"Image classifier trained by the training_pipeline DAG. Input: float32 pixels in [0, 1], shape "
        f"(n, {channels}, {height}, {width}). Output: probabilities of the {len(processed.classes)} classes "
        f"({', '.join(processed.classes)}). Saved as a torch.export program (pt2): loading needs torch only "
        "and runs no pickled code. Aliases: candidate (newest registered), staging, production."
    )


def _logged_model_uri(client: object, trained: TrainResult, processed: ProcessedDatasetRef, storage: Storage) -> str:
    """The run's logged model (``models:/<model_id>``), logged now unless an earlier attempt did.

    Logging and registering are two steps so that a retry after a failed registration does not
    log (and export) the model a second time.
    """
    import mlflow
    import torch
    from mlflow.entities import LoggedModelStatus
    from mlflow.models import infer_signature

    from pipeline.data.processed import load_split
    from pipeline.models.classifier import load_checkpoint
    from pipeline.models.export import export_for_serving, to_pixels

    experiment = client.get_run(trained.run_id).info.experiment_id  # type: ignore[attr-defined]
    # Status is checked here, not in the filter: a PostgreSQL-backed MLflow server stores it as
    # an integer and rejects `status = 'READY'` (SQLite lets the comparison through).
    found = client.search_logged_models(  # type: ignore[attr-defined]
        [experiment],
        filter_string=f"source_run_id = '{trained.run_id}' AND name = 'model'",
    )
    ready = [model for model in found if model.status == LoggedModelStatus.READY]
    if ready:
        return f"models:/{ready[0].model_id}"
    model = export_for_serving(load_checkpoint(str(storage.local_path(f"checkpoints/{trained.run_id}/best.ckpt"))))
    images, _ = load_split(processed, storage, "test")
    example = to_pixels(images[:4])
    with torch.inference_mode():
        output = model(torch.from_numpy(example)).numpy()
    with mlflow.start_run(run_id=trained.run_id):
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            signature=infer_signature(example, output),
            input_example=example,
            # Stated rather than inferred: inference loads the model in a subprocess (slow).
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"],
            # A torch.export program: loading runs no pickled code and needs torch, not this package.
            serialization_format="pt2",
        )
    return info.model_uri


def register_version(
    settings: Settings,
    run_id: str,
    model_uri: str,
    actor: str,
    tags: dict[str, str] | None = None,
    description: str = "",
) -> tuple[str, bool]:
    """The registry version of ``run_id`` (created from ``model_uri`` unless it exists), with its
    ``tags`` (and ``description`` when new), then the alias ``candidate`` moved to it as a
    recorded move. Returns (version, created).

    Safe to call from several processes at once: MLflow numbers versions in one transaction per
    version, and the alias move takes the registry lock (``pipeline.registry.promote``).
    """
    import mlflow

    from pipeline.models.registered import require_loadable_format

    client = tracking_client(settings)
    name = settings.model_for()
    # Under the lock: two attempts for one run (a retry beside a zombie, the CLI beside the DAG)
    # must not both find nothing and both register.
    with registry_lock(client, name, actor):
        version = _version_of_run(client, name, run_id)
        created = version is None
        if created:
            require_loadable_format(model_uri)  # a pickle would run code wherever it is loaded
            registered = mlflow.register_model(model_uri, name)
            # Not always the version it returns: creating one is not idempotent, and when the
            # server's answer was lost, the client's retry created a second (MLflow retries every
            # method).
            version = _version_of_run(client, name, run_id) or str(registered.version)
    assert version is not None  # found, or just created
    for key, value in (tags or {}).items():
        client.set_model_version_tag(name, version, key, value)
    if description and (created or not client.get_model_version(name, version).description):
        client.update_model_version(name, version, description=description)
    # Last: whoever follows `candidate` finds the version complete. Forward only: a rerun that
    # reused an old training does not take `candidate` back from a newer version.
    move_alias(settings, CANDIDATE, version, "register", actor, f"registered from run {run_id}", forward_only=True)
    return version, created


def _version_of_run(client: MlflowClient, name: str, run_id: str) -> str | None:
    """The run's registry version: its first. Later ones from the same source that no alias
    points at are duplicates (a creation retried after its answer was lost) and are deleted, so
    that a run has one version whatever the network did."""
    found = sorted(
        client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"), key=lambda v: int(v.version)
    )
    if not found:
        return None
    for extra in found[1:]:
        if extra.source == found[0].source and not client.get_model_version(name, extra.version).aliases:
            log.warning(
                "%s version %s duplicates version %s of run %s (a retried creation): deleted",
                name,
                extra.version,
                found[0].version,
                run_id,
            )
            client.delete_model_version(name, extra.version)
    return str(found[0].version)


def _log_data_report(client: object, run_id: str, validation: ValidationRef, storage: Storage) -> None:
    """Keep the data report (GX Data Docs pages and results) with the run, under ``data_report/``."""
    import tempfile
    from pathlib import Path

    prefix = validation.report_prefix
    with tempfile.TemporaryDirectory(prefix="data-report-") as tmp:
        for name in ("index.html", *(f"{suite}.html" for suite in validation.suites), "validation.json"):
            (Path(tmp) / name).write_bytes(storage.get_bytes(f"{prefix}/{name}"))
        client.log_artifacts(run_id, tmp, DATA_REPORT)  # type: ignore[attr-defined]


def fit_description(card: str, tail: str = "", run_id: str = "") -> str:
    """``card`` followed by ``tail`` within :data:`DESCRIPTION_LIMIT`: the card is cut (with a
    pointer to the whole one in the run) rather than the tail (the gate's verdict)."""
    if len(card) + len(tail) <= DESCRIPTION_LIMIT:
        return card + tail
    pointer = f"\n\n... (cut to fit the registry; the whole card is {MODEL_CARD} in run {run_id})"
    return card[: DESCRIPTION_LIMIT - len(tail) - len(pointer)] + pointer + tail


def version_description(
    client: object, trained: TrainResult, evaluation: EvaluationResult, validation: ValidationRef
) -> str:
    """The model card the evaluation wrote (Markdown, shown on the version's page), else a summary."""
    import tempfile
    from pathlib import Path

    from mlflow.exceptions import MlflowException

    header = (
        f"Trained by run {trained.run_id} on dataset {trained.dataset_hash} (processed {trained.processed_hash}); "
        f"test accuracy {evaluation.test_accuracy:.4f}, macro F1 {evaluation.macro_f1:.4f}. "
        f"Data report: {validation.report_uri}"
    )
    with tempfile.TemporaryDirectory(prefix="model-card-") as tmp:
        try:
            card = Path(client.download_artifacts(trained.run_id, MODEL_CARD, tmp)).read_text()  # type: ignore[attr-defined]
        except (MlflowException, OSError) as exc:
            raise ReferenceNotFoundError(
                f"run {trained.run_id}",
                f"the model card {MODEL_CARD} that evaluate writes",
                "none; evaluate the run first",
            ) from exc
    return fit_description(f"{header}\n\n{card}", "", trained.run_id)


def register(
    trained: TrainResult,
    evaluation: EvaluationResult,
    validation: ValidationRef,
    processed: ProcessedDatasetRef,
    storage: Storage,
    settings: Settings,
    actor: str | None = None,
) -> ModelVersionRef:
    """Register the run's model (once) and point the ``candidate`` alias at it; ``actor`` (the DAG
    run, else ``user@host``) goes into the promotion history."""
    settings = settings.for_model(settings.model_for(processed.dataset_name))
    client = tracking_client(settings)
    name = settings.model_name
    if not client.search_model_versions(f"name = '{name}' and run_id = '{trained.run_id}'"):
        _log_data_report(client, trained.run_id, validation, storage)
    model_uri = _logged_model_uri(client, trained, processed, storage)
    run_tags = client.get_run(trained.run_id).data.tags
    tags = {
        "dataset_hash": trained.dataset_hash,
        "processed_hash": trained.processed_hash,
        "train_config_hash": trained.config_hash,
        "code_version": run_tags.get(TAG_CODE, "unknown"),
        "run_id": trained.run_id,
        "validation": "passed: " + ", ".join(sorted(s for s, ok in validation.suites.items() if ok)),
        "data_report": validation.report_uri,
        "test_accuracy": f"{evaluation.test_accuracy:.4f}",
        "classes": json.dumps(list(processed.classes)),
        "input_shape": json.dumps(list(processed.image_shape)),
    }
    description = version_description(client, trained, evaluation, validation)
    version, created = register_version(settings, trained.run_id, model_uri, actor or cli_actor(), tags, description)
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, description=model_description(processed))
    log.info("%s version %s (%s) has alias %s", name, version, "new" if created else "existing", CANDIDATE)
    return ModelVersionRef(
        model_name=name,
        version=version,
        alias=CANDIDATE,
        run_id=trained.run_id,
        model_uri=f"models:/{name}/{version}",
        created=created,
    )
