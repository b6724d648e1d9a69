"""The ``pipeline serve`` command line that infra validation, the benchmarks and the tests start
(:func:`pipeline.command_lines.serve_command`) is the one the CLI parses into the same values."""

from __future__ import annotations

import sys

from pipeline.command_lines import serve_command
from pipeline.entrypoints.cli import build_parser
from pipeline.entrypoints.commands import cmd_serve
from pipeline.serving.app import POLL_S


def parsed(command: list[str]):
    assert command[:3] == [sys.executable, "-m", "pipeline"], "run by this interpreter, as `python -m pipeline`"
    return build_parser().parse_args(command[3:])


def test_the_serve_command_parses_into_the_values_it_was_given():
    args = parsed(serve_command("models:/fashion@production", host="0.0.0.0", port=8123, poll_interval=0.5))
    assert args.command == "serve" and args.func is cmd_serve
    assert (args.model_uri, args.host, args.port, args.poll_interval) == (
        "models:/fashion@production",
        "0.0.0.0",
        8123,
        0.5,
    )


def test_the_serve_command_defaults_to_loopback_and_the_servers_poll_interval():
    args = parsed(serve_command("models:/fashion/3", port=8124))
    assert (args.model_uri, args.host, args.port) == ("models:/fashion/3", "127.0.0.1", 8124)
    assert args.poll_interval == POLL_S
