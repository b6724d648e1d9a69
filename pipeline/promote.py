"""Promote and roll back: move the registry aliases, one at a time, and keep their history.

MLflow aliases (``candidate``, ``staging``, ``production``) say where a model is now, not how it
got there. Every move made here is also appended to a **promotion history** kept as tags of the
registered model (``promotion.000001``, ``promotion.000002``, ...; each a JSON :class:`AliasMove`:
who or which DAG run, when, alias, from version, to version, why), so it can be read on the
registered model's page in the MLflow UI and with ``pipeline history``.

Moves are serialised by a **registry lock**: a registered model named ``<model>.lock`` that
exists while a move is in progress. Creating a registered model is atomic in every MLflow store
(a unique name: SQLite, PostgreSQL or a tracking server), so two promotions started at once,
from two Airflow workers or two shells, cannot interleave: reading the current version, the
checks, moving the alias and numbering the history entry happen under it. The lock carries a
token: its holder deletes only its own, and a waiter that sees one holder keep it for
``LOCK_STALE_S`` (its own clock, no clock comparison between machines) breaks it. Airflow's
``promotions`` pool (one slot) keeps the deployment DAGs from even trying at once.

A move survives the registry failing under it (the database restarted, the server gone): before
the alias moves, the move is written to the model's ``promotion.pending`` tag; the alias moves,
the history entry is appended, and the tag is removed. Whoever takes the lock next finds a
pending move left by a fault and completes it in the history if the alias moved, or drops it if
not (:func:`_reconcile`), so the alias and the history agree whatever step the fault hit. A
holder that cannot reach the registry to release its lock retries for ``LOCK_RELEASE_S``, and
leaves it to be broken as stale after that. An unreachable registry (after MLflow's own retries)
is a :class:`~pipeline.errors.RegistryUnavailableError`: one line, retried by Airflow.

``promote`` refuses a version whose gate compared it with another production version than the
current one (the gate must be run again), and, when it defaults to the staging version, one
that production was rolled back from. ``rollback`` replays the production history as a stack: a
promotion pushes, a rollback pops, so two rollbacks in a row go two versions back.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import logging
import random
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pipeline.config import Settings
from pipeline.errors import (
    PipelineError,
    PromotionRefusedError,
    ReferenceNotFoundError,
    RegistryBusyError,
    RegistryUnavailableError,
)
from pipeline.redact import redact_text
from pipeline.refs import Ref
from pipeline.tracking import tracking_client

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

TAG_ROLLED_BACK = "promotion.rolled_back"
"""Set on a version production was rolled back from: promoting it again needs its number."""

LOCK_WAIT_S = 120.0
"""How long a move waits for another one to finish (a move takes about a second)."""
LOCK_STALE_S = 60.0
"""A lock seen held by the same holder for this long (on the waiter's own clock) was left by a
process that died mid-move, and is broken. A move holds it for about a second."""
LOCK_RELEASE_S = 10.0
"""How long a holder keeps trying to release its lock through a registry outage (a database
restart takes seconds) before leaving it to be broken as stale."""
MAX_REASON = 1000
"""Characters of a reason kept in the history (a registered-model tag holds at most 5,000)."""


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


_UNAVAILABLE_CODES = ("TEMPORARILY_UNAVAILABLE", "SERVICE_UNDER_MAINTENANCE", "WORKSPACE_TEMPORARILY_UNAVAILABLE",
                      "DEADLINE_EXCEEDED")


def _unavailable(exc: BaseException | None) -> bool:
    """True for a registry that did not answer: its database (an SQLAlchemy connection error, raw
    or wrapped by the store, which reports most as TEMPORARILY_UNAVAILABLE), or its server (a
    connection error or a 5xx once MLflow's HTTP retries are spent). Looks down the chain of causes."""
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen and not isinstance(exc, PipelineError):
        seen.add(id(exc))
        if isinstance(exc, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError
                      | sqlalchemy.exc.DisconnectionError):
            return True
        if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
            return True
        if isinstance(exc, MlflowException):
            text = str(exc)
            if _error_code(exc) in _UNAVAILABLE_CODES or (text.startswith("API request to") and any(
                f"failed with {what}" in text for what in ("exception", "timeout", "error code 5")
            )):
                return True
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return False


def _first_line(exc: BaseException, limit: int = 300) -> str:
    line = next((part.strip() for part in str(exc).splitlines() if part.strip()), type(exc).__name__)
    return line if len(line) <= limit else line[: limit - 3] + "..."


@contextmanager
def registry_reachable(settings: Settings) -> Iterator[None]:
    """Turn "the registry did not answer" into one :class:`RegistryUnavailableError` line."""
    try:
        yield
    except Exception as exc:
        if _unavailable(exc):
            raise RegistryUnavailableError(redact_text(settings.tracking_uri), redact_text(_first_line(exc))) from exc
        raise


def _lock_token(client: Any, lock: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(lock).tags.get("token")
    except MlflowException as exc:
        if _error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


@contextmanager
def registry_lock(client: Any, name: str, actor: str, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """Hold ``<name>.lock`` (a registered model carrying our token) while the body runs."""
    from mlflow.exceptions import MlflowException

    lock, token = f"{name}.lock", uuid.uuid4().hex
    deadline = time.monotonic() + wait_s
    seen: tuple[str | None, float] = (None, time.monotonic())  # the holder we are waiting on, since when
    try:
        while True:
            try:
                client.create_registered_model(
                    lock, tags={"holder": actor, "token": token},
                    description=f"Held while an alias of {name} moves (pipeline.promote); broken when held by "
                    f"one holder for {LOCK_STALE_S:.0f} s.",
                )
                break
            except MlflowException as exc:
                # Taken; or, through a tracking server, taken and released while the server looked
                # it up to report the conflict (RESOURCE_DOES_NOT_EXIST): either way, try again.
                if _error_code(exc) not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                    raise
            holder = _lock_token(client, lock)
            if holder == token:  # our create went through; its answer was lost and the request retried
                break
            now = time.monotonic()
            if holder != seen[0]:
                seen = (holder, now)
            elif holder is not None and now - seen[1] > LOCK_STALE_S and _lock_token(client, lock) == holder:
                log.warning("breaking the registry lock %s: the same holder kept it for %.0f s", lock, now - seen[1])
                _delete_lock(client, lock)
                continue
            if now > deadline:
                raise RegistryBusyError(f"registry lock {lock}: expected it free within {wait_s:.0f} s, found it "
                                        f"held for {now - seen[1]:.0f} s; try again")
            time.sleep(0.05 + random.random() * 0.2)  # jitter: waiters do not retry in step
        _reconcile(client, name)
        yield
    finally:
        # Also after a failed create: the registry may have made the lock and lost the answer.
        _release(client, lock, token)


def _release(client: Any, lock: str, token: str) -> None:
    """Delete ``lock`` if it still carries ``token`` (a waiter may have broken it meanwhile),
    trying again through a short registry outage."""
    deadline, delay = time.monotonic() + LOCK_RELEASE_S, 0.25
    while True:
        try:
            if _lock_token(client, lock) == token:
                _delete_lock(client, lock)
            return
        except Exception as exc:
            if not _unavailable(exc):
                raise
            if time.monotonic() + delay > deadline:
                log.warning("registry lock %s left held (%s): it is broken as stale after %.0f s", lock,
                            _first_line(exc), LOCK_STALE_S)
                return
        time.sleep(delay)
        delay *= 2


def _delete_lock(client: Any, lock: str) -> None:
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
        if _unavailable(exc):
            raise
        raise ReferenceNotFoundError(f"model {name}", "a registered model", "none") from exc
    return _entries(tags)


def _entries(tags: dict[str, str]) -> list[AliasMove]:
    entries = [
        AliasMove.from_dict(json.loads(v)) for k, v in tags.items()
        if k.startswith(HISTORY_PREFIX) and k[len(HISTORY_PREFIX):].isdigit()
    ]
    return sorted(entries, key=lambda e: e.seq)


def alias_version(client: Any, name: str, alias: str) -> str | None:
    """The version ``alias`` points at; None when it points nowhere (any other failure raises:
    "no production version" must never be a guess)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if _error_code(exc) in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
            return None
        raise


def _move(client: Any, name: str, alias: str, version: str, action: str, actor: str, reason: str) -> AliasMove:
    """Point ``alias`` at ``version`` and append the move to the history (the caller holds the lock).

    The move is written to :data:`PENDING_TAG` first, then the alias moves, then the entry is
    appended and the pending move cleared: a fault at any step leaves either nothing or a
    pending move that the next holder of the lock reconciles (:func:`_reconcile`), never an
    entry for a move that did not happen nor a move without its entry. A rollback also tags the
    version it left (:data:`TAG_ROLLED_BACK`).
    """
    previous = alias_version(client, name, alias)
    history = read_history(client, name)
    entry = AliasMove(
        seq=(history[-1].seq + 1) if history else 1, alias=alias, action=action, from_version=previous,
        to_version=str(version), actor=actor, at=datetime.now(UTC).isoformat(timespec="milliseconds"),
        reason=reason[:MAX_REASON],
    )
    client.set_registered_model_tag(name, PENDING_TAG, json.dumps(entry.to_dict()))
    if previous != str(version):
        client.set_registered_model_alias(name, alias, str(version))
    _record(client, name, entry)
    client.delete_registered_model_tag(name, PENDING_TAG)
    log.info("%s: %s %s -> %s (%s by %s)", name, alias, previous, version, action, actor)
    return entry


def _record(client: Any, name: str, entry: AliasMove, history_entry: bool = True) -> None:
    """Append ``entry`` to the history and, for a rollback, tag the version it left (both
    idempotent: a retry writes the same values)."""
    if history_entry:
        client.set_registered_model_tag(name, f"{HISTORY_PREFIX}{entry.seq:06d}", json.dumps(entry.to_dict()))
    if entry.action == "rollback" and entry.from_version is not None:
        client.set_model_version_tag(name, entry.from_version, TAG_ROLLED_BACK, entry.at)


def _reconcile(client: Any, name: str) -> None:
    """Finish or drop a move a fault cut short (the caller holds the lock): if its alias points
    where it was going, its history entry is written (unless it was); if not, it never happened."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(name).tags
    except MlflowException as exc:
        if _error_code(exc) == "RESOURCE_DOES_NOT_EXIST":  # a first registration: nothing moved yet
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
                pending, seq=(history[-1].seq + 1) if history else 1,
                reason=f"{pending.reason} (recorded after an interrupted move)".strip()[:MAX_REASON],
            )
            log.warning("%s: recording the move of %s to version %s that a fault interrupted (%s by %s)", name,
                        pending.alias, pending.to_version, pending.action, pending.actor)
        _record(client, name, pending, history_entry=not recorded)
    else:
        log.warning("%s: dropping the move of %s to version %s that a fault interrupted before the alias moved",
                    name, pending.alias, pending.to_version)
    client.delete_registered_model_tag(name, PENDING_TAG)


def _already_there(client: Any, name: str, alias: str, version: str, action: str, actor: str, reason: str) -> bool:
    """True when ``alias`` is at ``version`` already. If the history does not say so (a retry
    after a crash between the move and its entry), the entry is written now."""
    if alias_version(client, name, alias) != str(version):
        return False
    recorded = [e for e in read_history(client, name) if e.alias == alias]
    if not recorded or recorded[-1].to_version != str(version):
        _move(client, name, alias, version, action, actor, f"{reason} (recorded on retry)".strip())
    return True


def move_alias(
    settings: Settings, alias: str, version: str, action: str, actor: str, reason: str = "", forward_only: bool = False
) -> AliasMove | None:
    """Point ``alias`` at ``version`` under the lock; None if it was there already or, with
    ``forward_only``, if it points at a newer version (a rerun that reused an old model)."""
    name = settings.model_name
    with registry_reachable(settings), registry_lock(client := tracking_client(settings), name, actor):
        if _already_there(client, name, alias, version, action, actor, reason):
            return None
        current = alias_version(client, name, alias)
        if forward_only and current is not None and int(current) > int(version):
            log.info("%s: %s stays at version %s, newer than %s", name, alias, current, version)
            return None
        return _move(client, name, alias, version, action, actor, reason)


def _require_promotable(
    client: Any, name: str, version: str, production: str | None, by_default: bool, automatic: bool
) -> None:
    """Refuse a version that did not pass the gate and infra validation; unless a person named
    it, also one whose gate compared it with another production version than today's, and (as
    the default staging version) one that production was rolled back from."""
    from mlflow.exceptions import MlflowException

    where = f"{name} version {version}"
    try:
        tags = client.get_model_version(name, version).tags
    except MlflowException as exc:
        if _unavailable(exc):
            raise
        raise ReferenceNotFoundError(f"model {name}", f"a version {version}", "none") from exc
    for tag, what in ((TAG_GATE, "the gate"), (TAG_INFRA, "infra validation")):
        if tags.get(tag) != "passed":
            raise PromotionRefusedError(where, f"a version that passed {what} (tag {tag}=passed)",
                                        repr(tags.get(tag, "no such tag")))
    gated_against = tags.get(TAG_GATE_PRODUCTION)
    if (by_default or automatic) and gated_against != (production or "none"):
        raise PromotionRefusedError(
            where, f"a gate against today's production ({production or 'none'})",
            f"a gate against {gated_against}; run the gate again (pipeline gate --version {version})",
        )
    if by_default and TAG_ROLLED_BACK in tags:
        raise PromotionRefusedError(
            where, "a staging version production was not rolled back from",
            f"rolled back at {tags[TAG_ROLLED_BACK]}; name it (--version {version}) to promote it again",
        )


def promote(
    settings: Settings, version: str | None = None, actor: str | None = None, reason: str = "",
    forward_only: bool = False,
) -> AliasMove | None:
    """Move ``production`` to ``version`` (default: the ``staging`` version), which must have
    passed the gate and infra validation. None when it is production already.

    ``forward_only`` is for automation (a training run's ``auto_promote``): production never goes
    to an older version, and the gate must have compared against today's production. A person
    naming ``version`` may promote any validated version; the default staging version must also
    have been gated against today's production."""
    name = settings.model_name
    actor = actor or cli_actor()
    reason = reason or "promoted from staging"
    with registry_reachable(settings), registry_lock(client := tracking_client(settings), name, actor):
        target = str(version) if version else alias_version(client, name, STAGING)
        if target is None:
            raise ReferenceNotFoundError(f"model {name}", "a version with alias staging (or --version)", "none")
        if _already_there(client, name, PRODUCTION, target, "promote", actor, reason):
            log.info("%s version %s is production already", name, target)
            return None
        current = alias_version(client, name, PRODUCTION)
        if forward_only and current is not None and int(current) > int(target):
            log.info("%s: production stays at version %s, newer than %s", name, current, target)
            return None
        _require_promotable(client, name, target, current, by_default=version is None, automatic=forward_only)
        return _move(client, name, PRODUCTION, target, "promote", actor, reason)


def production_stack(history: list[AliasMove]) -> list[str]:
    """The production versions still reachable by rollbacks, oldest first (the last is current)."""
    stack: list[str] = []
    for entry in history:
        if entry.alias != PRODUCTION:
            continue
        if entry.action == "rollback" and entry.to_version in stack:
            while stack[-1] != entry.to_version:
                stack.pop()
        else:  # a promotion, or a rollback to a version no longer on the stack: it goes on top
            stack.append(entry.to_version)
    return stack


def rollback(settings: Settings, to_version: str | None = None, actor: str | None = None, reason: str = "") -> AliasMove:
    """Move ``production`` back to the version before it, or to ``to_version``, which must have
    been production before. The version rolled back from is tagged, so that a default
    ``promote`` (the staging version) does not bring it straight back."""
    name = settings.model_name
    actor = actor or cli_actor()
    with registry_reachable(settings), registry_lock(client := tracking_client(settings), name, actor):
        current = alias_version(client, name, PRODUCTION)
        history = read_history(client, name)
        if to_version is None:
            earlier = [v for v in production_stack(history) if v != current]
            if current is None or not earlier:
                raise PromotionRefusedError(
                    f"model {name} production history", "an earlier production version to roll back to",
                    f"none (production is {current or 'unset'})",
                )
            to_version = earlier[-1]
        to_version = str(to_version)
        been_production = {e.to_version for e in history if e.alias == PRODUCTION}
        if to_version == current or to_version not in been_production:
            raise PromotionRefusedError(
                f"model {name} rollback", f"a version that was production before, other than the current "
                f"({', '.join(sorted(been_production - {current}, key=int)) or 'none'})", to_version,
            )
        return _move(client, name, PRODUCTION, to_version, "rollback", actor, reason or "rolled back")


def history(settings: Settings) -> list[AliasMove]:
    with registry_reachable(settings):
        return read_history(tracking_client(settings), settings.model_name)


def format_history(entries: list[AliasMove]) -> str:
    lines = [f"{'#':>3}  {'when (UTC)':<23}  {'alias':<10}  {'action':<8}  {'from':>4} -> {'to':<4}  {'by':<28}  why"]
    for e in entries:
        lines.append(
            f"{e.seq:>3}  {e.at[:23]:<23}  {e.alias:<10}  {e.action:<8}  {e.from_version or '-':>4} -> {e.to_version:<4}  "
            f"{e.actor:<28}  {e.reason}"
        )
    return "\n".join(lines)
