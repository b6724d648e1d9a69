"""The registry aliases and the promotion history kept beside them.

MLflow aliases (``candidate``, ``staging``, ``production``) say where a model is now, not how it
got there. Every move is also appended to a **promotion history** kept as tags of the registered
model (``promotion.000001``, ``promotion.000002``, ...; each a JSON :class:`AliasMove`: who or
which DAG run, when, alias, from version, to version, why), so it can be read on the registered
model's page in the MLflow UI and with ``pipeline history``.

A move survives the registry failing under it (the database restarted, the server gone): before
the alias moves, the move is written to the model's ``promotion.pending`` tag; the alias moves,
the history entry is appended, and the tag is removed. Whoever takes the lock next finds a
pending move left by a fault and completes it in the history if the alias moved, or drops it if
not (:func:`reconcile`), so the alias and the history agree whatever step the fault hit.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import logging
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from pipeline.errors import ReferenceNotFoundError
from pipeline.refs import Ref
from pipeline.registry.outage import error_code, is_unavailable

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

CANDIDATE, STAGING, PRODUCTION = "candidate", "staging", "production"
HISTORY_PREFIX = "promotion."
PENDING_TAG = "promotion.pending"
"""Registered-model tag holding the move in progress (a JSON :class:`AliasMove`), from before the
alias moves until its history entry is written: a fault between the two leaves it for the next
holder of the lock to reconcile."""
#: Version tag written by infra validation; ``promote`` refuses a version without ``passed``.
TAG_INFRA = "infra_validation"
TAG_GATE = "gate.decision"
TAG_GATE_PRODUCTION = "gate.production_version"
"""The production version the gate compared with ("none" when there was none)."""

TAG_APPROVAL = "approval.decision"
"""Version tag: ``approved`` or ``rejected`` by a person (with ``approval.by``, ``approval.comment``)."""
REJECT = "reject"
"""The history action of a refusal: an entry that records a decision, not a move."""

TAG_ROLLED_BACK = "promotion.rolled_back"
"""Set on a version production was rolled back from: promoting it again needs its number."""
MAX_REASON = 1000
"""Characters of a reason kept in the history (a registered-model tag holds at most 5,000)."""


@dataclass(frozen=True)
class AliasMove(Ref):
    """One entry of the promotion history."""

    seq: int
    """Position in the history, from 1."""
    alias: str
    action: str
    """``register`` (candidate), ``stage`` (infra validation passed), ``promote`` or ``rollback``;
    or ``reject``, a person's refusal to move ``alias`` to ``to_version``, which moved nothing
    (``from_version`` is where the alias stayed)."""
    from_version: str | None
    """The version the alias pointed at before (None: the alias did not exist)."""
    to_version: str
    actor: str
    """The Airflow DAG run (``dag_id/run_id``) or ``user@host`` of a CLI call."""
    at: str
    """When the alias moved (UTC, ISO 8601): the audit time, not the run's logical date."""
    reason: str = ""


def cli_actor() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


def read_history(client: MlflowClient, name: str) -> list[AliasMove]:
    """Every recorded alias move of model ``name``, oldest first."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(name).tags
    except MlflowException as exc:
        if is_unavailable(exc):
            raise
        raise ReferenceNotFoundError(f"model {name}", "a registered model", "none") from exc
    return _entries(tags)


def _entries(tags: dict[str, str]) -> list[AliasMove]:
    entries = [
        AliasMove.from_dict(json.loads(v))
        for k, v in tags.items()
        if k.startswith(HISTORY_PREFIX) and k[len(HISTORY_PREFIX) :].isdigit()
    ]
    return sorted(entries, key=lambda e: e.seq)


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version ``alias`` points at; None when it points nowhere (any other failure raises:
    "no production version" must never be a guess)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if error_code(exc) in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
            return None
        raise


def record_move(
    client: MlflowClient, name: str, alias: str, version: str, action: str, actor: str, reason: str
) -> AliasMove:
    """Point ``alias`` at ``version`` and append the move to the history (the caller holds the lock).

    The move is written to :data:`PENDING_TAG` first, then the alias moves, then the entry is
    appended and the pending move cleared: a fault at any step leaves either nothing or a
    pending move that the next holder of the lock reconciles (:func:`reconcile`), never an
    entry for a move that did not happen nor a move without its entry. A rollback also tags the
    version it left (:data:`TAG_ROLLED_BACK`).
    """
    previous = alias_version(client, name, alias)
    history = read_history(client, name)
    entry = AliasMove(
        seq=(history[-1].seq + 1) if history else 1,
        alias=alias,
        action=action,
        from_version=previous,
        to_version=str(version),
        actor=actor,
        at=datetime.now(UTC).isoformat(timespec="milliseconds"),
        reason=reason[:MAX_REASON],
    )
    client.set_registered_model_tag(name, PENDING_TAG, json.dumps(entry.to_dict()))
    if previous != str(version):
        client.set_registered_model_alias(name, alias, str(version))
    _record(client, name, entry)
    client.delete_registered_model_tag(name, PENDING_TAG)
    log.info("%s: %s %s -> %s (%s by %s)", name, alias, previous, version, action, actor)
    return entry


def record_rejection(client: MlflowClient, name: str, alias: str, version: str, actor: str, reason: str) -> AliasMove:
    """Append a person's refusal to move ``alias`` to ``version`` (the caller holds the lock);
    the alias does not move. One tag write: nothing to reconcile. A retry of the same refusal
    (same alias, version, actor and reason as the last entry) returns that entry."""
    history = read_history(client, name)
    if history and (last := history[-1]).action == REJECT:
        if (last.alias, last.to_version, last.actor, last.reason) == (alias, str(version), actor, reason[:MAX_REASON]):
            return last
    entry = AliasMove(
        seq=(history[-1].seq + 1) if history else 1,
        alias=alias,
        action=REJECT,
        from_version=alias_version(client, name, alias),
        to_version=str(version),
        actor=actor,
        at=datetime.now(UTC).isoformat(timespec="milliseconds"),
        reason=reason[:MAX_REASON],
    )
    _record(client, name, entry)
    log.info("%s: %s stays at %s, version %s rejected by %s", name, alias, entry.from_version, version, actor)
    return entry


def moves(history: list[AliasMove]) -> list[AliasMove]:
    """The entries that moved an alias (not the rejections)."""
    return [entry for entry in history if entry.action != REJECT]


def _record(client: MlflowClient, name: str, entry: AliasMove, history_entry: bool = True) -> None:
    """Append ``entry`` to the history and, for a rollback, tag the version it left (both
    idempotent: a retry writes the same values)."""
    if history_entry:
        client.set_registered_model_tag(name, f"{HISTORY_PREFIX}{entry.seq:06d}", json.dumps(entry.to_dict()))
    if entry.action == "rollback" and entry.from_version is not None:
        client.set_model_version_tag(name, entry.from_version, TAG_ROLLED_BACK, entry.at)


def reconcile(client: MlflowClient, name: str) -> None:
    """Finish or drop a move a fault cut short (the caller holds the lock): if its alias points
    where it was going, its history entry is written (unless it was); if not, it never happened."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(name).tags
    except MlflowException as exc:
        if error_code(exc) == "RESOURCE_DOES_NOT_EXIST":  # a first registration: nothing moved yet
            return
        raise
    if PENDING_TAG not in tags:
        return
    pending = AliasMove.from_dict(json.loads(tags[PENDING_TAG]))
    if alias_version(client, name, pending.alias) == pending.to_version:
        history = _entries(tags)
        recorded = any(e.seq == pending.seq and e.at == pending.at for e in history)
        if not recorded:
            pending = dataclasses.replace(
                pending,
                seq=(history[-1].seq + 1) if history else 1,
                reason=f"{pending.reason} (recorded after an interrupted move)".strip()[:MAX_REASON],
            )
            log.warning(
                "%s: recording the move of %s to version %s that a fault interrupted (%s by %s)",
                name,
                pending.alias,
                pending.to_version,
                pending.action,
                pending.actor,
            )
        _record(client, name, pending, history_entry=not recorded)
    else:
        log.warning(
            "%s: dropping the move of %s to version %s that a fault interrupted before the alias moved",
            name,
            pending.alias,
            pending.to_version,
        )
    client.delete_registered_model_tag(name, PENDING_TAG)


def already_there(
    client: MlflowClient, name: str, alias: str, version: str, action: str, actor: str, reason: str
) -> bool:
    """True when ``alias`` is at ``version`` already. If the history does not say so (a retry
    after a crash between the move and its entry), the entry is written now."""
    if alias_version(client, name, alias) != str(version):
        return False
    recorded = [e for e in moves(read_history(client, name)) if e.alias == alias]
    if not recorded or recorded[-1].to_version != str(version):
        record_move(client, name, alias, version, action, actor, f"{reason} (recorded on retry)".strip())
    return True


def production_stack(history: list[AliasMove]) -> list[str]:
    """The production versions still reachable by rollbacks, oldest first (the last is current)."""
    stack: list[str] = []
    for entry in moves(history):
        if entry.alias != PRODUCTION:
            continue
        if entry.action == "rollback" and entry.to_version in stack:
            while stack[-1] != entry.to_version:
                stack.pop()
        else:  # a promotion, or a rollback to a version no longer on the stack: it goes on top
            stack.append(entry.to_version)
    return stack


def format_history(entries: list[AliasMove]) -> str:
    lines = [f"{'#':>3}  {'when (UTC)':<23}  {'alias':<10}  {'action':<8}  {'from':>4} -> {'to':<4}  {'by':<28}  why"]
    for e in entries:
        lines.append(
            f"{e.seq:>3}  {e.at[:23]:<23}  {e.alias:<10}  {e.action:<8}  {e.from_version or '-':>4} -> {e.to_version:<4}  "
            f"{e.actor:<28}  {e.reason}"
        )
    return "\n".join(lines)
