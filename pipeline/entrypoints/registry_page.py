"""The "Models" page of the Airflow plugin: the registry as a person deciding a promotion reads it.

:func:`overview` gathers, for each registered model, its aliases, its newest versions (accuracy,
the gate's verdict and reasons, infra validation's latencies, the approval decision, the data
hash and the training run) and its promotion history; :func:`page` renders that, with the
pending approvals the plugin finds in Airflow, as one HTML page, and the buttons the user may
press (promote the staging version, roll back, approve or reject), as plain forms (the page runs
no script). The buttons act through Airflow (:mod:`pipeline.entrypoints.registry_actions`),
which records who acted.
"""

from __future__ import annotations

import html
from typing import Any
from urllib.parse import quote

from pipeline.config import Settings
from pipeline.entrypoints.registry_actions import REASON_MAX, Allowed

VERSIONS_SHOWN = 20
"""Newest versions per model on the page (all of them are in the MLflow UI)."""
LATENCIES = ("single_p50", "single_p99", "batch")
READ_ONLY = Allowed()


def _version_row(version: Any, aliases: list[str]) -> dict[str, Any]:
    tags = dict(version.tags or {})
    return {
        "version": str(version.version),
        "aliases": sorted(aliases),
        "test_accuracy": tags.get("test_accuracy"),
        "gate": tags.get("gate.decision"),
        "gate_reasons": tags.get("gate.reasons", "") if tags.get("gate.reasons") != "none" else "",
        "gate_against": tags.get("gate.production_version"),
        "infra": tags.get("infra_validation"),
        "latency_ms": {k: tags[f"infra.latency_{k}_ms"] for k in LATENCIES if f"infra.latency_{k}_ms" in tags},
        "approval": tags.get("approval.decision"),
        "rolled_back": tags.get("promotion.rolled_back"),
        "approval_by": tags.get("approval.by"),
        "dataset_hash": tags.get("dataset_hash"),
        "run_id": version.run_id,
        "created": int(version.creation_timestamp or 0),
    }


def overview(settings: Settings, limit: int = VERSIONS_SHOWN) -> list[dict[str, Any]]:
    """Every registered model with its aliases, newest versions and promotion history."""
    from mlflow.exceptions import MlflowException

    from pipeline.registry.history import read_history
    from pipeline.registry.lock import is_lock
    from pipeline.registry.outage import first_line, is_unavailable, registry_reachable
    from pipeline.tracking import tracking_client

    client = tracking_client(settings)
    models = []
    with registry_reachable(settings):
        for model in client.search_registered_models(max_results=100):
            if is_lock(model.name):
                continue  # held while an alias moves (the page was read in those seconds)
            aliases = {alias: str(number) for alias, number in (model.aliases or {}).items()}
            by_version: dict[str, list[str]] = {}
            for alias, number in aliases.items():
                by_version.setdefault(str(number), []).append(alias)
            entry: dict[str, Any] = {"name": model.name, "aliases": aliases, "versions": [], "history": []}
            try:
                versions = client.search_model_versions(
                    f"name = '{model.name}'", max_results=limit, order_by=["version_number DESC"]
                )
                entry["versions"] = [_version_row(v, by_version.get(str(v.version), [])) for v in versions]
                entry["history"] = [move.to_dict() for move in read_history(client, model.name)]
            except (MlflowException, ValueError, TypeError, KeyError) as exc:
                if is_unavailable(exc):
                    raise
                entry["error"] = first_line(exc)  # one model's odd name or tag: the others still show
            models.append(entry)
    return models


def _cell(value: Any) -> str:
    return html.escape("-" if value in (None, "") else str(value))


def _form(action: str, field: str, buttons: list[tuple[str, str, str]], hidden: dict[str, str] | None = None) -> str:
    """A post form of the page: hidden fields, one required text field and its buttons
    (``(name, value, label)``). ``action`` is relative to the page (``/pipeline/models``)."""
    e = html.escape
    fields = "".join(
        f"<input type='hidden' name='{e(k, quote=True)}' value='{e(v, quote=True)}'>" for k, v in (hidden or {}).items()
    )
    pressed = "".join(
        f"<button type='submit' name='{e(n, quote=True)}' value='{e(v, quote=True)}'>{e(label)}</button>"
        for n, v, label in buttons
    )
    return (
        f"<form class='act' method='post' action='{e(action, quote=True)}'>{fields}"
        f"<input name='{field}' required maxlength='{REASON_MAX}' placeholder='{field} (for the history)' "
        f"aria-label='{field}'> {pressed}</form>"
    )


def _model_actions(model: dict[str, Any], versions: dict[str, dict[str, Any]], allowed: Allowed) -> str:
    """Promote the staging version (unless a person rejected it, or it is production already),
    and roll production back."""
    name, aliases, forms = model["name"], model["aliases"], []
    staging, production = aliases.get("staging"), aliases.get("production")
    base = f"models/{quote(name, safe='')}"
    row = versions.get(str(staging)) or {}
    # What ``pipeline promote`` refuses of the default staging version (the route refuses it too).
    refused = (
        row.get("approval") == "rejected"
        or bool(row.get("rolled_back"))
        or (row.get("gate_against") or "none") != (production or "none")
    )
    if allowed.promote and staging and staging != production and not refused:
        label = f"Promote v{staging} (staging) to production"
        forms.append(_form(f"{base}/promote", "reason", [("go", "1", label)], {"version": str(staging)}))
    if allowed.rollback and production:
        forms.append(_form(f"{base}/rollback", "reason", [("go", "1", f"Roll back production (v{production})")]))
    return "".join(forms)


def page(
    models: list[dict[str, Any]],
    pending: list[dict[str, str]],
    settings: Settings,
    allowed: Allowed = READ_ONLY,
    notice: dict[str, str] | None = None,
) -> str:
    """The Models page: what the last button did, pending approvals, then each model's
    versions and history, with the buttons ``allowed`` lets the user press."""
    e, ui = html.escape, settings.mlflow_ui()
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Models</title>",
        "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin-bottom:1.5em}"
        "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}.alias{font-weight:bold}"
        "form.act{margin:.4em 0}.done{background:#e6f4ea;padding:.5em}.error{background:#fce8e6;padding:.5em}</style>",
        "</head><body><h1>Models</h1>",
    ]
    for kind, text in (notice or {}).items():
        if text and kind in ("done", "error"):
            parts.append(f"<p class='{kind}' role='status'>{e(text)}</p>")
    parts.append("<h2>Waiting for approval</h2>")
    if pending:
        parts.append("<table><tr><th>request</th><th>DAG run</th><th>waiting since</th><th></th></tr>")
        for item in pending:
            answer = f"<a href='{e(item['url'], quote=True)}' target='_top'>Open in Airflow</a>"
            if item["dag_id"] in allowed.answer:
                buttons = [("answer", "Approve", "Approve"), ("answer", "Reject", "Reject")]
                where = f"approvals/{quote(item['dag_id'], safe='')}/{quote(item['run_id'], safe='')}"
                answer = _form(where, "comment", buttons) + answer
            parts.append(
                f"<tr><td>{e(item['subject'])}</td><td>{e(item['dag_id'])} / {e(item['run_id'])}</td><td>{e(item['since'])}</td>"
                f"<td>{answer}</td></tr>"
            )
        parts.append("</table>")
    else:
        parts.append("<p>Nothing waits for a person.</p>")
    for model in models:
        name = model["name"]
        aliases = ", ".join(f"{alias} → v{number}" for alias, number in sorted(model["aliases"].items()))
        parts += [f"<h2>{e(name)}</h2>", f"<p>Aliases: <span class='alias'>{e(aliases or 'none')}</span></p>"]
        parts.append(_model_actions(model, {v["version"]: v for v in model["versions"]}, allowed))
        if model.get("error"):
            parts.append(f"<p>Its versions could not be read: {e(model['error'])}</p>")
        parts.append(
            "<table><tr><th>version</th><th>aliases</th><th>test accuracy</th><th>gate</th><th>why</th>"
            "<th>infra (p50 / p99 / batch ms)</th><th>approval</th><th>data</th><th>training run</th></tr>"
        )
        for v in model["versions"]:
            version_url = f"{ui}/#/models/{quote(name, safe='')}/versions/{v['version']}"
            latency = " / ".join(v["latency_ms"].get(k, "-") for k in LATENCIES) if v["latency_ms"] else ""
            infra = f"{v['infra'] or '-'} ({latency})" if latency else v["infra"]
            approval = f"{v['approval']} by {v['approval_by']}" if v["approval"] else None
            run = "-"
            if v["run_id"]:
                run_url = f"{ui}/#/runs/{v['run_id']}"
                run = f"<a href='{e(run_url, quote=True)}' target='_blank'>{e(v['run_id'][:8])}</a>"
            parts.append(
                f"<tr><td><a href='{e(version_url, quote=True)}' target='_blank'>v{e(v['version'])}</a></td>"
                f"<td class='alias'>{_cell(', '.join(v['aliases']))}</td><td>{_cell(v['test_accuracy'])}</td>"
                f"<td>{_cell(v['gate'])}</td><td>{_cell(v['gate_reasons'])}</td><td>{_cell(infra)}</td>"
                f"<td>{_cell(approval)}</td><td>{_cell((v['dataset_hash'] or '')[:12])}</td><td>{run}</td></tr>"
            )
        parts.append("</table><h3>Promotion history</h3>")
        if model["history"]:
            parts.append(
                "<table><tr><th>#</th><th>when (UTC)</th><th>alias</th><th>action</th><th>from</th><th>to</th>"
                "<th>by</th><th>why</th></tr>"
            )
            for m in reversed(model["history"]):
                parts.append(
                    f"<tr><td>{_cell(m['seq'])}</td><td>{_cell(m['at'][:19])}</td><td>{_cell(m['alias'])}</td>"
                    f"<td>{_cell(m['action'])}</td><td>{_cell(m['from_version'])}</td><td>{_cell(m['to_version'])}</td>"
                    f"<td>{_cell(m['actor'])}</td><td>{_cell(m['reason'])}</td></tr>"
                )
            parts.append("</table>")
        else:
            parts.append("<p>No alias has moved yet.</p>")
    if not models:
        parts.append("<p>No registered model yet: a run of <code>training_pipeline</code> registers one.</p>")
    parts.append("</body></html>")
    return "".join(parts)
