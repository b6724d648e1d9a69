"""Alerts: a person hears of a failed task, detected drift, a failed gate and a pending approval, by e-mail through
the smtp provider's ``SmtpNotifier``, and through Apprise (a webhook, Slack, Teams, ...) as a
second channel.

Configured by :class:`~pipeline.config.Settings`: recipients (``PIPELINE_ALERT_TO``) and the
Airflow SMTP connection (``PIPELINE_ALERT_SMTP_CONN_ID``, default ``smtp_default``); an Airflow
Apprise connection (``PIPELINE_ALERT_APPRISE_CONN_ID``, the apprise provider's). A channel
without its setting or its connection sends nothing and fails nothing; a server that refuses or
does not answer is logged, and the run goes on: an alert never changes the outcome of what it
reports.

Every DAG's tasks call :func:`on_task_failure` when they fail for good (``dags/_common.py``'s
default ``on_failure_callback``; retries do not alert); the drift monitor calls
:func:`send` with :func:`drift_detected` when it asks for retraining.
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import Settings
from pipeline.entrypoints import links
from pipeline.errors import GateFailedError

log = logging.getLogger(__name__)

SUBJECT_PREFIX = "[image-pipeline]"
SUBJECT_LIMIT = 200


@dataclass(frozen=True)
class Alert:
    """One message: what happened (``kind``), a subject, facts and links."""

    kind: str
    """``task_failed``, ``gate_failed``, ``drift`` or ``approval``."""
    subject: str
    facts: list[tuple[str, str]]
    links: list[tuple[str, str]] = field(default_factory=list)

    def html(self) -> str:
        e = html.escape
        rows = "".join(f"<tr><th align=left>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in self.facts)
        anchors = "".join(f'<li><a href="{e(url, quote=True)}">{e(name)}</a></li>' for name, url in self.links if url)
        return (
            f"<html><body><h2>{e(self.subject)}</h2><table>{rows}</table>"
            + (f"<ul>{anchors}</ul>" if anchors else "")
            + "</body></html>"
        )

    def text(self) -> str:
        """The facts and links as plain lines, for the Apprise channel (a title comes apart)."""
        lines = [f"{k}: {' '.join(v.split())}" for k, v in self.facts]
        return "\n".join(lines + [f"{name}: {url}" for name, url in self.links if url])


def _subject(text: str) -> str:
    text = " ".join(f"{SUBJECT_PREFIX} {text}".split())  # one line, whatever the error held
    return text if len(text) <= SUBJECT_LIMIT else text[: SUBJECT_LIMIT - 3] + "..."


def one_line(error: BaseException | str | None) -> str:
    """An exception's first line (the registry's :func:`~pipeline.registry.outage.first_line`),
    a message's first line, or a note that none was recorded."""
    from pipeline.registry.outage import first_line

    if isinstance(error, BaseException):
        return first_line(error)
    return next((part.strip() for part in str(error or "").splitlines() if part.strip()), "no error was recorded")


def task_failed(
    dag_id: str,
    run_id: str,
    task_id: str,
    try_number: int | None,
    error: BaseException | str | None,
    log_url: str,
    extra_links: list[tuple[str, str]] | None = None,
) -> Alert:
    """A task that failed for good: its DAG, run, task, the one-line error and its log. A failed
    gate is its own kind: the candidate was judged, nothing is broken."""
    line = one_line(error)
    facts = [("DAG", dag_id), ("Run", run_id), ("Task", task_id)]
    if try_number:
        facts.append(("Try", str(try_number)))
    facts.append(("Error", line))
    task_links = [("Task log", log_url), *(extra_links or [])]
    if isinstance(error, GateFailedError):
        return Alert("gate_failed", _subject(f"gate refused {error.where}: {error.found}"), facts, task_links)
    return Alert("task_failed", _subject(f"{dag_id}.{task_id} failed: {line}"), facts, task_links)


def drift_detected(result: dict[str, Any], dag_id: str, run_id: str, settings: Settings, app_base: str = "") -> Alert:
    """New data drifted from what the serving model was trained on (``result``: the monitor's)."""
    model = f"{result.get('model_name')} version {result.get('model_version')} ({result.get('model_alias')})"
    reasons = list(result.get("reasons") or [])
    facts = [
        ("DAG", dag_id),
        ("Run", run_id),
        ("Model", model),
        ("Batch", f"{result.get('batch_size')} images, {result.get('batch_hash')}"),
        ("Drift", "; ".join(reasons) or "(no reason recorded)"),
    ]
    report = links.task_link(links.DRIFT_REPORT, dag_id, run_id, "check_drift", -1, result, settings, app_base)
    mlflow = f"{settings.mlflow_ui()}/#/runs/{result['run_id']}" if result.get("run_id") else ""
    subject = f"drift in new data for {model}: {reasons[0] if reasons else 'see the report'}"
    return Alert("drift", _subject(subject), facts, [("Drift report", report), ("MLflow run", mlflow)])


def approval_pending(request: Any, dag_id: str, run_id: str, task_url: str) -> Alert:
    """A model version waits for a person's Approve or Reject (``request``: an
    :class:`~pipeline.entrypoints.approval.ApprovalRequest`)."""
    facts = [("DAG", dag_id), ("Run", run_id), ("Model", f"{request.model_name} version {request.version}")]
    base = task_url.split("/dags/", 1)[0]
    return Alert(
        "approval",
        _subject(f"approval needed: {request.model_name} version {request.version} to production"),
        facts,
        [("Approve or reject", task_url), ("Required actions", f"{base}/required_actions")],
    )


def airflow_url() -> str:
    """Airflow's own URL (``[api] base_url``), for links in a message read outside Airflow."""
    from airflow.configuration import conf

    return (conf.get("api", "base_url", fallback="") or "http://localhost:8080").rstrip("/")


def _has_connection(conn_id: str) -> bool:
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        log.info("alerts: no connection %r; nothing sent through it", conn_id)
        return False
    return True


def configured(settings: Settings) -> bool:
    """Recipients set and the SMTP connection defined (looked up through Airflow)."""
    return bool(settings.alert_to.strip()) and _has_connection(settings.alert_smtp_conn_id)


def apprise_configured(settings: Settings) -> bool:
    """The Apprise connection set and defined."""
    return bool(settings.alert_apprise_conn_id) and _has_connection(settings.alert_apprise_conn_id)


def any_channel(settings: Settings) -> bool:
    """Whether an alert has anywhere to go (without looking up connections)."""
    return bool(settings.alert_to.strip() or settings.alert_apprise_conn_id)


def send(alert: Alert, settings: Settings) -> bool:
    """Send ``alert`` through every configured channel; True when one of them took it."""
    by_mail = _by_mail(alert, settings) if configured(settings) else False
    by_apprise = _by_apprise(alert, settings) if apprise_configured(settings) else False
    return by_mail or by_apprise


def _by_mail(alert: Alert, settings: Settings) -> bool:
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    recipients = [address.strip() for address in settings.alert_to.split(",") if address.strip()]
    notifier = SmtpNotifier(
        to=recipients,
        from_email=settings.alert_from or None,
        smtp_conn_id=settings.alert_smtp_conn_id,
        subject=alert.subject,
        html_content=alert.html(),
    )
    try:
        # notify(), not the notifier's __call__: that renders the fields as Jinja templates,
        # and an error message or a file name is not a template.
        notifier.notify({})
    except Exception as exc:  # the provider raises its own errors too: an alert never fails the task
        log.warning("alerts: %s not sent through %s: %s", alert.kind, settings.alert_smtp_conn_id, one_line(exc))
        return False
    log.info("alerts: sent %s to %s", alert.kind, ", ".join(recipients))
    return True


def _by_apprise(alert: Alert, settings: Settings) -> bool:
    """Through the services of the Apprise connection's ``config``. The provider's hook reads
    the connection; Apprise itself is called here, as the hook drops whether it delivered."""
    import apprise
    from airflow.providers.apprise.hooks.apprise import AppriseHook

    conn_id = settings.alert_apprise_conn_id
    try:
        hook = AppriseHook(apprise_conn_id=conn_id)
        services = apprise.Apprise()
        hook.set_config_from_conn(conn=hook.get_connection(conn_id), apprise_obj=services)
        kind = {"approval": apprise.NotifyType.INFO, "drift": apprise.NotifyType.WARNING}.get(
            alert.kind, apprise.NotifyType.FAILURE
        )
        delivered = bool(services.notify(title=alert.subject, body=alert.text(), notify_type=kind))
    except Exception as exc:  # a bad config or a service down: logged; the task's outcome stands
        log.warning("alerts: %s not sent through %s: %s", alert.kind, conn_id, one_line(exc))
        return False
    if not delivered:
        log.warning("alerts: %s not delivered by a service of %s", alert.kind, conn_id)
        return False
    log.info("alerts: sent %s through %s", alert.kind, conn_id)
    return True


def on_task_failure(context: Any) -> None:
    """``on_failure_callback`` of every task: one alert for a task that failed for good."""
    ti = context["ti"]
    settings = Settings.from_env()
    if not any_channel(settings):
        return
    error = context.get("exception")
    extra: list[tuple[str, str]] = []
    if isinstance(error, GateFailedError):
        version = ti.xcom_pull(task_ids="register")
        url = links.task_link(links.MODEL_VERSION, ti.dag_id, ti.run_id, "register", -1, version, settings)
        extra.append(("Model version", url))
    send(task_failed(ti.dag_id, ti.run_id, ti.task_id, ti.try_number, error, ti.log_url, extra), settings)
