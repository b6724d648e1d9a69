"""The "Models" page of the Airflow plugin: the registry as a person deciding a promotion reads it.

:func:`overview` gathers, for each registered model, its aliases, its newest versions (accuracy,
the gate's verdict and reasons, infra validation's latencies, the approval decision, the data
hash and the training run) and its promotion history; :func:`page` renders that, with the
pending approvals the plugin finds in Airflow, as one HTML page. Read only: promotions and
rollbacks go through Airflow (the deployment DAGs, the approval step), which records who acted.
"""

from __future__ import annotations

import html
from typing import Any
from urllib.parse import quote

from pipeline.config import Settings

VERSIONS_SHOWN = 20
"""Newest versions per model on the page (all of them are in the MLflow UI)."""
LATENCIES = ("single_p50", "single_p99", "batch")


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
        "approval_by": tags.get("approval.by"),
        "dataset_hash": tags.get("dataset_hash"),
        "run_id": version.run_id,
        "created": int(version.creation_timestamp or 0),
    }


def overview(settings: Settings, limit: int = VERSIONS_SHOWN) -> list[dict[str, Any]]:
    """Every registered model with its aliases, newest versions and promotion history."""
    from mlflow.exceptions import MlflowException

    from pipeline.registry.history import read_history
    from pipeline.registry.outage import first_line, is_unavailable, registry_reachable
    from pipeline.tracking import tracking_client

    client = tracking_client(settings)
    models = []
    with registry_reachable(settings):
        for model in client.search_registered_models(max_results=100):
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


def page(models: list[dict[str, Any]], pending: list[dict[str, str]], settings: Settings) -> str:
    """The Models page: pending approvals first, then each model's versions and history."""
    e, ui = html.escape, settings.mlflow_ui()
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Models</title>",
        "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin-bottom:1.5em}"
        "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}.alias{font-weight:bold}</style>",
        "</head><body><h1>Models</h1>",
        "<h2>Waiting for approval</h2>",
    ]
    if pending:
        parts.append("<table><tr><th>model version</th><th>run</th><th>waiting since</th><th></th></tr>")
        for item in pending:
            parts.append(
                f"<tr><td>{e(item['subject'])}</td><td>{e(item['run_id'])}</td><td>{e(item['since'])}</td>"
                f"<td><a href='{e(item['url'], quote=True)}' target='_top'>Approve or reject</a></td></tr>"
            )
        parts.append("</table>")
    else:
        parts.append("<p>Nothing waits for a person.</p>")
    for model in models:
        name = model["name"]
        aliases = ", ".join(f"{alias} → v{number}" for alias, number in sorted(model["aliases"].items()))
        parts += [f"<h2>{e(name)}</h2>", f"<p>Aliases: <span class='alias'>{e(aliases or 'none')}</span></p>"]
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
