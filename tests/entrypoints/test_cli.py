"""The ``pipeline`` command: help everywhere, exit statuses, one-line errors, JSON output."""

from __future__ import annotations

import json

import pytest
from defects import DEFECTS, broken_copy
from services import free_port, run_cli

from pipeline.entrypoints.cli import build_parser, main

SUBCOMMANDS = [
    "run",
    "acquire",
    "validate",
    "preprocess",
    "train",
    "evaluate",
    "register",
    "export",
    "predict",
    "gate",
    "infra-validate",
    "promote",
    "rollback",
    "history",
    "serve",
    "monitor",
    "summary",
]


@pytest.mark.parametrize("command", [[], *[[c] for c in SUBCOMMANDS]], ids=lambda c: " ".join(c) or "pipeline")
def test_help_everywhere(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: pipeline" in out
    assert "``" not in out, "help is plain text, not reStructuredText"


def test_every_stage_has_a_subcommand():
    choices = build_parser()._subparsers._group_actions[0].choices
    assert set(choices) == set(SUBCOMMANDS)


def test_acquire_json_output(small_dataset, pipeline_home, capsys):
    assert main(["acquire", "--source", str(small_dataset), "--json"]) == 0
    ref = json.loads(capsys.readouterr().out)
    assert len(ref["dataset_hash"]) == 16 and len(ref["files"]) == 4


def test_validate_subcommand_after_acquire(small_dataset, pipeline_home, capsys):
    main(["acquire", "--source", str(small_dataset), "--json"])
    digest = json.loads(capsys.readouterr().out)["dataset_hash"]
    assert main(["validate", "--dataset", digest, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["suites"] == {"raw_profile": True, "raw_dataset": True}


@pytest.mark.parametrize("defect", DEFECTS, ids=lambda d: d.name)
def test_bad_input_exits_2_with_one_line_naming_the_problem(defect, small_dataset, tmp_path, pipeline_home, capsys):
    folder = broken_copy(small_dataset, tmp_path / "fashion-mnist", defect)
    assert main(["run", "--source", str(folder), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    for word in defect.words:
        assert word in err
    assert not (pipeline_home / "storage" / "processed").exists()  # nothing after the failing stage ran


def test_unreachable_source_exits_2(pipeline_home, capsys):
    dead = f"http://127.0.0.1:{free_port()}/fashion"
    assert main(["acquire", "--source", dead]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{dead}/train-images-idx3-ubyte.gz: expected a reachable HTTP server" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["validate", "--dataset", "0123456789abcdef"], "--dataset: expected a dataset hash under"),
        (["preprocess", "--dataset", "0123456789abcdef"], "--dataset: expected a dataset hash under"),
        (["train", "--processed", "feedfacefeedface"], "--processed: expected a processed hash under"),
        (["evaluate", "--run-id", "nosuchrun"], "--run-id: expected a run in sqlite:///"),
        (["summary"], "model fashion-mnist-classifier: expected a version with alias 'candidate'"),
        (["summary", "--model", "photos-classifier"], "model photos-classifier: expected a version with alias"),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, list) else None,
)
def test_unknown_references_exit_2_naming_the_flag(argv, message, pipeline_home, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {message}")


def test_internal_error_exits_1(pipeline_home, capsys, monkeypatch):
    import pipeline.data.acquire

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(pipeline.data.acquire, "acquire", broken)
    assert main(["acquire", "--source", "/tmp"]) == 1
    assert "internal error: RuntimeError: disk on fire" in capsys.readouterr().err


def test_console_script_reports_bad_input_in_one_line(small_dataset, tmp_path, pipeline_home):
    defect = next(d for d in DEFECTS if d.name == "label_out_of_range")
    folder = broken_copy(small_dataset, tmp_path / "fashion-mnist", defect)
    out = run_cli("run", "--source", str(folder))
    assert out.returncode == 2
    assert out.stderr.splitlines() == [out.stderr.strip()] and "labels in 0..9" in out.stderr


def test_monitor_on_broken_new_data_exits_2_naming_the_file(tmp_path, pipeline_home, capsys):
    import numpy as np

    from pipeline.data.idx import write_idx

    (tmp_path / "batch").mkdir()
    write_idx(np.zeros((200, 28, 28), dtype=np.uint8), tmp_path / "batch" / "images-idx3-ubyte.gz")
    assert main(["monitor", "--batch", str(tmp_path / "batch")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "suite incoming_profile" in err and "batch/images-idx3-ubyte.gz" in err


def test_monitor_without_a_model_exits_2(small_dataset, tmp_path, pipeline_home, capsys, real_splits):
    from pipeline.data.idx import write_idx

    (tmp_path / "batch").mkdir()
    write_idx(real_splits["t10k"][0][:300], tmp_path / "batch" / "images-idx3-ubyte.gz")
    assert main(["monitor", "--batch", str(tmp_path / "batch")]) == 2
    assert "expected a version with alias production or candidate, found none" in capsys.readouterr().err
