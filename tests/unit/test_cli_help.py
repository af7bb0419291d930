"""Every command and every option and argument of ``batchscore`` says what it is for."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import typer.main
from typer.testing import CliRunner

from batchscore.cli import app


def commands(command: Any, path: str = "batchscore") -> Iterator[tuple[str, Any]]:
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from commands(sub, f"{path} {name}")


def test_every_command_option_and_argument_has_help() -> None:
    lacking = []
    seen = [path for path, _ in commands(typer.main.get_command(app))]
    assert {"batchscore run", "batchscore step resolve", "batchscore model list"} <= set(seen)
    for path, command in commands(typer.main.get_command(app)):
        if path != "batchscore" and not (command.help or command.short_help):
            lacking.append(path)
        for param in command.params:
            if getattr(param, "hidden", False) or param.name in ("help",):
                continue
            if not getattr(param, "help", None):
                lacking.append(f"{path} {param.name}")
    assert lacking == []


def test_enumerated_options_show_their_choices() -> None:
    def shown(*args: str) -> str:
        return CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "200"}).output

    run = shown("run")
    assert "<auto|cpu|cuda>" in run and "<fp32|bf16|fp16>" in run
    assert "[local|processes|cuda|auto|tcp://HOST:PORT]" in run
    for command in (["status"], ["versions"], ["gc"], ["model", "list"]):
        assert "-o" in shown(*command) and "<table|json>" in shown(*command), command
