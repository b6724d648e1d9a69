"""Promote and roll back: move the registry aliases under the lock, with their history.

MLflow aliases (``candidate``, ``staging``, ``production``) say where a model is now, not how it
got there. Every move made here is also appended to a **promotion history** kept as tags of the
registered model (``promotion.000001``, ``promotion.000002``, ...; each a JSON :class:`AliasMove`:
who or which DAG run, when, alias, from version, to version, why), so it can be read on the
registered model's page in the MLflow UI and with ``pipeline history``.

``promote`` refuses a version whose gate compared it with another production version than the
current one (the gate must be run again), and, when it defaults to the staging version, one
that production was rolled back from. ``rollback`` replays the production history as a stack: a
promotion pushes, a rollback pops, so two rollbacks in a row go two versions back.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pipeline.config import Settings
from pipeline.errors import PromotionRefusedError, ReferenceNotFoundError
from pipeline.registry.history import (
    MAX_REASON,
    PRODUCTION,
    STAGING,
    TAG_APPROVAL,
    TAG_GATE,
    TAG_GATE_PRODUCTION,
    TAG_INFRA,
    TAG_ROLLED_BACK,
    AliasMove,
    alias_version,
    already_there,
    cli_actor,
    moves,
    production_stack,
    read_history,
    record_move,
    record_rejection,
)
from pipeline.registry.lock import registry_lock
from pipeline.registry.outage import is_unavailable, registry_reachable
from pipeline.tracking import tracking_client

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)


def move_alias(
    settings: Settings, alias: str, version: str, action: str, actor: str, reason: str = "", forward_only: bool = False
) -> AliasMove | None:
    """Point ``alias`` at ``version`` under the lock; None if it was there already or, with
    ``forward_only``, if it points at a newer version (a rerun that reused an old model)."""
    name = settings.model_for()
    with registry_reachable(settings), registry_lock(client := tracking_client(settings), name, actor):
        if already_there(client, name, alias, version, action, actor, reason):
            return None
        current = alias_version(client, name, alias)
        if forward_only and current is not None and int(current) > int(version):
            log.info("%s: %s stays at version %s, newer than %s", name, alias, current, version)
            return None
        return record_move(client, name, alias, version, action, actor, reason)


def _require_promotable(
    client: MlflowClient, name: str, version: str, production: str | None, by_default: bool, automatic: bool
) -> None:
    """Refuse a version that did not pass the gate and infra validation; unless a person named
    it, also one whose gate compared it with another production version than today's, and (as
    the default staging version) one that production was rolled back from."""
    from mlflow.exceptions import MlflowException

    where = f"{name} version {version}"
    try:
        tags = client.get_model_version(name, version).tags
    except MlflowException as exc:
        if is_unavailable(exc):
            raise
        raise ReferenceNotFoundError(f"model {name}", f"a version {version}", "none") from exc
    for tag, what in ((TAG_GATE, "the gate"), (TAG_INFRA, "infra validation")):
        if tags.get(tag) != "passed":
            raise PromotionRefusedError(
                where, f"a version that passed {what} (tag {tag}=passed)", repr(tags.get(tag, "no such tag"))
            )
    gated_against = tags.get(TAG_GATE_PRODUCTION)
    if (by_default or automatic) and gated_against != (production or "none"):
        raise PromotionRefusedError(
            where,
            f"a gate against today's production ({production or 'none'})",
            f"a gate against {gated_against}; run the gate again (pipeline gate --version {version})",
        )
    if by_default and tags.get(TAG_APPROVAL) == "rejected":
        raise PromotionRefusedError(
            where,
            "a staging version no one rejected",
            f"rejected by {tags.get('approval.by', 'someone')}; name it (--version {version}) to promote it anyway",
        )
    if by_default and TAG_ROLLED_BACK in tags:
        raise PromotionRefusedError(
            where,
            "a staging version production was not rolled back from",
            f"rolled back at {tags[TAG_ROLLED_BACK]}; name it (--version {version}) to promote it again",
        )


def check_default_promotion(settings: Settings, version: str) -> None:
    """Raise :class:`PromotionRefusedError` unless ``version`` could be promoted as the default
    staging version is (gated against today's production, not rejected, not rolled back from):
    for a promotion a person asks for without naming a version, from the Models page or with an
    approval step, which must refuse what ``pipeline promote`` refuses."""
    name = settings.model_for()
    with registry_reachable(settings):
        client = tracking_client(settings)
        production = alias_version(client, name, PRODUCTION)
        _require_promotable(client, name, str(version), production, by_default=True, automatic=False)


def promote(
    settings: Settings,
    version: str | None = None,
    actor: str | None = None,
    reason: str = "",
    forward_only: bool = False,
) -> AliasMove | None:
    """Move ``production`` to ``version`` (default: the ``staging`` version), which must have
    passed the gate and infra validation. None when it is production already.

    ``forward_only`` is for automation (a training run's ``promotion``, ``auto`` or approved): production never goes
    to an older version, and the gate must have compared against today's production. A person
    naming ``version`` may promote any validated version; the default staging version must also
    have been gated against today's production."""
    name = settings.model_for()
    actor = actor or cli_actor()
    reason = reason or "promoted from staging"
    with registry_reachable(settings), registry_lock(client := tracking_client(settings), name, actor):
        target = str(version) if version else alias_version(client, name, STAGING)
        if target is None:
            raise ReferenceNotFoundError(f"model {name}", "a version with alias staging (or --version)", "none")
        if already_there(client, name, PRODUCTION, target, "promote", actor, reason):
            log.info("%s version %s is production already", name, target)
            return None
        current = alias_version(client, name, PRODUCTION)
        if forward_only and current is not None and int(current) > int(target):
            log.info("%s: production stays at version %s, newer than %s", name, current, target)
            return None
        _require_promotable(client, name, target, current, by_default=version is None, automatic=forward_only)
        return record_move(client, name, PRODUCTION, target, "promote", actor, reason)


def rollback(
    settings: Settings, to_version: str | None = None, actor: str | None = None, reason: str = ""
) -> AliasMove:
    """Move ``production`` back to the version before it, or to ``to_version``, which must have
    been production before. The version rolled back from is tagged, so that a default
    ``promote`` (the staging version) does not bring it straight back."""
    name = settings.model_for()
    actor = actor or cli_actor()
    with registry_reachable(settings), registry_lock(client := tracking_client(settings), name, actor):
        current = alias_version(client, name, PRODUCTION)
        history = read_history(client, name)
        if to_version is None:
            earlier = [v for v in production_stack(history) if v != current]
            if current is None or not earlier:
                raise PromotionRefusedError(
                    f"model {name} production history",
                    "an earlier production version to roll back to",
                    f"none (production is {current or 'unset'})",
                )
            to_version = earlier[-1]
        to_version = str(to_version)
        been_production = {e.to_version for e in moves(history) if e.alias == PRODUCTION}
        if to_version == current or to_version not in been_production:
            raise PromotionRefusedError(
                f"model {name} rollback",
                f"a version that was production before, other than the current "
                f"({', '.join(sorted(been_production - {current}, key=int)) or 'none'})",
                to_version,
            )
        return record_move(client, name, PRODUCTION, to_version, "rollback", actor, reason or "rolled back")


def tag_decision(settings: Settings, version: str, decision: str, actor: str, comment: str) -> None:
    """Write a person's decision on ``version`` into its tags (:data:`TAG_APPROVAL`)."""
    name = settings.model_for()
    with registry_reachable(settings):
        client = tracking_client(settings)
        for key, value in (
            (TAG_APPROVAL, decision),
            ("approval.by", actor),
            ("approval.comment", comment[:MAX_REASON]),
        ):
            client.set_model_version_tag(name, str(version), key, value)


def reject(settings: Settings, version: str, actor: str, reason: str) -> AliasMove:
    """A person refused to promote ``version``: ``production`` stays where it is, and the history
    and the version's tags say who refused and why."""
    name = settings.model_for()
    reason = reason or "rejected"
    with registry_reachable(settings), registry_lock(client := tracking_client(settings), name, actor):
        entry = record_rejection(client, name, PRODUCTION, version, actor, reason)
    tag_decision(settings, version, "rejected", actor, reason)
    return entry


def outcome(settings: Settings, move: AliasMove | None, alias: str = PRODUCTION) -> dict[str, Any]:
    """What a promotion or rollback did, in the one shape the CLI, the Airflow tasks and
    ``pipeline run`` all return: ``moved``, the ``alias`` and the version it points at now
    (``to_version``) of ``model_name``, and the history entry's fields when it moved."""
    name = settings.model_for()
    if move is not None:
        return {"moved": True, "model_name": name, **move.to_dict()}
    with registry_reachable(settings):
        current = alias_version(tracking_client(settings), name, alias)
    return {"moved": False, "model_name": name, "alias": alias, "to_version": current}


def history(settings: Settings) -> list[AliasMove]:
    with registry_reachable(settings):
        return read_history(tracking_client(settings), settings.model_for())
