"""The root `vcc` Typer app: global options, error handling, and command registration."""

from __future__ import annotations

import importlib
import inspect
import sys
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from vcc.commands._common import state

# Exceptions the CLI framework handles itself (usage errors, --help, typer.Exit): typer vendors
# click in recent versions, so take the classes from typer rather than importing click.
_PASS_THROUGH = tuple({typer.Exit, typer.Abort, *typer.BadParameter.__mro__[1:3]})
_USAGE_ERROR = typer.BadParameter.__mro__[1]  # click's UsageError

COMMANDS = ["prepare", "train", "rank", "prune", "finetune", "port", "eval", "macs", "wise", "demo"]


class VccGroup(TyperGroup):
    """Turns expected errors into one line on stderr and an exit code; tracebacks only with --debug."""

    def list_commands(self, ctx: Any) -> list[str]:
        return [c for c in COMMANDS if c in self.commands]

    def make_context(self, info_name: Any, args: Any, parent: Any = None, **extra: Any) -> Any:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except _USAGE_ERROR as exc:  # `vcc --bogus`
            _usage_error(exc)
        except BrokenPipeError:  # `vcc --help | head`
            _closed_pipe()
            raise typer.Exit(0) from None

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except _USAGE_ERROR as exc:
            _usage_error(exc)
        except _PASS_THROUGH:
            raise
        except KeyboardInterrupt:
            _error("interrupted", 130)
        except BrokenPipeError:
            _closed_pipe()
            # The work is done (results print last) and the reader chose to stop: exit 0 quietly, as
            # when the output fitted the pipe before the reader left, so `set -o pipefail` sees no race.
            raise typer.Exit(0) from None
        except Exception as exc:  # noqa: BLE001 - the one place every failure is reported
            from vcc.core.errors import VccError

            if state.debug:
                raise
            if isinstance(exc, VccError):
                _error(str(exc), exc.exit_code)
            if isinstance(exc, OSError) and exc.strerror:  # a full disk, a read-only folder, a missing file
                _error(exc.strerror + (f": {exc.filename}" if exc.filename else ""), 1)
            if _is_cuda_oom(exc):
                _error("CUDA out of memory: try a smaller --batch-size (or --frames/--size)", 1)
            first = (str(exc).strip().splitlines() or [""])[0]
            _error(f"{type(exc).__name__}: {first} (run with --debug for the traceback)", 1)


def _usage_error(exc: Any) -> None:
    """Bad usage in one line, like every other error (click's own form is a usage block and a boxed message)."""
    if type(exc).__name__ == "NoArgsIsHelpError":  # `vcc prepare` alone: click prints the help
        raise exc
    where = getattr(exc.ctx, "command_path", None)
    opt = getattr(exc, "option_name", None)
    root = exc.ctx.find_root() if getattr(exc, "ctx", None) is not None else None
    glob = next((p for p in (root.command.params if root is not None and root is not exc.ctx else []) if opt in p.opts), None)
    if glob is not None:  # `vcc macs r3d_tiny -q`: a global option after the command
        arg = "" if getattr(glob, "is_flag", False) else " VALUE"
        sub = (where or "").partition(" ")[2] or exc.ctx.info_name
        _error(f"{opt} is a global option: put it before the command, e.g. `vcc {opt}{arg} {sub} ...`", exc.exit_code)
    _error(exc.format_message() + (f" (see `{where} -h`)" if where else ""), exc.exit_code)


def _is_cuda_oom(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(exc)


def _closed_pipe() -> None:
    """The reader of stdout went away (`vcc ... | head`): silence stdout so nothing else fails."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
    except (OSError, ValueError):
        pass
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives until the process exits


def _error(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


app = typer.Typer(
    cls=VccGroup,
    name="vcc",
    help=(
        "Make video action-recognition networks smaller and faster without losing accuracy.\n\n"
        "Typical flow: vcc prepare synthetic -> vcc train -> vcc rank -> vcc prune -> vcc finetune "
        "-> vcc port -> vcc eval / vcc macs. Results print as tables; --format json pipes into reports."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from vcc import __version__

        typer.echo(f"vcc {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    workspace: Annotated[
        str | None,
        typer.Option("--workspace", "-w", envvar="VCC_HOME", help="Workspace folder for datasets and runs (default: the platform's user data dir)."),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or log lines on stderr.")] = False,
    threads: Annotated[
        int | None,
        typer.Option("--threads", "-t", envvar="VCC_THREADS", min=1, show_default=False,
                     help="CPU threads for PyTorch: training, evaluation and the latency rows (default: PyTorch's, one per core). "
                          "Batch-1 latency of small models is often lower on 1 thread."),
    ] = None,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Global options."""
    state.workspace_path = workspace
    state.debug = debug
    state.quiet = quiet
    if threads is not None:
        from vcc.core.sysinfo import set_cpu_threads

        set_cpu_threads(threads)


def _reflow(doc: str | None) -> str | None:
    """A docstring as help text: each paragraph's lines joined, so rich wraps it to the terminal.

    Typer keeps the single line breaks of every paragraph after the first, which at 80 columns
    leaves one-word lines. Paragraphs that are lists or indented blocks keep their breaks.
    """
    if not doc:
        return doc
    out = []
    for para in inspect.cleandoc(doc).split("\n\n"):
        lines = para.splitlines()
        if para.startswith("\b") or any(ln.startswith((" ", "-", "*", "|")) for ln in lines):
            out.append(para)
        else:
            out.append(" ".join(ln.strip() for ln in lines))
    return "\n\n".join(out)


def _reflow_help(t: typer.Typer) -> None:
    for info in t.registered_commands:
        if info.help is None and info.callback is not None:
            info.help = _reflow(info.callback.__doc__)
    for group in t.registered_groups:
        if group.typer_instance is not None:
            _reflow_help(group.typer_instance)


for _name in COMMANDS:
    importlib.import_module(f"vcc.commands.{_name}").register(app)
_reflow_help(app)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    if "--debug" in (argv if argv is not None else sys.argv[1:]):
        state.debug = True
    import signal

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        # `kill`, a scheduler's preemption: unwind like Ctrl-C (temporary files removed, training
        # keeps its last completed epoch) instead of dying mid-write
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        app(args=argv, prog_name="vcc")
    except BrokenPipeError:
        _closed_pipe()
        sys.exit(0)
    finally:
        # The work is over and reported: a Ctrl-C or SIGTERM landing during interpreter shutdown
        # (where Python restores the default handlers) must not turn a finished command into "killed".
        for sig in (signal.SIGINT, signal.SIGTERM) if argv is None else ():  # the console script only
            try:
                signal.signal(sig, signal.SIG_IGN)
            except (ValueError, OSError):  # not the main thread (an embedding application)
                pass


if __name__ == "__main__":
    main()
