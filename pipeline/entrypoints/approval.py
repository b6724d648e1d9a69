"""A person's approval between ``staging`` and ``production``: the ``approve`` task of
``training_pipeline``, by the run's ``promotion`` Param.

* ``manual``: skipped; the run ends at staging, and a person promotes later (``promote_model``,
  ``pipeline promote``).
* ``auto``: goes straight on to ``promote``.
* ``approval``: Airflow's human-in-the-loop step. The task waits (state ``awaiting_input``)
  showing what a person needs to decide: the gate's verdict table against production, the
  evaluation's figures, infra validation's latencies and links to the MLflow version, its model
  card and its run; an alert says it waits. **Approve** runs ``promote`` (the history records
  the approver and their comment), **Reject** runs ``reject`` (production does not move; the
  history records who rejected and why). Anyone with Airflow's permission to answer may
  respond, or only the users in ``PIPELINE_APPROVERS`` when it is set. A response goes through
  the UI (the task instance, or "Required actions") or the REST API
  (``PATCH .../taskInstances/approve/-1/hitlDetails``); a second response is refused (409).

``dags/training_pipeline.py`` imports this module when it is parsed: at the top it imports only
Airflow and :mod:`pipeline.config`; the rest waits for the task to run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from airflow.providers.standard.operators.hitl import HITLBranchOperator, HITLOperator
from airflow.sdk import Param
from airflow.sdk.bases.xcom import BaseXCom
from airflow.sdk.definitions.param import ParamsDict
from airflow.sdk.exceptions import AirflowSkipException

from pipeline.config import Settings

APPROVE, REJECT = "Approve", "Reject"


def md(text: Any) -> str:
    """``text`` (a name or a reason that came with the data) as a Markdown code span: shown as
    written, never a link, emphasis or HTML; one line; ``|`` escaped for table cells."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


@dataclass(frozen=True)
class ApprovalRequest:
    subject: str
    body: str
    model_name: str
    version: str


def _percent(value: Any) -> str:
    return f"{100 * float(value):.2f}%" if isinstance(value, int | float) else "-"


def approval_request(
    version: dict[str, Any],
    evaluation: dict[str, Any] | None,
    gate: dict[str, Any] | None,
    infra: dict[str, Any] | None,
    settings: Settings,
    app_base: str = "",
) -> ApprovalRequest:
    """What the approver reads: from the run's ``register``, ``evaluate``, ``gate`` and
    ``infra_validate`` results (Markdown, as the Airflow UI renders it)."""
    from pipeline.entrypoints import links

    name, number = str(version["model_name"]), str(version["version"])
    evaluation, gate, infra = evaluation or {}, gate or {}, infra or {}
    candidate, production = gate.get("candidate") or {}, gate.get("production")
    lines = [
        f"**{md(name)} version {number}** passed the gate and infra validation and is at `staging`. "
        f"**Approve** moves `production` to it (today: "
        f"{'version ' + str(production['version']) if production else 'no production version'}); "
        "**Reject** leaves `production` where it is. Either way the promotion history keeps your name and comment.",
        "",
        f"| | candidate v{number} | production {'v' + str(production['version']) if production else '(none)'} |",
        "| --- | --- | --- |",
        f"| test accuracy | {_percent(candidate.get('accuracy'))} | {_percent((production or {}).get('accuracy'))} |",
    ]
    recall, before = candidate.get("class_recall") or {}, (production or {}).get("class_recall") or {}
    if recall:
        worst = min(recall, key=lambda name: float(recall[name]))
        lines.append(
            f"| lowest class recall ({md(worst)}) | {_percent(recall[worst])} | {_percent(before.get(worst))} |"
        )
    policy = ", ".join(f"{md(k)} {v}" for k, v in sorted((gate.get("policy") or {}).items()))
    verdict = "passed" if gate.get("passed") else "failed: " + "; ".join(md(r) for r in gate.get("reasons") or [])
    lines += ["", f"Gate: **{verdict}** on {gate.get('test_images', '?')} test images (policy: {policy or 'default'})."]
    if evaluation:
        lines.append(
            f"Evaluation: test accuracy {_percent(evaluation.get('test_accuracy'))}, calibration error (ECE) "
            f"{float(evaluation.get('ece', 0)):.4f}, weakest class {md(evaluation.get('worst_class', '-'))} "
            f"({_percent(evaluation.get('worst_class_gap'))} below the mean)."
        )
    latency = infra.get("latency_ms") or {}
    if latency:
        lines.append(
            f"Infra validation: served answers match offline ones (max probability difference "
            f"{float(infra.get('max_probability_difference', 0)):.1e}); one image p50 "
            f"{float(latency.get('single_p50', 0)):.1f} ms, p99 {float(latency.get('single_p99', 0)):.1f} ms."
        )
    references = [
        (
            "MLflow version",
            links.task_link(links.MODEL_VERSION, "training_pipeline", "", "register", -1, version, settings),
        ),
        (
            "Model card",
            links.task_link(links.MODEL_CARD, "training_pipeline", "", "register", -1, version, settings, app_base),
        ),
        ("MLflow run", f"{settings.mlflow_ui()}/#/runs/{version['run_id']}" if version.get("run_id") else ""),
    ]
    lines += ["", " · ".join(f"[{label}]({url})" for label, url in references if url)]
    subject = f"Promote {name} version {number} to production?"
    return ApprovalRequest(subject, "\n".join(lines), name, number)


def approvers(settings: Settings) -> list[dict[str, str]] | None:
    """``PIPELINE_APPROVERS`` as Airflow's assigned users (ids as the auth manager knows them:
    the user name for the simple auth manager); None: whoever Airflow lets answer."""
    ids = [part.strip() for part in settings.approvers.split(",") if part.strip()]
    return [{"id": user, "name": user} for user in ids] or None


def decision(response: dict[str, Any]) -> dict[str, Any]:
    """The small result ``approve`` returns: the decision, the comment and who answered."""
    by = response.get("responded_by_user") or {}
    at = response.get("responded_at")
    return {
        "decision": response["chosen_options"][0],
        "comment": str((response.get("params_input") or {}).get("comment") or ""),
        "by": str(by.get("name") or by.get("id") or ""),
        "at": at.isoformat() if at is not None and hasattr(at, "isoformat") else str(at or ""),
    }


class PromotionApproval(HITLBranchOperator):
    """The ``approve`` task (see the module): skipped, passed through or a person's decision,
    by the run's ``promotion`` Param; its result is :func:`decision`'s."""

    def __init__(self, *, promote_task: str = "promote", reject_task: str = "reject", **kwargs: Any) -> None:
        # The DAG's Params arrive here too (the run's promotion among them); the form shows the
        # task's own only: the comment.
        params = ParamsDict(kwargs.pop("params", None) or {})
        params["comment"] = Param(
            "",
            type="string",
            title="Comment",
            description="Why you approve or reject: kept in the promotion history.",
            source="task",
        )
        super().__init__(
            subject="Promote the new model version to production?",
            options=[APPROVE, REJECT],
            options_mapping={APPROVE: promote_task, REJECT: reject_task},
            params=params,
            assigned_users=approvers(Settings.from_env()),
            **kwargs,
        )
        self.promote_task = promote_task

    def execute(self, context: Any) -> Any:
        mode = context["params"].get("promotion", "manual")
        if mode == "manual":
            raise AirflowSkipException("promotion manual: the run stops at staging (promote_model moves production)")
        if mode == "auto":
            return self._decide(context, {"decision": "auto", "comment": "", "by": "", "at": ""}, self.promote_task)
        from pipeline.entrypoints import alerts, links

        ti, settings = context["ti"], Settings.from_env()
        version = ti.xcom_pull(task_ids="register")
        request = approval_request(
            version,
            ti.xcom_pull(task_ids="evaluate"),
            ti.xcom_pull(task_ids="gate"),
            ti.xcom_pull(task_ids="infra_validate"),
            settings,
            links.app_base(),
        )
        self.subject, self.body = request.subject, request.body
        alerts.send(alerts.approval_pending(request, ti.dag_id, ti.run_id, ti.log_url), settings)
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        response = HITLOperator.execute_complete(self, context=context, event=event)
        result = decision(response)
        return self._decide(context, result, self.options_mapping[result["decision"]])

    def _decide(self, context: Any, result: dict[str, Any], branch: str) -> dict[str, Any]:
        """Keep ``result`` as the task's return value, then follow ``branch``: branching skips
        the other task by raising, so the value is pushed first, not returned."""
        context["ti"].xcom_push(BaseXCom.XCOM_RETURN_KEY, result)
        self.do_branch(context, branch)
        return result
