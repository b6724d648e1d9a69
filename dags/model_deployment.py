"""
### Model deployment: `promote_model` and `rollback_model`

Two DAGs a person triggers (no schedule) to move the registry alias `production`:

* **promote_model**: once a `training_pipeline` run has left a version at `staging`, moves
  `production` to it (or to the `version` given), which must have passed the gate and infra
  validation. With `approval` on, its task `approve` first waits for a second person's
  Approve or Reject (the Models page, the task instance, "Required actions" or the REST API).
* **rollback_model**: moves `production` back to the version before the current one (two
  rollbacks in a row go two versions back), or to `to_version`.

Every move is appended to the promotion history (registered-model tags `promotion.*` in the
MLflow UI; `pipeline history` on the command line) with who triggered it and the `reason`.
Both run in the one-slot pool `promotions`, so a promotion and a rollback never interleave.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pendulum
from airflow.sdk import Param, dag, task

if str(Path(__file__).parent) not in sys.path:  # for DagBag on another folder and runpy; see _common
    sys.path.append(str(Path(__file__).parent))
from _common import DEFAULT_ARGS, PROMOTIONS_POOL  # noqa: E402

from pipeline.entrypoints.approval import DeploymentApproval  # noqa: E402

DEPLOYMENT_DAG = {
    "start_date": pendulum.datetime(2026, 1, 1, tz="UTC"),
    "catchup": False,
    "tags": ["deployment", "images", "mlflow"],
    "default_args": DEFAULT_ARGS,
    # They run only when a person triggers them (no schedule): paused, a trigger from the Models
    # page or the REST API would only queue.
    "is_paused_upon_creation": False,
}
REASON = Param("", type="string", title="Reason", description="Why, for the promotion history.")
MODEL = Param(
    "",
    type=["null", "string"],  # empty (the default) is not "missing" in the trigger form
    title="Registered model",
    description="Empty: $PIPELINE_MODEL_NAME, else the default dataset's (fashion-mnist-classifier).",
    pattern=r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,127})?$",
)


@dag(
    schedule=None,  # triggered by a person
    **DEPLOYMENT_DAG,
    doc_md="Move `production` to the `staging` version (or `version`). " + __doc__,
    params={
        "version": Param(
            None,
            type=["null", "string"],
            title="Version",
            description="Registered version to promote. Empty: the version with alias staging.",
        ),
        "model_name": MODEL,
        "reason": REASON,
        "approval": Param(
            False,
            type="boolean",
            title="Ask for approval",
            description="Wait for a second person's Approve (or Reject) before production moves.",
        ),
    },
)
def promote_model():
    approve = DeploymentApproval(task_id="approve")

    @task(pool=PROMOTIONS_POOL)
    def promote(approval: dict, params=None, dag_run=None) -> dict:
        from pipeline.entrypoints import tasks

        return tasks.promote_requested(params, approval, dag_run.dag_id, dag_run.run_id, dag_run.triggering_user_name)

    @task(pool=PROMOTIONS_POOL)
    def reject(approval: dict, dag_run=None) -> dict:
        from pipeline.entrypoints import tasks

        return tasks.reject(approval, approval, dag_run.dag_id, dag_run.run_id)

    promote(approve.output)
    reject(approve.output)


@dag(
    schedule=None,  # triggered by a person
    **DEPLOYMENT_DAG,
    doc_md="Move `production` back to the previous version (or `to_version`). " + __doc__,
    params={
        "to_version": Param(
            None,
            type=["null", "string"],
            title="Roll back to version",
            description="Empty: the production version before the current one.",
        ),
        "model_name": MODEL,
        "reason": REASON,
    },
)
def rollback_model():
    @task(pool=PROMOTIONS_POOL)
    def rollback(params=None, dag_run=None) -> dict:
        from pipeline.entrypoints import tasks

        return tasks.rollback(params, tasks.actor(dag_run.dag_id, dag_run.run_id, dag_run.triggering_user_name))

    rollback()


promote_model()
rollback_model()
