"""The root CLI: help, version, errors as one line with exit codes."""

from __future__ import annotations

import pytest
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
    """`vcc ... | head`: the reader hangs up after some output; no traceback, no error line, exit 0
    (whether or not the output fitted the pipe before the reader left, --debug or not)."""
    import shlex
    import subprocess
    import sys

    vcc = f"{shlex.quote(sys.executable)} -m vcc"
    cases = [f"{vcc} {cmd} | head -40 > /dev/null" for cmd in ("--help", "train --help", "finetune --help")]
    # a reader that never reads (gone before vcc writes: a sure EPIPE), with and without --debug
    cases += [f"{vcc} {flag} macs r3d_18 --by-layer | true" for flag in ("", "--debug")]
    for case in cases:
        proc = subprocess.run(["bash", "-c", f"set -o pipefail; {case}"], capture_output=True, text=True, timeout=120)
        assert "Traceback" not in proc.stderr and "error:" not in proc.stderr, (case, proc.stderr)
        assert proc.returncode == 0, (case, proc.returncode)


def test_help_paragraphs_reflow_to_the_terminal() -> None:
    """Docstring line breaks are not kept: at 80 columns a paragraph wraps cleanly (no one-word lines)."""
    out = run_vcc("prune", "--help", env={"COLUMNS": "80", "TERM": "dumb"}, check=True).stdout
    flat = [ln.strip(" │") for ln in out.splitlines()]
    assert any("graph, so residual adds" in ln for ln in flat)  # "graph, so" ended a line before
    port = [ln.strip(" │") for ln in run_vcc("port", "--help", env={"COLUMNS": "80"}, check=True).stdout.splitlines()]
    assert "error" not in port  # no one-word line (the docstring broke after "printed; error")


def _examples() -> list[tuple[str, str]]:
    """(command path, example line) for every `Examples:` line in every command's help."""
    import typer

    found: list[tuple[str, str]] = []

    def walk(cmd, path: str) -> None:
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{path} {name}")
        text = cmd.help or ""
        if "Examples:" in text:
            found.extend((path, ln.strip()) for ln in text.split("Examples:", 1)[1].splitlines() if ln.strip().startswith("vcc "))

    walk(typer.main.get_command(app), "vcc")
    return found


def _rest(ctx) -> list[str]:
    """The arguments a group left for its sub-command (click renamed the attribute over versions)."""
    protected = getattr(ctx, "_protected_args", None)
    if protected is None:
        protected = getattr(ctx, "protected_args", [])
    return [*protected, *ctx.args]


def test_every_command_has_examples_that_parse() -> None:
    """Each command's --help shows examples, and each example's options exist and take its values."""
    import shlex

    import typer

    examples = _examples()
    paths = {p for p, _ in examples}
    assert {f"vcc {c}" for c in COMMANDS if c != "prepare"} <= paths
    assert {f"vcc prepare {d}" for d in ("ucf101", "hmdb51", "ucf11", "folder", "synthetic")} <= paths
    root = typer.main.get_command(app)
    for path, line in examples:
        args = shlex.split(line, comments=True)[1:]
        if ">" in args:
            args = args[: args.index(">")]
        ctx = root.make_context("vcc", list(args), resilient_parsing=False)
        cmd, rest = root, _rest(ctx)
        while hasattr(cmd, "commands"):  # down the groups (vcc prepare <dataset>)
            _, cmd, rest = cmd.resolve_command(ctx, rest)
            ctx = cmd.make_context(cmd.name, rest, parent=ctx)  # parses and type-checks every option
            rest = _rest(ctx)
        assert path.endswith(cmd.name) or path == "vcc", (path, line)


def test_bad_option_value_is_one_line() -> None:
    res = run_vcc("prepare", "ucf101", "--root", ".", "--splits", ".", "--split", "4")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--split" in lines[0], res.stderr
    res = run_vcc("--threads", "0", "macs", "r3d_tiny")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "--threads" in res.stderr, res.stderr
    res = run_vcc("--bogus")
    assert res.returncode == 2 and res.stderr.strip().splitlines() == ["error: No such option: --bogus (see `vcc -h`)"]


@pytest.mark.parametrize(("args", "hint"), [
    (["macs", "r3d_tiny", "-q"], "error: -q is a global option: put it before the command, e.g. `vcc -q macs ...`"),
    (["macs", "r3d_tiny", "--threads", "1"], "error: --threads is a global option: put it before the command, e.g. `vcc --threads VALUE macs ...`"),
    (["prepare", "synthetic", "--workspace", "/x"],
     "error: --workspace is a global option: put it before the command, e.g. `vcc --workspace VALUE prepare synthetic ...`"),
])
def test_global_options_after_the_command_get_a_hint(args: list[str], hint: str) -> None:
    proc = run_vcc(*args)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [hint]

