"""
### Training pipeline: Fashion-MNIST from its source to a registered `candidate` model

`acquire >> validate >> preprocess >> train >> evaluate >> register`, each task one call into
the `pipeline` package (which runs the same chain without Airflow as `pipeline run`).

* **acquire**: the four IDX files from a folder, `http(s)://` or `s3://` prefix, checksummed and
  stored under `raw/<hash>/`; an unchanged source is not fetched again.
* **validate**: Great Expectations suites from `expectations/` on a per-image profile and
  dataset-level facts; a failure stops the run and names the suite, expectation and values.
  The data report's path is in the task log.
* **preprocess**: duplicates and train/test leakage removed, stratified validation split.
* **train**: PyTorch Lightning, tracked in MLflow (experiment `training_pipeline`).
* **evaluate**: test accuracy, per-class precision/recall/F1, confusion matrix in the run.
* **register**: the model in the MLflow registry with lineage tags and alias `candidate`.

Runs weekly, and whenever `drift_monitor` reports drift in new data (asset
`fashion-mnist-drift-detected`). Same data and Params again: nothing is downloaded, trained or registered twice; set `force` to
retrain on purpose. Bad input fails at once (no retries); an unreachable source is retried with
exponential backoff.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import (
    Asset,
    AssetOrTimeSchedule,
    CronTriggerTimetable,
    ExceptionRetryPolicy,
    Param,
    RetryAction,
    RetryRule,
    dag,
    task,
)

# Updated by the drift_monitor DAG when new data has drifted: retraining starts without a person.
DRIFT_DETECTED = Asset("fashion-mnist-drift-detected")

# Bad data or config cannot be fixed by retrying; an unreachable source may come back. Rules
# name exceptions as strings so that nothing from `pipeline` is imported while parsing.
RETRY_POLICY = ExceptionRetryPolicy(
    rules=[
        RetryRule(exception="pipeline.errors.SourceUnavailableError", action=RetryAction.RETRY),
        RetryRule(
            exception="pipeline.errors.BadInputError",
            action=RetryAction.FAIL,
            reason="bad input: retrying cannot fix it",
        ),
    ],
)


@dag(
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("@weekly", timezone="UTC"), assets=[DRIFT_DETECTED]
    ),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["training", "fashion-mnist", "mlflow"],
    default_args={
        "owner": "ml-platform",
        "retries": 2,
        "retry_delay": timedelta(seconds=30),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=10),
        "retry_policy": RETRY_POLICY,
    },
    params={
        "source_uri": Param(
            None,
            type=["null", "string"],
            title="Dataset source",
            description="Folder, file://, http(s):// or s3:// prefix with the four IDX files. "
            "Empty: $PIPELINE_SOURCE_URI, else /usr/share/datasets/fashion-mnist.",
        ),
        "epochs": Param(8, type="integer", minimum=1, maximum=200, title="Maximum epochs"),
        "batch_size": Param(128, type="integer", minimum=8, maximum=8192, title="Batch size"),
        "learning_rate": Param(0.002, type="number", exclusiveMinimum=0, maximum=1, title="Learning rate (Adam)"),
        "architecture": Param("simple_cnn", type="string", enum=["simple_cnn", "seed_cnn"], title="Network"),
        "sample_cap": Param(
            None,
            type=["null", "integer"],
            minimum=100,
            title="Sample cap",
            description="Keep at most this many training and test images, for quick runs. Empty: all.",
        ),
        "expected_sha256": Param(
            {},
            type="object",
            title="Expected checksums",
            description='Optional {"file name": "sha256"}; each digest is of the decompressed IDX content or '
            "of the file's bytes. A mismatch fails the run before anything is stored.",
        ),
        "seed": Param(42, type="integer", minimum=0, title="Seed"),
        "force": Param(False, type="boolean", title="Retrain even if this data and config were trained before"),
    },
)
def training_pipeline():
    @task
    def acquire(params=None) -> dict:
        from pipeline import tasks

        return tasks.acquire(params)

    @task
    def validate(raw: dict, params=None) -> dict:
        from pipeline import tasks

        return tasks.validate(params, raw)

    @task
    def preprocess(raw: dict, params=None) -> dict:
        from pipeline import tasks

        return tasks.preprocess(params, raw)

    @task
    def train(processed: dict, params=None, dag_run=None) -> dict:
        from pipeline import tasks

        return tasks.train(params, processed, {"airflow.dag_id": dag_run.dag_id, "airflow.run_id": dag_run.run_id})

    @task
    def evaluate(trained: dict, processed: dict, params=None) -> dict:
        from pipeline import tasks

        return tasks.evaluate(params, trained, processed)

    @task
    def register(trained: dict, evaluation: dict, validation: dict, processed: dict, params=None) -> dict:
        from pipeline import tasks

        return tasks.register(params, trained, evaluation, validation, processed)

    raw = acquire()
    validation = validate(raw)
    processed = preprocess(raw)
    validation >> processed
    trained = train(processed)
    evaluation = evaluate(trained, processed)
    register(trained, evaluation, validation, processed)


training_pipeline()
