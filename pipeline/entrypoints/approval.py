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
  the UI (the task instance, or "Required actions"), the Models page or the REST API
  (``PATCH .../taskInstances/approve/-1/hitlDetails``); a second response is refused (409).
  Unanswered for ``PIPELINE_APPROVAL_TIMEOUT_HOURS`` (72 by default), it counts as **Reject**,
  recorded as no answer in time, so the runs queued behind it (``max_active_runs=1``) go on.

``promote_model`` has the same step for a person's promotion, with its Param ``approval``
(:class:`DeploymentApproval`): off (the default), its ``approve`` goes straight on to
``promote``; on, a second person approves or rejects the version the first one asked for.

``dags/training_pipeline.py`` and ``dags/model_deployment.py`` import this module when parsed: at the top it imports only
Airflow and :mod:`pipeline.config`; the rest waits for the task to run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
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


def decision(response: dict[str, Any], timed_out_after: timedelta | None = None) -> dict[str, Any]:
    """The small result ``approve`` returns: the decision, the comment and who answered; for an
    approval no one answered within ``timed_out_after``, Airflow's default (Reject) and why."""
    by = response.get("responded_by_user") or {}
    at = response.get("responded_at")
    comment = str((response.get("params_input") or {}).get("comment") or "")
    if timed_out_after is not None:
        comment = f"no answer within {timed_out_after.total_seconds() / 3600:g} h"
    return {
        "decision": response["chosen_options"][0],
        "comment": comment,
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
        settings = Settings.from_env()
        timeout = settings.approval_timeout()
        super().__init__(
            subject="Promote the new model version to production?",
            options=[APPROVE, REJECT],
            options_mapping={APPROVE: promote_task, REJECT: reject_task},
            params=params,
            assigned_users=approvers(settings),
            # Unanswered in time: the scheduler answers with the default, Reject.
            response_timeout=timeout,
            defaults=[REJECT] if timeout else None,
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
        result = decision(response, self.response_timeout if event.get("timedout") else None)
        return self._decide(context, result, self.options_mapping[result["decision"]])

    def _decide(self, context: Any, result: dict[str, Any], branch: str) -> dict[str, Any]:
        """Keep ``result`` as the task's return value, then follow ``branch``: branching skips
        the other task by raising, so the value is pushed first, not returned."""
        context["ti"].xcom_push(BaseXCom.XCOM_RETURN_KEY, result)
        self.do_branch(context, branch)
        return result


def deployment_request(
    name: str,
    number: str,
    tags: dict[str, str],
    run_id: str | None,
    production: str | None,
    requester: str,
    reason: str,
    settings: Settings,
    app_base: str = "",
) -> ApprovalRequest:
    """What the second person reads when ``promote_model`` asks for approval: who asked and why,
    and the version's verdicts as its registry tags hold them."""
    from pipeline.entrypoints import links

    ref = {"model_name": name, "version": number}
    latency = [tags.get(f"infra.latency_single_{k}_ms") for k in ("p50", "p99")]
    gate_reasons = tags.get("gate.reasons", "")
    lines = [
        f"{md(requester or 'someone')} asks to move `production` of **{md(name)}** to **version {number}** "
        f"(today: {'version ' + production if production else 'no production version'}): {md(reason or 'no reason given')}. "
        "**Approve** moves it; **Reject** leaves `production` where it is. Either way the promotion history "
        "keeps your name and comment.",
        "",
        f"| | v{number} |",
        "| --- | --- |",
        f"| test accuracy | {md(tags.get('test_accuracy', '-'))} |",
        f"| gate | {md(tags.get('gate.decision', 'not gated'))}"
        + (f" ({md(gate_reasons)})" if gate_reasons and gate_reasons != "none" else "")
        + f" against production {md(tags.get('gate.production_version', '-'))} |",
        f"| infra validation | {md(tags.get('infra_validation', 'not run'))}"
        + (f", one image p50 {md(latency[0])} ms, p99 {md(latency[1])} ms" if all(latency) else "")
        + " |",
    ]
    if tags.get("approval.decision"):
        lines.append(f"| earlier decision | {md(tags['approval.decision'])} by {md(tags.get('approval.by', '?'))} |")
    references = [
        ("MLflow version", links.task_link(links.MODEL_VERSION, "promote_model", "", "promote", -1, ref, settings)),
        ("Model card", links.task_link(links.MODEL_CARD, "promote_model", "", "promote", -1, ref, settings, app_base)),
        ("MLflow run", f"{settings.mlflow_ui()}/#/runs/{run_id}" if run_id else ""),
    ]
    lines += ["", " · ".join(f"[{label}]({url})" for label, url in references if url)]
    return ApprovalRequest(f"Promote {name} version {number} to production?", "\n".join(lines), name, number)


def requested_version(params: Any) -> dict[str, Any]:
    """The version ``promote_model``'s Params ask for (the Param ``version``, else the staging
    version), with its tags, its run and today's production version, read from the registry."""
    from pipeline.entrypoints.tasks import _registry_settings
    from pipeline.errors import PromotionRefusedError
    from pipeline.registry.history import PRODUCTION, STAGING, alias_version
    from pipeline.registry.outage import registry_reachable
    from pipeline.tracking import tracking_client

    settings = _registry_settings(params.get("model_name") or None)
    name = settings.model_for()
    with registry_reachable(settings):
        client = tracking_client(settings)
        asked = params.get("version")
        number = str(asked) if asked not in (None, "") else alias_version(client, name, STAGING)
        if number is None:
            raise PromotionRefusedError(f"{name} alias staging", "a version to promote", "no staging version")
    if asked in (None, ""):
        # Not named: refused as pipeline promote refuses the default staging version, before
        # anyone is asked (rejected, rolled back from, gated against another production).
        from pipeline.registry.promote import check_default_promotion

        check_default_promotion(settings, number)
    with registry_reachable(settings):
        version = client.get_model_version(name, number)
        production = alias_version(client, name, PRODUCTION)
    return {
        "model_name": name,
        "version": number,
        "tags": dict(version.tags or {}),
        "run_id": version.run_id,
        "production": production,
    }


class DeploymentApproval(PromotionApproval):
    """``promote_model``'s ``approve``: with the Param ``approval``, a second person's decision
    on the version asked for (fixed when the request is made: the result carries it), else
    straight on to ``promote``."""

    def execute(self, context: Any) -> Any:
        params = context["params"]
        if not params.get("approval"):
            return self._decide(context, {"decision": "auto", "comment": "", "by": "", "at": ""}, self.promote_task)
        from pipeline.entrypoints import alerts, links

        ti, run, settings = context["ti"], context["dag_run"], Settings.from_env()
        asked = requested_version(params)
        self.asked = {"model_name": asked["model_name"], "version": asked["version"]}
        request = deployment_request(
            asked["model_name"],
            asked["version"],
            asked["tags"],
            asked["run_id"],
            asked["production"],
            run.triggering_user_name or "",
            str(params.get("reason") or ""),
            settings,
            links.app_base(),
        )
        self.subject, self.body = request.subject, request.body
        ti.xcom_push("asked", self.asked)
        alerts.send(alerts.approval_pending(request, ti.dag_id, ti.run_id, ti.log_url), settings)
        return HITLBranchOperator.execute(self, context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        from pipeline.errors import PromotionRefusedError

        response = HITLOperator.execute_complete(self, context=context, event=event)
        result = decision(response, self.response_timeout if event.get("timedout") else None)
        result.update(context["ti"].xcom_pull(task_ids=self.task_id, key="asked") or {})
        requester = context["dag_run"].triggering_user_name
        if result["decision"] == APPROVE and requester and result["by"] == requester:
            raise PromotionRefusedError(
                f"{self.dag_id}.{self.task_id}",
                "a second person's approval",
                f"{requester} approving their own request; nothing moved (trigger it again)",
            )
        return self._decide(context, result, self.options_mapping[result["decision"]])
