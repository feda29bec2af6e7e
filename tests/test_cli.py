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


def test_closed_stdout_pipe_is_quiet() -> None:
    """`vcc ... | head`: the reader hangs up after some output; no traceback and no error line."""
    import shlex
    import subprocess
    import sys

    vcc = f"{shlex.quote(sys.executable)} -m vcc"
    for cmd in ("--help", "train --help", "finetune --help"):
        proc = subprocess.run(["bash", "-c", f"set -o pipefail; {vcc} {cmd} | head -40 > /dev/null"], capture_output=True, text=True, timeout=120)
        assert "Traceback" not in proc.stderr and "error:" not in proc.stderr, (cmd, proc.stderr)
        assert proc.returncode in (0, 1), (cmd, proc.returncode)


def test_help_paragraphs_reflow_to_the_terminal() -> None:
    """Docstring line breaks are not kept: at 80 columns a paragraph wraps cleanly (no one-word lines)."""
    out = run_vcc("prune", "--help", env={"COLUMNS": "80", "TERM": "dumb"}, check=True).stdout
    flat = [ln.strip(" │") for ln in out.splitlines()]
    assert any("graph, so residual adds" in ln for ln in flat)  # "graph, so" ended a line before
    port = [ln.strip(" │") for ln in run_vcc("port", "--help", env={"COLUMNS": "80"}, check=True).stdout.splitlines()]
    assert "error" not in port  # no one-word line (the docstring broke after "printed; error")
