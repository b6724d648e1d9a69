"""
### Drift monitor: does new data still look like what the model learned from?

Daily, and on demand with a batch URI: `check_drift` fetches the batch (`images-idx3-ubyte.gz`,
optional `labels-idx1-ubyte.gz`), stops on broken data (suite `incoming_profile`), and measures
drift against the `production` model's training data (the latest `candidate` while nothing is
in production): profile features (PSI, KS), labels, and the model's own outputs. The drift
report opens from the task's "Drift report" link, and is in an MLflow run of experiment
`drift_monitor`.

Drift found: `request_retraining` updates the asset `training-data-drift-detected`, on which
`training_pipeline` is scheduled, so retraining starts without a person, and e-mails the people
in `PIPELINE_ALERT_TO` (through the SMTP connection; none configured, nothing is sent). No drift: the run ends
green, the log says so, and `request_retraining` is skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pendulum
from airflow.sdk import Param, dag, task

if str(Path(__file__).parent) not in sys.path:  # for DagBag on another folder and runpy; see _common
    sys.path.append(str(Path(__file__).parent))
from _common import DEFAULT_ARGS, DRIFT_DETECTED  # noqa: E402


@dag(
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["monitoring", "drift", "images"],
    default_args=DEFAULT_ARGS,
    params={
        "batch_uri": Param(
            None,
            type=["null", "string"],
            title="New data",
            description="Folder, file://, http(s):// or s3:// prefix with images-idx3-ubyte.gz (and optionally "
            "labels-idx1-ubyte.gz). Empty: $PIPELINE_INCOMING_URI, else <pipeline home>/new-data.",
        ),
    },
)
def drift_monitor():
    @task
    def check_drift(params=None) -> dict:
        from pipeline.entrypoints import tasks

        return tasks.check_drift(params)

    @task.short_circuit
    def drift_found(result: dict) -> bool:
        return result["drifted"]

    @task(outlets=[DRIFT_DETECTED])
    def request_retraining(result: dict, outlet_events=None, dag_run=None) -> dict:
        from pipeline.entrypoints import tasks

        outlet_events[DRIFT_DETECTED].extra = tasks.request_retraining(result, dag_run.dag_id, dag_run.run_id)
        return result

    result = check_drift()
    drift_found(result) >> request_retraining(result)


drift_monitor()
