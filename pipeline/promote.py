"""Promote and roll back: move the registry aliases, one at a time, and keep their history.

MLflow aliases (``candidate``, ``staging``, ``production``) say where a model is now, not how it
got there. Every move made here is also appended to a **promotion history** kept as tags of the
registered model (``promotion.000001``, ``promotion.000002``, ...; each a JSON :class:`AliasMove`:
who or which DAG run, when, alias, from version, to version, why), so it can be read on the
registered model's page in the MLflow UI and with ``pipeline history``.

Moves are serialised by a **registry lock**: a registered model named ``<model>.lock`` that
exists while a move is in progress. Creating a registered model is atomic in every MLflow store
(a unique name: SQLite, PostgreSQL or a tracking server), so two promotions started at once,
from two Airflow workers or two shells, cannot interleave: reading the current version, moving
the alias and numbering the history entry happen under it. Airflow's ``promotions`` pool (one
slot) keeps the DAGs from even trying at once.

``rollback`` replays the production history as a stack: a promotion pushes, a rollback pops, so
two rollbacks in a row go two versions back.
"""

from __future__ import annotations

import getpass
import json
import logging
import random
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pipeline.config import Settings
from pipeline.errors import PromotionRefusedError, ReferenceNotFoundError, RegistryBusyError
from pipeline.refs import Ref
from pipeline.tracking import tracking_client

log = logging.getLogger(__name__)

CANDIDATE, STAGING, PRODUCTION = "candidate", "staging", "production"
HISTORY_PREFIX = "promotion."
#: Version tag written by infra validation; ``promote`` refuses a version without ``passed``.
TAG_INFRA = "infra_validation"
TAG_GATE = "gate.decision"

LOCK_WAIT_S = 120.0
"""How long a move waits for another one to finish (a move takes about a second)."""
LOCK_STALE_S = 600.0
"""A lock older than this was left by a process that died mid-move; it is broken."""


@dataclass(frozen=True)
class AliasMove(Ref):
    """One entry of the promotion history."""

    seq: int
    """Position in the history, from 1."""
    alias: str
    action: str
    """``register`` (candidate), ``stage`` (infra validation passed), ``promote`` or ``rollback``."""
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


def _error_code(exc: Exception) -> str:
    return str(getattr(exc, "error_code", ""))


@contextmanager
def registry_lock(client: Any, name: str, actor: str, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """Hold ``<name>.lock`` (a registered model) while the body runs."""
    from mlflow.exceptions import MlflowException

    lock = f"{name}.lock"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(
                lock, tags={"holder": actor},
                description=f"Held while an alias of {name} moves (pipeline.promote). Safe to delete when "
                f"older than {LOCK_STALE_S:.0f} s: its holder died.",
            )
            break
        except MlflowException as exc:
            if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            held = client.get_registered_model(lock)
        except MlflowException:
            continue  # released between our two calls
        age_s = time.time() - held.creation_timestamp / 1000
        if age_s > LOCK_STALE_S:
            log.warning("breaking the registry lock %s held by %s for %.0f s", lock, held.tags.get("holder"), age_s)
            _delete_quietly(client, lock)
            continue
        if time.monotonic() > deadline:
            raise RegistryBusyError(
                f"registry lock {lock}: held by {held.tags.get('holder', '?')} for {age_s:.0f} s; waited {wait_s:.0f} s"
            )
        time.sleep(0.05 + random.random() * 0.2)  # jitter: waiters do not retry in step
    try:
        yield
    finally:
        _delete_quietly(client, lock)


def _delete_quietly(client: Any, lock: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model(lock)
    except MlflowException as exc:
        if _error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
            raise


def read_history(client: Any, name: str) -> list[AliasMove]:
    """Every recorded alias move of model ``name``, oldest first."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(name).tags
    except MlflowException as exc:
        raise ReferenceNotFoundError(f"model {name}", "a registered model", "none") from exc
    entries = [AliasMove.from_dict(json.loads(v)) for k, v in tags.items() if k.startswith(HISTORY_PREFIX)]
    return sorted(entries, key=lambda e: e.seq)


def alias_version(client: Any, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _move(client: Any, name: str, alias: str, version: str, action: str, actor: str, reason: str) -> AliasMove:
    """Point ``alias`` at ``version`` and append the move to the history (the caller holds the lock).

    The alias moves first: a crash between the two leaves a move without its entry, never an
    entry for a move that did not happen (which would mislead ``rollback``).
    """
    previous = alias_version(client, name, alias)
    history = read_history(client, name)
    entry = AliasMove(
        seq=(history[-1].seq + 1) if history else 1, alias=alias, action=action, from_version=previous,
        to_version=str(version), actor=actor, at=datetime.now(UTC).isoformat(timespec="milliseconds"), reason=reason,
    )
    client.set_registered_model_alias(name, alias, str(version))
    client.set_registered_model_tag(name, f"{HISTORY_PREFIX}{entry.seq:06d}", json.dumps(entry.to_dict()))
    log.info("%s: %s %s -> %s (%s by %s)", name, alias, previous, version, action, actor)
    return entry


def move_alias(
    settings: Settings, alias: str, version: str, action: str, actor: str, reason: str = ""
) -> AliasMove | None:
    """Point ``alias`` at ``version`` under the lock; None if it already pointed there."""
    client = tracking_client(settings)
    name = settings.model_name
    with registry_lock(client, name, actor):
        if alias_version(client, name, alias) == str(version):
            return None
        return _move(client, name, alias, version, action, actor, reason)


def _require_validated(client: Any, name: str, version: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_model_version(name, version).tags
    except MlflowException as exc:
        raise ReferenceNotFoundError(f"model {name}", f"a version {version}", "none") from exc
    for tag, what in ((TAG_GATE, "the gate"), (TAG_INFRA, "infra validation")):
        if tags.get(tag) != "passed":
            raise PromotionRefusedError(
                f"{name} version {version}", f"a version that passed {what} (tag {tag}=passed)",
                repr(tags.get(tag, "no such tag")),
            )


def promote(settings: Settings, version: str | None = None, actor: str | None = None, reason: str = "") -> AliasMove | None:
    """Move ``production`` to ``version`` (default: the ``staging`` version), which must have
    passed the gate and infra validation. None when it is production already."""
    client = tracking_client(settings)
    name = settings.model_name
    actor = actor or cli_actor()
    with registry_lock(client, name, actor):
        target = version or alias_version(client, name, STAGING)
        if target is None:
            raise ReferenceNotFoundError(f"model {name}", "a version with alias staging (or --version)", "none")
        _require_validated(client, name, str(target))
        if alias_version(client, name, PRODUCTION) == str(target):
            log.info("%s version %s is production already", name, target)
            return None
        return _move(client, name, PRODUCTION, str(target), "promote", actor, reason or "promoted from staging")


def production_stack(history: list[AliasMove]) -> list[str]:
    """The production versions still reachable by rollbacks, oldest first (the last is current)."""
    stack: list[str] = []
    for entry in history:
        if entry.alias != PRODUCTION:
            continue
        if entry.action == "rollback":
            while stack and stack[-1] != entry.to_version:
                stack.pop()
            if not stack:
                stack.append(entry.to_version)
        else:
            stack.append(entry.to_version)
    return stack


def rollback(settings: Settings, to_version: str | None = None, actor: str | None = None, reason: str = "") -> AliasMove:
    """Move ``production`` back to the version before it (or back to ``to_version``)."""
    client = tracking_client(settings)
    name = settings.model_name
    actor = actor or cli_actor()
    with registry_lock(client, name, actor):
        current = alias_version(client, name, PRODUCTION)
        stack = production_stack(read_history(client, name))
        if to_version is None:
            earlier = [v for v in stack[:-1] if v != current]
            if current is None or not earlier:
                raise PromotionRefusedError(
                    f"model {name} production history", "an earlier production version to roll back to",
                    f"none (production is {current or 'unset'})",
                )
            to_version = earlier[-1]
        elif str(to_version) == current:
            raise PromotionRefusedError(f"model {name}", f"a version other than production ({current})", str(to_version))
        from mlflow.exceptions import MlflowException

        try:
            client.get_model_version(name, str(to_version))
        except MlflowException as exc:  # the version was deleted
            raise ReferenceNotFoundError(f"model {name}", f"a version {to_version}", "none") from exc
        return _move(client, name, PRODUCTION, str(to_version), "rollback", actor, reason or "rolled back")


def history(settings: Settings) -> list[AliasMove]:
    return read_history(tracking_client(settings), settings.model_name)


def format_history(entries: list[AliasMove]) -> str:
    lines = [f"{'#':>3}  {'when (UTC)':<23}  {'alias':<10}  {'action':<8}  {'from':>4} -> {'to':<4}  {'by':<28}  why"]
    for e in entries:
        lines.append(
            f"{e.seq:>3}  {e.at[:23]:<23}  {e.alias:<10}  {e.action:<8}  {e.from_version or '-':>4} -> {e.to_version:<4}  "
            f"{e.actor[:28]:<28}  {e.reason}"
        )
    return "\n".join(lines)
