"""The root CLI: help, version, errors as one line with exit codes."""

from __future__ import annotations

from typer.testing import CliRunner

from tests.conftest import run_vcc
from vcc.cli import COMMANDS, app

runner = CliRunner()


def test_help_lists_every_command() -> None:
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ["prepare", "train", "rank", "prune", "finetune", "port", "eval", "macs", "wise"]:
        assert cmd in COMMANDS
        assert cmd in res.output


def test_version() -> None:
    res = run_vcc("--version")
    assert res.returncode == 0 and res.stdout.startswith("vcc ")


def test_unknown_command_is_usage_error() -> None:
    res = run_vcc("frobnicate")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
