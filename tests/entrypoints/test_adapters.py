"""The Airflow adapter and the CLI return the same outcome in the same shape, and name the person
acting the same way (``actor``)."""

from __future__ import annotations

import argparse
import inspect

import pytest

import pipeline.registry.promote
from pipeline.entrypoints import commands, tasks
from pipeline.registry.history import AliasMove

MOVE = AliasMove(
    seq=3,
    alias="production",
    action="promote",
    from_version="1",
    to_version="2",
    actor="ana via airflow:promote_model/manual__1",
    at="2026-12-02T05:00:00.000+00:00",
    reason="why",
)


@pytest.fixture
def stages(monkeypatch):
    """promote and rollback that record how they were called and move (or not) as told."""
    calls: list[tuple[str, tuple]] = []
    moves: dict[str, AliasMove | None] = {}

    def fake(name):
        def stage(settings, version, actor=None, reason="", **kwargs):
            calls.append((name, (version, actor, reason)))
            return moves.get(name)

        return stage

    monkeypatch.setattr(pipeline.registry.promote, "promote", fake("promote"))
    monkeypatch.setattr(pipeline.registry.promote, "rollback", fake("rollback"))
    return calls, moves


def test_a_move_has_one_shape_in_the_cli_and_the_airflow_adapter(settings, stages):
    _, moves = stages
    moves.update(promote=MOVE, rollback=MOVE)
    args = argparse.Namespace(version="2", to="1", reason="why")
    expected = {"moved": True, "model_name": settings.model_for(), **MOVE.to_dict()}
    assert commands.cmd_promote(args, settings) == tasks.promote({"version": "2"}, MOVE.actor) == expected
    assert commands.cmd_rollback(args, settings) == tasks.rollback({"to_version": "1"}, MOVE.actor) == expected


def test_no_move_has_one_shape_too(settings, stages):
    args = argparse.Namespace(version=None, to=None, reason="")
    # A fresh registry: production points nowhere.
    expected = {"moved": False, "model_name": settings.model_for(), "alias": "production", "to_version": None}
    assert commands.cmd_promote(args, settings) == tasks.promote({}, "someone") == expected


def test_the_person_acting_is_called_actor_everywhere():
    for function in (tasks.register, tasks.infra_validate, tasks.promote, tasks.rollback):
        names = inspect.signature(function).parameters
        assert "actor" in names and "by" not in names, function.__name__
