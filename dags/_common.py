"""What every DAG of the pipeline shares: owner, retries and the retry policy, the promotions
pool, the drift asset. Defined once here; not a DAG file (``.airflowignore`` lists it).

DAG files import it as ``_common``: the DAG processor and the workers have the DAGs folder on
``sys.path``; each DAG file also puts its own folder there, for ``DagBag`` on another folder and
``runpy``. Parsing stays cheap: besides ``airflow.sdk`` this imports only ``pipeline.errors``
and ``pipeline.config`` (dataclasses, no third-party package; a test checks it).
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Asset, ExceptionRetryPolicy, Param, RetryAction, RetryRule

from pipeline.config import run_params
from pipeline.errors import error_classes

PROMOTIONS_POOL = "promotions"
"""Every alias move (staging, production) runs in this one-slot pool: two cannot interleave."""

DRIFT_DETECTED = Asset("training-data-drift-detected")
"""Updated by ``drift_monitor`` when new data has drifted; ``training_pipeline`` is scheduled on it."""


def retry_policy() -> ExceptionRetryPolicy:
    """Retry exactly the pipeline errors that declare ``retryable`` (an outage, a busy lock, an
    interrupted training), fail the others at once (bad input, a verdict): matched by exact
    class, so neither the order of the rules nor the class hierarchy decides. Anything else (a
    bug, an error from a library) keeps Airflow's retries."""
    classes = error_classes()
    return ExceptionRetryPolicy(
        rules=[
            RetryRule(
                exception=[c for c in classes if c.retryable],
                action=RetryAction.RETRY,
                match_subclasses=False,
                reason="an outage or a busy resource: it may pass",
            ),
            RetryRule(
                exception=[c for c in classes if not c.retryable],
                action=RetryAction.FAIL,
                match_subclasses=False,
                reason="bad input or a verdict: retrying cannot change it",
            ),
        ]
    )


def alert_on_failure(context) -> None:
    """Every task's ``on_failure_callback``: an alert to the people in ``PIPELINE_ALERT_TO``
    (``pipeline.entrypoints.alerts``; none configured: nothing is sent)."""
    from pipeline.entrypoints import alerts

    alerts.on_task_failure(context)


DEFAULT_ARGS = {
    "owner": "ml-platform",
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=10),
    "retry_policy": retry_policy(),
    "on_failure_callback": alert_on_failure,
}
"""Every task of every DAG: two retries with exponential backoff, by :func:`retry_policy`, and
an alert when it fails for good."""


def run_params_form() -> dict[str, Param]:
    """A run's Params, generated from the config fields (``pipeline.config.params``): the trigger
    form shows them in sections, with the config's defaults, bounds, choices and help."""
    return {p.name: Param(p.param_default, **p.json_schema()) for p in run_params()}
