"""Alias moves, the promotion history, rollback and the registry lock on a real MLflow store
(SQLite in tmp_path). Versions point at a placeholder artifact: these operations never load it."""

from __future__ import annotations

import json

import pytest

from pipeline.entrypoints.cli import main
from pipeline.errors import PromotionRefusedError, ReferenceNotFoundError, RegistryBusyError
from pipeline.registry.history import PRODUCTION, STAGING, AliasMove, alias_version, production_stack
from pipeline.registry.lock import registry_lock
from pipeline.registry.promote import history, move_alias, promote, reject, rollback
from pipeline.tracking import tracking_client


def entry(seq: int, action: str, to: str, alias: str = PRODUCTION) -> AliasMove:
    return AliasMove(seq=seq, alias=alias, action=action, from_version=None, to_version=to, actor="t", at="")


def test_production_stack_pushes_promotions_and_pops_rollbacks():
    moves = [
        entry(1, "promote", "1"),
        entry(2, "stage", "2", STAGING),
        entry(3, "promote", "2"),
        entry(4, "promote", "3"),
        entry(5, "rollback", "2"),
    ]
    assert production_stack(moves) == ["1", "2"]
    assert production_stack([*moves, entry(6, "rollback", "1")]) == ["1"]
    assert production_stack([*moves, entry(6, "rollback", "9")]) == ["1", "2", "9"]  # not on the stack: pushed


@pytest.fixture
def versions(settings, tmp_path):
    """Three versions that passed the gate (against no production) and infra validation."""
    client = tracking_client(settings)
    client.create_registered_model(settings.model_for())
    for _ in range(3):
        version = client.create_model_version(settings.model_for(), str(tmp_path / "model"))
        for tag, value in (
            ("gate.decision", "passed"),
            ("infra_validation", "passed"),
            ("gate.production_version", "none"),
        ):
            client.set_model_version_tag(settings.model_for(), version.version, tag, value)
    return client


def test_promote_rollback_and_history(settings, versions, capsys):
    name = settings.model_for()
    move_alias(settings, STAGING, "1", "stage", "ci")
    assert promote(settings, actor="ci").to_version == "1"  # the staging version by default
    assert promote(settings, "1", actor="ci") is None  # already production: no entry
    promote(settings, "3", actor="bob@host", reason="better on Shirt")
    back = rollback(settings, actor="alice@host", reason="latency")
    assert (back.from_version, back.to_version) == ("3", "1")
    assert alias_version(versions, name, PRODUCTION) == "1"

    assert main(["history"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 1 + 4 and "better on Shirt" in table[3] and "rollback" in table[4]
    assert main(["history", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)["history"]
    assert [(e["alias"], e["from_version"], e["to_version"]) for e in entries] == [
        (STAGING, None, "1"),
        (PRODUCTION, None, "1"),
        (PRODUCTION, "1", "3"),
        (PRODUCTION, "3", "1"),
    ]
    assert [e.seq for e in history(settings)] == [1, 2, 3, 4]


def test_a_rejection_moves_nothing_and_the_history_says_who_and_why(settings, versions):
    name = settings.model_for()
    promote(settings, "1", actor="ci")
    refused = reject(settings, "2", "alice via airflow:training_pipeline/r1", "rejected: Shirt recall too low")
    assert (refused.action, refused.from_version, refused.to_version) == ("reject", "1", "2")
    assert alias_version(versions, name, PRODUCTION) == "1"
    tags = versions.get_model_version(name, "2").tags
    assert tags["approval.decision"] == "rejected" and tags["approval.by"].startswith("alice via ")
    assert tags["approval.comment"] == "rejected: Shirt recall too low"
    [last] = history(settings)[-1:]
    assert last.actor.startswith("alice") and last.reason == "rejected: Shirt recall too low"
    # A retry of the same refusal (the task ran again) adds nothing.
    assert reject(settings, "2", "alice via airflow:training_pipeline/r1", "rejected: Shirt recall too low") == refused
    assert [e.action for e in history(settings)] == ["promote", "reject"]
    # A decision is not a move: rollback and the stack see only the moves.
    assert production_stack(history(settings)) == ["1"]
    promote(settings, "3", actor="ci")
    assert rollback(settings, actor="ci").to_version == "1"
    # At staging, the rejected version is not promoted by default; a person who names it may.
    move_alias(settings, STAGING, "2", "stage", "ci")
    versions.set_model_version_tag(name, "2", "gate.production_version", "1")  # gated against today's
    with pytest.raises(
        PromotionRefusedError, match="expected a staging version no one rejected, found rejected by alice"
    ):
        promote(settings, actor="bob")
    assert promote(settings, "2", actor="bob").to_version == "2"


def test_cli_promote_and_rollback(settings, versions, capsys):
    assert main(["promote", "--version", "2", "--reason", "first"]) == 0
    assert "production: version (none) -> 2" in capsys.readouterr().out
    assert main(["promote", "--version", "3"]) == 0
    assert main(["rollback", "--reason", "bad"]) == 0
    assert "production: version 3 -> 2" in capsys.readouterr().out.splitlines()[-1]
    assert main(["rollback"]) == 2  # nothing earlier than version 2
    assert "expected an earlier production version to roll back to, found none" in capsys.readouterr().err
    assert main(["rollback", "--to", "1"]) == 2  # never production
    assert (
        "expected a version that was production before, other than the current (3), found 1" in capsys.readouterr().err
    )


def test_promotion_needs_a_gate_against_todays_production_unless_a_person_names_the_version(settings, versions):
    name = settings.model_for()
    promote(settings, "1", actor="ci")
    move_alias(settings, STAGING, "2", "stage", "ci")  # gated while there was no production
    with pytest.raises(
        PromotionRefusedError, match=r"a gate against today's production \(1\), found a gate against none"
    ):
        promote(settings, actor="ci")
    with pytest.raises(PromotionRefusedError, match="gate against today's production"):
        promote(settings, "2", actor="airflow:training_pipeline/x", forward_only=True)
    versions.set_model_version_tag(name, "2", "gate.production_version", "1")  # gated again
    assert promote(settings, actor="ci").to_version == "2"
    assert promote(settings, "1", actor="airflow:training_pipeline/y", forward_only=True) is None  # never back
    assert promote(settings, "3", actor="alice@host").to_version == "3"  # named by a person


def test_a_rolled_back_version_is_not_promoted_again_by_default(settings, versions):
    name = settings.model_for()
    promote(settings, "1", actor="ci")
    versions.set_model_version_tag(name, "2", "gate.production_version", "1")
    move_alias(settings, STAGING, "2", "stage", "ci")
    promote(settings, actor="ci")
    rollback(settings, actor="ci", reason="bad answers on Shirt")
    assert alias_version(versions, name, STAGING) == "2"
    with pytest.raises(PromotionRefusedError, match="rolled back at .*; name it"):
        promote(settings, actor="ci")
    assert promote(settings, "2", actor="alice@host").to_version == "2"  # deliberately


def test_a_move_whose_history_entry_was_lost_is_recorded_on_retry(settings, versions):
    name = settings.model_for()
    versions.set_registered_model_alias(name, PRODUCTION, "1")  # the alias moved, then the process died
    assert promote(settings, "1", actor="ci", reason="retry") is None
    [recorded] = history(settings)
    assert (recorded.to_version, recorded.reason) == ("1", "retry (recorded on retry)")


def test_refusals_are_one_line_and_move_nothing(settings, versions):
    name = settings.model_for()
    versions.set_model_version_tag(name, "2", "infra_validation", "failed")
    with pytest.raises(PromotionRefusedError, match="infra_validation=passed"):
        promote(settings, "2", actor="ci")
    with pytest.raises(ReferenceNotFoundError, match="alias staging"):
        promote(settings, actor="ci")  # no staging version yet
    with pytest.raises(ReferenceNotFoundError, match="a version 9"):
        promote(settings, "9", actor="ci")
    assert alias_version(versions, name, PRODUCTION) is None and history(settings) == []


def test_registry_lock_excludes_a_second_holder_and_breaks_a_dead_ones(settings, versions, monkeypatch):
    import pipeline.registry.lock

    name = settings.model_for()
    with registry_lock(versions, name, "first"):
        with pytest.raises(RegistryBusyError, match="expected it free within 0 s"):
            with registry_lock(versions, name, "second", wait_s=0.5):
                pass
    with registry_lock(versions, name, "third"):  # released: free again
        pass
    # A holder that died leaves the lock behind; once it is older than LOCK_STALE_S it is broken.
    versions.create_registered_model(f"{name}.lock", tags={"holder": "dead", "token": "t0"})
    monkeypatch.setattr(pipeline.registry.lock, "LOCK_STALE_S", 0.5)
    with registry_lock(versions, name, "fourth", wait_s=5):
        assert versions.get_registered_model(f"{name}.lock").tags["holder"] == "fourth"
    # A holder whose lock was broken (it hung, then woke up) does not delete the next holder's.
    with registry_lock(versions, name, "slow"):
        versions.delete_registered_model(f"{name}.lock")
        versions.create_registered_model(f"{name}.lock", tags={"holder": "next", "token": "t1"})
    assert versions.get_registered_model(f"{name}.lock").tags["holder"] == "next"
