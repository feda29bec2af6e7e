"""Shared CLI plumbing: global state, output formats, rendering, progress. Light imports only."""

from __future__ import annotations

import dataclasses
import enum
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from vcc.core.report import Report
    from vcc.core.workspace import Workspace


class Format(str, enum.Enum):
    table = "table"
    json = "json"
    csv = "csv"
    markdown = "markdown"


FormatOpt = Annotated[
    Format,
    typer.Option("--format", "-f", help="Output: table (for people), json (one document on stdout), csv (a header and rows per table; several tables are separated by a blank line) or markdown (for reports)."),
]
NameOpt = Annotated[str | None, typer.Option("--name", help="Name of the run to create in the workspace (default: from the command and the model or arch, numbered -2, -3... when taken; a taken --name is refused).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA if available), cpu, cuda or cuda:N.")]
WorkersOpt = Annotated[int, typer.Option("--workers", "-j", min=0, help="Loader worker processes (0: decode in the main process).")]

# the training options `vcc train` and `vcc finetune` share (defaults stay per command)
OptimizerOpt = Annotated[str, typer.Option("--optimizer", help="adamw or sgd (Nesterov momentum 0.9; try --lr 0.05).")]
ScheduleOpt = Annotated[str, typer.Option("--schedule", help="cosine, step (x0.1 every third of the epochs) or constant.")]
WarmupOpt = Annotated[float, typer.Option("--warmup", help="Epochs of linear lr warm-up.")]
WeightDecayOpt = Annotated[float, typer.Option("--weight-decay", help="Weight decay (not on biases/norms).")]
AmpOpt = Annotated[bool, typer.Option("--amp/--no-amp", help="Mixed precision on CUDA (bf16 where supported, else fp16).")]
CompileOpt = Annotated[bool, typer.Option("--compile", help="torch.compile the model (CUDA; first epoch slower).")]
CompileModeOpt = Annotated[str | None, typer.Option(
    "--compile-mode", metavar="MODE",
    help="torch.compile mode, implies --compile: default, reduce-overhead, max-autotune or max-autotune-no-cudagraphs "
         "(the fastest measured for 3D CNNs on an H100, after minutes of autotuning).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (runs are reproducible on CPU).")]
TeacherOpt = Annotated[str | None, typer.Option("--teacher", help="Distil from this model (vcc artefact or run), e.g. the unpruned one.")]
KdTemperatureOpt = Annotated[float, typer.Option("--kd-temperature", help="KD softmax temperature T.")]
KdAlphaOpt = Annotated[float, typer.Option("--kd-alpha", help="KD weight: (1-A)*CE + A*T^2*KL.")]
MaxBatchesOpt = Annotated[int | None, typer.Option("--max-batches", hidden=True, help="Cap batches per epoch (smoke runs).")]


class State:
    """Global options set by the root callback."""

    workspace_path: str | None = None
    debug: bool = False
    quiet: bool = False


state = State()


def workspace() -> Workspace:
    """The workspace selected by --workspace / $VCC_HOME / the platform default."""
    from pathlib import Path

    from vcc.core.workspace import Workspace

    if state.workspace_path:
        return Workspace(Path(state.workspace_path).expanduser())
    return Workspace.default()


def stderr_console():
    """A rich console on stderr for progress and logs (stdout stays clean for results)."""
    from rich.console import Console

    return Console(stderr=True, quiet=state.quiet)


def log(message: str) -> None:
    """One log line on stderr."""
    stderr_console().print(message, highlight=False)


def dataset_for(ws: Workspace, data: str | None, model_path: Any, model: str) -> Any:
    """The folder of `--data`, or else of the dataset `model`'s artefact records (said on stderr)."""
    from vcc.core.artefact import read_model_meta, recorded_dataset

    # the model's own header, read strictly: a file that is no model says so (with its hint) first
    path = ws.resolve_dataset_of(data, None if data else recorded_dataset(read_model_meta(model_path)), model)
    if not data:
        log(f"data: {path.name} (recorded in {model}; --data picks another)")
    return path


def render(report: Report, fmt: Format) -> None:
    """Print a Report on stdout in the chosen format."""
    from vcc.core import report as rp

    busy = rp.busy_note(report.doc)
    if busy and fmt in (Format.json, Format.csv):
        log(f"warning: {busy}")
    elif busy:
        report = dataclasses.replace(report, notes=[*report.notes, busy])
    if fmt == Format.json:
        sys.stdout.write(rp.to_json(report.doc) + "\n")
        return
    if fmt == Format.csv:
        sys.stdout.write("\n".join(rp.to_csv(t) for t in report.tables))
        return
    if fmt == Format.markdown:
        sys.stdout.write("\n".join(rp.to_markdown(t) for t in report.tables))
        for note in report.notes:
            sys.stdout.write(f"\n{note}\n")
        return
    from rich.console import Console
    from rich.table import Table as RichTable

    class _Out(Console):
        def on_broken_pipe(self) -> None:  # rich exits 1 here; vcc's one handler decides (cli.py)
            self.quiet = True
            raise BrokenPipeError

    console = _Out(soft_wrap=False)
    if not console.is_terminal:  # piped: don't squeeze tables into 80 columns
        console = _Out(soft_wrap=False, width=160)
    for t in report.tables:
        rt = RichTable(title=t.title or None, caption=t.caption or None, title_justify="left")
        for i, col in enumerate(t.columns):
            numeric = any(isinstance(r[i], (int, float)) and not isinstance(r[i], bool) for r in t.rows)
            rt.add_column(col, justify="right" if numeric else "left")
        for row in t.rows:
            rt.add_row(*(rp.fmt_value(v) for v in row))
        console.print(rt)
    for note in report.notes:
        console.print(note, highlight=False)


def progress(transient: bool = False):
    """A rich Progress on stderr (bars on a terminal; plain, quiet otherwise)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = stderr_console()
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
        disable=not console.is_terminal,
    )


class ProgressHook:
    """Adapts core's progress callbacks to a rich Progress (or to log lines when not a terminal).

    Core functions accept ``progress: Callable[[str, int, int | None, dict], None] | None``:
    called as ``progress(task, done, total, info)``; this object is such a callable.
    """

    def __init__(self, prog: Any) -> None:
        self.prog = prog
        self.tasks: dict[str, Any] = {}

    def __call__(self, task: str, done: int, total: int | None = None, info: dict[str, Any] | None = None) -> None:
        text = "  ".join(f"{k} {_short(v)}" for k, v in (info or {}).items())
        if self.prog.disable:
            if total and (done == total):
                log(f"{task}: {done}/{total} {text}".rstrip())
            return
        if task not in self.tasks:
            self.tasks[task] = self.prog.add_task(task, total=total, info="")
        self.prog.update(self.tasks[task], completed=done, total=total, info=text)


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def parse_kv(items: list[str] | None, what: str) -> dict[str, str]:
    """Parse repeated NAME=VALUE options."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            from vcc.core.errors import UsageError

            raise UsageError(f"{what} expects NAME=VALUE, got {item!r}")
        out[key] = value
    return out


def fit_report(res: Any, title: str, doc: dict[str, Any] | None = None) -> Report:
    """The per-epoch table and JSON document of a finished `vcc train` / `vcc finetune` run."""
    from vcc.core.report import Report, Table, percent

    fr = res.fit
    best = fr.best or {}
    out = {
        "run": res.name, "run_dir": str(res.run_dir), "model": str(fr.model_path), "best": str(fr.best_path),
        "last": str(fr.last_path), **(doc or {}), "epochs": len(fr.history), "best_epoch": best.get("epoch"),
        "video_top1": best.get("val_video_top1"), "selected_on": fr.selected_on, "history": fr.history,
    }
    exits = any("val_exit_top1" in h for h in fr.history)  # early-exit heads: one accuracy per exit
    val_col = "val video top-1 % per exit" if exits else "val video top-1 %"
    table = Table(["epoch", "train loss", "train acc %", val_col, "clips/s", "time s"], title=title)
    for h in fr.history:
        val = ("/".join(f"{percent(v, 1):g}" for v in h["val_exit_top1"]) if exits and h.get("val_exit_top1")
               else percent(h.get("val_video_top1")))
        table.add(h.get("epoch"), h.get("train_loss"), percent(h.get("train_acc")), val, h.get("clips_per_s"), h.get("time_s"))
    notes = list(getattr(res, "notes", []) or [])
    if best and fr.selected_on == "last":
        notes.append(f"model: the last epoch ({best.get('epoch')}), the exit heads after their whole schedule of teachers; "
                     f"epochs are not picked by loss or accuracy; model: {fr.model_path}")
    elif best:
        score = (f"val video top-1 {percent(best['val_video_top1'])}%" if best.get("val_video_top1") is not None
                 else f"lowest train loss {best.get('train_loss')} (no validation split)")
        notes.append(f"best epoch {best.get('epoch')}: {score}; model: {fr.model_path}")
    failed = sum(int(h.get("load_failures", 0)) for h in fr.history)
    if failed:
        notes.append(f"{failed} clip loads failed and were replaced by other videos (the warnings above name the videos); "
                     f"`vcc prepare` again skips files that no longer decode")
    if fr.selected_on == "test":
        notes.append(f"the best epoch was chosen on the test split (the dataset has no other), so its top-1 is optimistic; "
                     f"{res.name}:last is the unselected model")
    return Report(out, [table], notes)


def interrupted(run: str | None) -> Exception:
    """The one-line error (exit 130) for Ctrl-C during a run whose checkpoint is kept."""
    from vcc.core.errors import VccError

    return VccError(f"interrupted: the checkpoint of the last completed epoch is kept; continue with `vcc train --resume {run or 'RUN'}` (it redoes the interrupted epoch)", exit_code=130)
