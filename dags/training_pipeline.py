"""
### Training pipeline: Fashion-MNIST from its source to a `staging` (or `production`) model

`acquire >> validate >> preprocess >> train >> evaluate >> register >> gate >> infra_validate
>> promote`, each task one call into the `pipeline` package (which runs the same chain without
Airflow as `pipeline run`). With the Param `tune`, `tune_setup >> tune_trial (one mapped task per
candidate) >> tune_choose` picks the training config first.

* **acquire**: the four IDX files from a folder, `http(s)://` or `s3://` prefix, checksummed and
  stored under `raw/<hash>/`; an unchanged source is not fetched again.
* **validate**: Great Expectations suites from `expectations/` on a per-image profile and
  dataset-level facts; a failure stops the run and names the suite, expectation and values.
  The data report's path is in the task log.
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
* **promote**: only with `auto_promote`: alias `production`. Otherwise a person promotes the
  staging version by triggering `promote_model`. Pool `promotions` (one slot).

Runs weekly, and whenever `drift_monitor` reports drift in new data (asset
`fashion-mnist-drift-detected`). Same data and Params again: nothing is downloaded, trained or registered twice; set `force` to
retrain on purpose. Bad input fails at once (no retries); an unreachable source is retried with
exponential backoff.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pendulum
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task

if str(Path(__file__).parent) not in sys.path:  # for DagBag on another folder and runpy; see _common
    sys.path.append(str(Path(__file__).parent))
from _common import DEFAULT_ARGS, DRIFT_DETECTED, PROMOTIONS_POOL  # noqa: E402

# The Celery queue of the train task: `gpu` on a fleet with GPU workers. Read from the
# environment at parse time (no database or network).
TRAIN_QUEUE = os.environ.get("PIPELINE_TRAIN_QUEUE", "default")


@dag(
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("@weekly", timezone="UTC"), assets=[DRIFT_DETECTED]),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["training", "fashion-mnist", "mlflow"],
    default_args=DEFAULT_ARGS,
    params={
        "source_uri": Param(
            None,
            type=["null", "string"],
            title="Dataset source",
            description="Folder, file://, http(s):// or s3:// prefix with the four IDX files. "
            "Empty: $PIPELINE_SOURCE_URI, else /usr/share/datasets/fashion-mnist.",
        ),
        "architecture": Param(
            "resnet_deep",
            type="string",
            enum=["resnet_deep", "resnet_small", "resnet_wide", "resnet_large", "simple_cnn", "seed_cnn"],
            title="Network",
            description="resnet_deep: residual CNN in three stages (default); resnet_small: its first two; "
            "resnet_wide: resnet_small with 1.5x the channels; "
            "resnet_large: for a GPU, 27x resnet_deep's arithmetic; "
            "seed_cnn: the original design's baseline.",
        ),
        "epochs": Param(15, type="integer", minimum=1, maximum=200, title="Epochs"),
        "batch_size": Param(64, type="integer", minimum=8, maximum=8192, title="Batch size per device"),
        "learning_rate": Param(
            0.1,
            type="number",
            exclusiveMinimum=0,
            maximum=1,
            title="Peak learning rate",
            description="For a global batch of 128 images; scaled linearly with batch size x devices x nodes.",
        ),
        "weight_decay": Param(0.0005, type="number", minimum=0, maximum=1, title="Weight decay"),
        "optimizer": Param(
            "sgd",
            type="string",
            enum=["adamw", "adam", "sgd"],
            title="Optimizer",
            description="sgd: Nesterov momentum 0.9.",
        ),
        "label_smoothing": Param(0.1, type="number", minimum=0, maximum=0.5, title="Label smoothing"),
        "lr_schedule": Param("onecycle", type="string", enum=["onecycle", "cosine", "constant"], title="LR schedule"),
        "augment": Param(True, type="boolean", title="Augment (random crop with padding, horizontal flip)"),
        "test_time_flip": Param(
            True,
            type="boolean",
            title="Test-time flip",
            description="Predict the mean of the image's and its mirror's probabilities.",
        ),
        "early_stopping_patience": Param(
            0, type="integer", minimum=0, maximum=500, title="Early stopping patience (epochs; 0: off)"
        ),
        "accelerator": Param("auto", type="string", enum=["auto", "cpu", "gpu"], title="Accelerator"),
        "devices": Param("auto", type="string", title="Devices per node", description="auto, a count, or ids like 0,1"),
        "num_nodes": Param(1, type="integer", minimum=1, maximum=1024, title="Nodes"),
        "strategy": Param("auto", type="string", enum=["auto", "ddp", "ddp_spawn"], title="Distributed strategy"),
        "precision": Param(
            "auto",
            type="string",
            enum=["auto", "32-true", "bf16-mixed", "16-mixed"],
            title="Precision",
            description="auto: bf16 mixed precision on a GPU, or a CPU with AMX, that supports it; else 32-bit.",
        ),
        "compile": Param(False, type="boolean", title="torch.compile the network"),
        "num_threads": Param(0, type="integer", minimum=0, maximum=1024, title="CPU threads (0: the CPUs allowed)"),
        "tune": Param(
            False,
            type="boolean",
            title="Tune first",
            description="Try candidate configs on a sample "
            "(one mapped task each, MLflow child runs) and train with the best.",
        ),
        "tune_space": Param(
            {"learning_rate": [0.05, 0.1, 0.2], "weight_decay": [0.0001, 0.0005]},
            type="object",
            title="Search space",
            description="{field: [values]} over architecture, batch_size, learning_rate, weight_decay, "
            "optimizer, label_smoothing, lr_schedule, augment, test_time_flip.",
        ),
        "tune_method": Param("grid", type="string", enum=["grid", "random"], title="Search method"),
        "tune_trials": Param(4, type="integer", minimum=1, maximum=256, title="Random search: trials"),
        "tune_sample_cap": Param(6000, type="integer", minimum=100, title="Images per trial"),
        "tune_epochs": Param(3, type="integer", minimum=1, maximum=200, title="Epochs per trial"),
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
        "gate_min_accuracy": Param(0.90, type="number", minimum=0, maximum=1, title="Gate: accuracy floor"),
        "gate_max_accuracy_drop": Param(
            0.005, type="number", minimum=0, maximum=1, title="Gate: tolerated accuracy drop against production"
        ),
        "gate_max_class_drop": Param(
            0.02, type="number", minimum=0, maximum=1, title="Gate: tolerated drop in any class's recall"
        ),
        "gate_min_improvement": Param(
            0.0, type="number", minimum=0, maximum=1, title="Gate: required gain over production (0: none)"
        ),
        "auto_promote": Param(
            False,
            type="boolean",
            title="Promote to production automatically",
            description="Off: the run stops at staging; promote from the promote_model DAG.",
        ),
        "force": Param(False, type="boolean", title="Retrain even if this data and config were trained before"),
    },
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

    @task.short_circuit
    def auto_promote(params=None) -> bool:
        from pipeline.entrypoints import tasks

        return tasks.auto_promote(params)

    @task(pool=PROMOTIONS_POOL)
    def promote(version: dict, params=None, dag_run=None) -> dict:
        from pipeline.entrypoints import tasks

        actor = tasks.actor(dag_run.dag_id, dag_run.run_id, dag_run.triggering_user_name)
        return tasks.promote(params, actor, version["version"], "auto_promote: passed the gate and infra validation")

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
    gate(version, processed) >> staged >> auto_promote() >> promote(version)


training_pipeline()
