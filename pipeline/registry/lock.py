"""The registry lock: one alias move at a time per registered model.

Moves are serialised by a registered model named ``<model>.lock`` that exists while a move is in
progress. Creating a registered model is atomic in every MLflow store (a unique name: SQLite,
PostgreSQL or a tracking server), so two promotions started at once, from two Airflow workers or
two shells, cannot interleave: reading the current version, the checks, moving the alias and
numbering the history entry happen under it. The lock carries a token: its holder deletes only
its own, and a waiter that sees one holder keep it for ``LOCK_STALE_S`` (its own clock, no clock
comparison between machines) breaks it. A holder that cannot reach the registry to release its
lock retries for ``LOCK_RELEASE_S``, and leaves it to be broken as stale after that. Airflow's
``promotions`` pool (one slot) keeps the deployment DAGs from even trying at once.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from pipeline.errors import RegistryBusyError
from pipeline.registry.history import reconcile
from pipeline.registry.outage import error_code, first_line, is_unavailable

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

LOCK_WAIT_S = 120.0
"""How long a move waits for another one to finish (a move takes about a second)."""
LOCK_STALE_S = 60.0
"""A lock seen held by the same holder for this long (on the waiter's own clock) was left by a
process that died mid-move, and is broken. A move holds it for about a second."""
LOCK_RELEASE_S = 10.0
"""How long a holder keeps trying to release its lock through a registry outage (a database
restart takes seconds) before leaving it to be broken as stale."""


LOCK_SUFFIX = ".lock"


def is_lock(name: str) -> bool:
    """Whether the registered model ``name`` is a lock of :func:`registry_lock` (held for the
    seconds an alias moves), not a model: listings of models leave it out."""
    return name.endswith(LOCK_SUFFIX)


def _lock_token(client: MlflowClient, lock: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(lock).tags.get("token")
    except MlflowException as exc:
        if error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


@contextmanager
def registry_lock(client: MlflowClient, name: str, actor: str, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """Hold ``<name>.lock`` (a registered model carrying our token) while the body runs."""
    from mlflow.exceptions import MlflowException

    lock, token = f"{name}{LOCK_SUFFIX}", uuid.uuid4().hex
    deadline = time.monotonic() + wait_s
    seen: tuple[str | None, float] = (None, time.monotonic())  # the holder we are waiting on, since when
    try:
        while True:
            try:
                client.create_registered_model(
                    lock,
                    tags={"holder": actor, "token": token},
                    description=f"Held while an alias of {name} moves (pipeline.registry.lock); broken when held by "
                    f"one holder for {LOCK_STALE_S:.0f} s.",
                )
                break
            except MlflowException as exc:
                # Taken; or, through a tracking server, taken and released while the server looked
                # it up to report the conflict (RESOURCE_DOES_NOT_EXIST): either way, try again.
                if error_code(exc) not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
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
                raise RegistryBusyError(
                    f"registry lock {lock}: expected it free within {wait_s:.0f} s, found it "
                    f"held for {now - seen[1]:.0f} s; try again"
                )
            time.sleep(0.05 + random.random() * 0.2)  # jitter: waiters do not retry in step
        reconcile(client, name)
        yield
    finally:
        # Also after a failed create: the registry may have made the lock and lost the answer.
        _release(client, lock, token)


def _release(client: MlflowClient, lock: str, token: str) -> None:
    """Delete ``lock`` if it still carries ``token`` (a waiter may have broken it meanwhile),
    trying again through a short registry outage."""
    deadline, delay = time.monotonic() + LOCK_RELEASE_S, 0.25
    while True:
        try:
            if _lock_token(client, lock) == token:
                _delete_lock(client, lock)
            return
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            if time.monotonic() + delay > deadline:
                log.warning(
                    "registry lock %s left held (%s): it is broken as stale after %.0f s",
                    lock,
                    first_line(exc),
                    LOCK_STALE_S,
                )
                return
        time.sleep(delay)
        delay *= 2


def _delete_lock(client: MlflowClient, lock: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model(lock)
    except MlflowException as exc:
        if error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
            raise
