"""Register: log the trained model with ``mlflow.pytorch`` and add it to the model registry.

The logged model is :class:`~pipeline.models.ServingModel` (pixels in [0, 1] in, class
probabilities out) with a signature and a real input example. The version carries lineage tags
(dataset hash, processed-data hash, code version, run id, validation outcome, test accuracy) and
gets the alias ``candidate`` (aliases, not the deprecated stages). A run that already has a
version is not registered twice: the existing version is returned.

Returns a :class:`~pipeline.refs.ModelVersionRef`.
"""

from __future__ import annotations

import logging

import numpy as np

from pipeline.config import Settings
from pipeline.refs import EvaluationResult, ModelVersionRef, ProcessedDatasetRef, TrainResult, ValidationRef
from pipeline.storage import Storage
from pipeline.tracking import TAG_CODE, tracking_client

log = logging.getLogger(__name__)

CANDIDATE = "candidate"
DATA_REPORT = "data_report"
MODEL_DESCRIPTION = (
    "Fashion-MNIST image classifier trained by the training_pipeline DAG. Input: float32 pixels in "
    "[0, 1], shape (n, 1, 28, 28). Output: probabilities of the 10 classes (T-shirt/top, Trouser, "
    "Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Ankle boot). Saved as a torch.export "
    "program (pt2): loading needs torch only and runs no pickled code. Aliases: candidate (newest "
    "registered), staging, production."
)


def _log_model(trained: TrainResult, processed: ProcessedDatasetRef, storage: Storage, name: str) -> str:
    import mlflow
    import torch
    from mlflow.models import infer_signature

    from pipeline.models import load_checkpoint, serving_model
    from pipeline.preprocess import load_split

    model = serving_model(load_checkpoint(str(storage.local_path(f"checkpoints/{trained.run_id}/best.ckpt"))))
    images, _ = load_split(processed, storage, "test")
    example = (images[:4, None].astype(np.float32) / 255.0)
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
            registered_model_name=name,
            # A torch.export program: loading runs no pickled code and needs torch, not this package.
            serialization_format="pt2",
        )
    return str(info.registered_model_version)


def _log_data_report(client: object, run_id: str, validation: ValidationRef, storage: Storage) -> None:
    """Keep the data report (GX Data Docs pages and results) with the run, under ``data_report/``."""
    import tempfile
    from pathlib import Path

    prefix = validation.report_prefix
    with tempfile.TemporaryDirectory(prefix="data-report-") as tmp:
        for name in ("index.html", *(f"{suite}.html" for suite in validation.suites), "validation.json"):
            (Path(tmp) / name).write_bytes(storage.get_bytes(f"{prefix}/{name}"))
        client.log_artifacts(run_id, tmp, DATA_REPORT)  # type: ignore[attr-defined]


def register(
    trained: TrainResult,
    evaluation: EvaluationResult,
    validation: ValidationRef,
    processed: ProcessedDatasetRef,
    storage: Storage,
    settings: Settings,
) -> ModelVersionRef:
    """Register the run's model (once) and point the ``candidate`` alias at it."""
    client = tracking_client(settings)
    name = settings.model_name
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{trained.run_id}'")
    created = not existing
    if created:
        _log_data_report(client, trained.run_id, validation, storage)
        version = _log_model(trained, processed, storage, name)
    else:
        version = str(existing[0].version)

    registered = client.get_registered_model(name)
    if not registered.description:
        client.update_registered_model(name, description=MODEL_DESCRIPTION)
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
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.update_model_version(
        name,
        version,
        description=(
            f"Trained by run {trained.run_id} on dataset {trained.dataset_hash} (processed {trained.processed_hash}); "
            f"test accuracy {evaluation.test_accuracy:.4f}, macro F1 {evaluation.macro_f1:.4f}. "
            f"Data report: {validation.report_uri}"
        ),
    )
    client.set_registered_model_alias(name, CANDIDATE, version)
    log.info("%s version %s (%s) has alias %s", name, version, "new" if created else "existing", CANDIDATE)
    return ModelVersionRef(
        model_name=name, version=version, alias=CANDIDATE, run_id=trained.run_id,
        model_uri=f"models:/{name}/{version}", created=created,
    )
