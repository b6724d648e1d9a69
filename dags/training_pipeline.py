"""
### Training pipeline: a labelled image dataset (Fashion-MNIST by default) from its source to a `staging` (or `production`) model

`acquire >> validate >> preprocess >> train >> evaluate >> register >> export >> gate >> infra_validate
>> promote`, each task one call into the `pipeline` package (which runs the same chain without
Airflow as `pipeline run`). With the Param `tune`, `tune_setup >> tune_trial (one mapped task per
candidate) >> tune_choose` picks the training config first.

* **acquire**: the four IDX files from a folder, `http(s)://` or `s3://` prefix, checksummed and
  stored under `raw/<hash>/`; an unchanged source is not fetched again.
* **validate**: Great Expectations suites from `expectations/` on a per-image profile and
  dataset-level facts; a failure stops the run and names the suite, expectation and values.
  The task instance's "Data report" link opens the report (plugins/README.md).
* **preprocess**: duplicates and train/test leakage removed, stratified validation split.
* **train**: PyTorch Lightning, tracked in MLflow (experiment `training_pipeline`). Runs on the
  Celery queue `$PIPELINE_TRAIN_QUEUE` (default `default`; `gpu` on a GPU fleet). Several devices
  or nodes (`devices`, `num_nodes`, `strategy`) run DDP. Checkpoints go to storage every epoch;
  a retry resumes the same MLflow run from the last one.
* **evaluate**: a report in the MLflow run: per-class precision/recall/F1, confusion matrix,
  calibration (ECE, reliability diagram), the worst-class gap, the most confident mistakes,
  integrated-gradients maps, and a model card (Markdown and HTML).
* **register**: the model in the MLflow registry with lineage tags, the model card as its
  description, and alias `candidate`.
* **gate**: the candidate and the `production` version on the same test split; the promotion
  policy (`gate_*` Params) decides. A failed gate fails the run with one line saying why;
  nothing moves. The numbers are in the version's tags and description.
* **infra_validate**: the version served by `pipeline serve` in a fresh process and queried;
  its answers must equal the offline ones. Then alias `staging`.
* **approve**, by the Param `promotion`: `manual` (the default) skips it and the run ends at
  staging, a person promotes later with `promote_model`; `auto` goes on to `promote`; `approval`
  waits for a person's **Approve** or **Reject** (the task instance, or "Required actions"),
  showing the gate's verdict, the evaluation, infra validation and links to the version.
* **promote**: alias `production`, recorded in the history with the approver and their comment.
  **reject**: production stays; the history records who rejected and why. Pool `promotions`.

Runs weekly (Sundays, 00:00 UTC), and whenever `drift_monitor` reports drift in new data (asset
`training-data-drift-detected`). The first weekly run is the next Sunday after the DAG is first
unpaused, not the one just past: unpausing it from the trigger form runs the run you asked for,
not a full retrain first. Same data and Params again: nothing is downloaded, trained or registered twice; set `force` to
retrain on purpose. Bad input fails at once (no retries); an unreachable source is retried with
exponential backoff.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, dag, task

if str(Path(__file__).parent) not in sys.path:  # for DagBag on another folder and runpy; see _common
    sys.path.append(str(Path(__file__).parent))
from _common import DEFAULT_ARGS, DRIFT_DETECTED, PROMOTIONS_POOL, run_params_form  # noqa: E402

from pipeline.entrypoints.approval import PromotionApproval  # noqa: E402

# The Celery queue of the train task: `gpu` on a fleet with GPU workers. Read from the
# environment at parse time (no database or network).
TRAIN_QUEUE = os.environ.get("PIPELINE_TRAIN_QUEUE", "default")


@dag(
    # No start_date: with one, Airflow would create the run of the Sunday just past as soon as the
    # DAG is unpaused (catchup=False keeps the latest missed run); without one, the timetable's
    # run_immediately=False waits for the next Sunday.
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("@weekly", timezone="UTC"), assets=[DRIFT_DETECTED]),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["training", "images", "mlflow"],
    default_args=DEFAULT_ARGS,
    params=run_params_form(),
)
def training_pipeline():
    @task
    def acquire(params=None) -> dict:
        from pipeline.entrypoints import tasks

        return tasks.acquire(params)

    @task
    def validate(raw: dict, params=None) -> dict:
        from pipeline.entrypoints import tasks

        return tasks.validate(params, raw)

    @task
    def preprocess(raw: dict, params=None) -> dict:
        from pipeline.entrypoints import tasks

        return tasks.preprocess(params, raw)

    @task
    def tune_setup(raw: dict, params=None, dag_run=None) -> list:
        from pipeline.entrypoints import tasks

        return tasks.tune_setup(params, raw, study=f"{dag_run.dag_id}/{dag_run.run_id}")

    @task(queue=TRAIN_QUEUE)
    def tune_trial(spec: dict, params=None) -> dict:
        from pipeline.entrypoints import tasks

        return tasks.tune_trial(params, spec)

    # Also runs when there were no trials (tuning off: the mapped task has nothing to map).
    @task(trigger_rule="none_failed")
    def tune_choose(trials=None, params=None) -> dict:
        from pipeline.entrypoints import tasks

        return tasks.tune_choose(params, list(trials or []))

    @task(queue=TRAIN_QUEUE)
    def train(processed: dict, overrides: dict, params=None, dag_run=None) -> dict:
        from pipeline.entrypoints import tasks

        tags = {"airflow.dag_id": dag_run.dag_id, "airflow.run_id": dag_run.run_id}
        return tasks.train(params, processed, tags, overrides)

    @task
    def evaluate(trained: dict, processed: dict, params=None) -> dict:
        from pipeline.entrypoints import tasks

        return tasks.evaluate(params, trained, processed)

    @task
    def register(trained: dict, evaluation: dict, validation: dict, processed: dict, params=None, dag_run=None) -> dict:
        from pipeline.entrypoints import tasks

        actor = tasks.actor(dag_run.dag_id, dag_run.run_id, dag_run.triggering_user_name)
        return tasks.register(params, trained, evaluation, validation, processed, actor)

    @task
    def export(version: dict, processed: dict, params=None) -> dict:
        from pipeline.entrypoints import tasks

        return tasks.export(params, version, processed)

    @task
    def gate(version: dict, processed: dict, params=None) -> dict:
        from pipeline.entrypoints import tasks

        return tasks.gate(params, version, processed)

    # Not in the pool: serving and querying take a while, and the staging move inside holds the
    # registry lock anyway; the pool is for the production moves a person waits on.
    @task
    def infra_validate(version: dict, processed: dict, params=None, dag_run=None) -> dict:
        from pipeline.entrypoints import tasks

        actor = tasks.actor(dag_run.dag_id, dag_run.run_id, dag_run.triggering_user_name)
        return tasks.infra_validate(params, version, processed, actor)

    @task(pool=PROMOTIONS_POOL)
    def promote(version: dict, approval: dict, params=None, dag_run=None) -> dict:
        from pipeline.entrypoints import tasks

        return tasks.decided(params, version, approval, dag_run.dag_id, dag_run.run_id, dag_run.triggering_user_name)

    @task(pool=PROMOTIONS_POOL)
    def reject(version: dict, approval: dict, dag_run=None) -> dict:
        from pipeline.entrypoints import tasks

        return tasks.reject(version, approval, dag_run.dag_id, dag_run.run_id)

    raw = acquire()
    validation = validate(raw)
    processed = preprocess(raw)
    validation >> processed
    specs = tune_setup(raw)
    validation >> specs
    chosen = tune_choose(tune_trial.expand(spec=specs))
    trained = train(processed, chosen)
    evaluation = evaluate(trained, processed)
    version = register(trained, evaluation, validation, processed)
    staged = infra_validate(version, processed)
    approve = PromotionApproval(task_id="approve")
    export(version, processed) >> gate(version, processed) >> staged >> approve
    promote(version, approve.output)
    reject(version, approve.output)


training_pipeline()
