"""`vcc demo`: the whole pipeline on generated data, ending in one summary table."""

from __future__ import annotations

from typing import Annotated

import typer

from vcc.commands._common import Format, FormatOpt


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        quick: Annotated[bool, typer.Option("--quick", help="Smaller data and fewer epochs (about a minute): checks the pipeline, not the accuracy.")] = False,
        prefix: Annotated[str, typer.Option("--prefix", help="Names of the demo's dataset and runs: PREFIX-synthetic, PREFIX-r3d, ...")] = "demo",
        fmt: FormatOpt = Format.table,
    ) -> None:
        """Run the whole job on a fresh machine: prepare -> train -> rank -> prune -> finetune -> port -> eval, VIB, early exits + WISE.

        Needs no data and no GPU (runs on the CPU: about 4 minutes on 2 quiet cores, longer when they are shared; --quick takes seconds). Every step
        leaves an artefact in the workspace to reuse with the other commands, e.g.
        [bold]vcc macs demo-ported[/bold] or [bold]vcc eval demo-finetuned --data demo-synthetic[/bold].
        Re-running replaces the demo's own runs.

        Examples:

          vcc demo
          vcc demo --quick -f json
        """
        from vcc.commands._common import ProgressHook, log, progress, render, workspace
        from vcc.core.demo import run_demo
        from vcc.core.report import Report, Table, latency_label, percent
        from vcc.core.workspace import check_name

        check_name(prefix, "prefix")
        ws = workspace()
        log(f"workspace: {ws.root}")
        with progress(transient=True) as prog:
            res = run_demo(ws, quick=quick, prefix=prefix, progress=ProgressHook(prog), log=log)
        threads = next((r["latency_threads"] for r in res.rows if r.get("latency_threads")), None)
        table = Table(["stage", "run", "params", "MACs", latency_label(threads, device="CPU"), "video top-1 %"],
                      title="vcc demo: one clip of 3x8x32x32 per forward, MACs = multiply-accumulates")
        for r in res.rows:
            table.add(r["stage"], r["run"], r["params"], r["macs"], r["latency_ms"], percent(r["video_top1"]))
        notes = [f"dataset {res.dataset}; total {res.timings.get('total')} s; "
                 + ", ".join(f"{k} {v} s" for k, v in res.timings.items() if k != "total")]
        vib = next((r for r in res.rows if "lstm_params_after" in r), None)
        if vib:
            notes.append(f"VIB: LSTM params {vib['lstm_params_before']:,} -> {vib['lstm_params_after']:,}")
        notes.append("early-exit row: average MACs per video charged for everything each video ran (fair accounting)")
        doc = {"dataset": res.dataset, "rows": res.rows, "runs": res.runs, "timings": res.timings, "wise": res.wise}
        render(Report(doc, [table], notes), fmt)
