"""`vcc wise`: fit WISE on a multi-exit model and sweep early-exit thresholds."""

from __future__ import annotations

from typing import Annotated

import typer

from vcc.commands._common import DeviceOpt, Format, FormatOpt, NameOpt, WorkersOpt


def register(app: typer.Typer) -> None:
    @app.command("wise")
    def wise(
        model: Annotated[str, typer.Argument(help="Multi-exit model: a .safetensors file or a run name (RUN, RUN:best).")],
        data: Annotated[str | None, typer.Option("--data", "-d", help="Prepared dataset (name or folder; default: the one the model was made with); WISE fits on train, reports on test.", show_default=False)] = None,
        lam: Annotated[float, typer.Option("--lambda", help="L1 weight on each exit's ensemble weights.", min=0.0)] = 0.03,
        iters: Annotated[int, typer.Option("--iters", help="Full-batch SGD steps for the WISE weights (3000: converged on the synthetic set, ~3 s).", min=0)] = 3000,
        lr: Annotated[float, typer.Option("--lr", help="SGD learning rate for the WISE weights.", min=0.0)] = 0.01,
        thresholds: Annotated[str, typer.Option("--thresholds", help="Softmax thresholds START:STOP:COUNT (linspace, inclusive) or a comma list.")] = "0:1.1:13",
        batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Clips per batch while collecting logits.", min=1)] = 8,
        fit_split: Annotated[str, typer.Option("--fit-split", help="Split whose logits fit the WISE weights: train (as the paper) or val (held-out videos from `vcc prepare --holdout`).")] = "train",
        workers: WorkersOpt = 0,
        device: DeviceOpt = "auto",
        name: NameOpt = None,
        fmt: FormatOpt = Format.table,
    ) -> None:
        """Weighted ensembles of early exits (WISE) vs vanilla ICs vs constant ensembles.

        Saves every exit's logits (train and test) and learns WISE weights on
        train (or on held-out videos: --fit-split val). Then it sweeps the exit
        threshold on test: accuracy, average MACs per video (each video pays
        everything it ran) and the share leaving at each exit. Writes
        model.safetensors (the multi-exit model with its WISE weights: `vcc
        eval NAME --threshold T` runs it, `vcc macs NAME` counts it),
        logits.safetensors, tradeoff.csv, wise.json and tradeoff.png into a new
        run, runs/NAME (default: wise-MODEL, -2, -3... when taken).

        Examples:

          vcc wise base-exits -d synthetic
          vcc wise base-exits -d synthetic --lambda 0.01 --thresholds 0:1:21
        """
        import shutil
        from pathlib import Path

        from vcc.commands._common import ProgressHook, dataset_for, log, progress, render, workspace
        from vcc.core.wise import parse_thresholds, run_wise

        ws = workspace()
        model_path = ws.resolve_model(model)
        data_path = dataset_for(ws, data, model_path, model)
        thr = parse_thresholds(thresholds)
        run_name, run_dir = ws.new_run_dir(name, f"wise-{ws.model_stem(model_path)}")
        try:
            with progress(transient=True) as prog:
                doc = run_wise(
                    model_path, Path(data_path), run_dir, lam=lam, iters=iters, lr=lr, thresholds=thr,
                    batch_size=batch_size, device=device, workers=workers, fit_split=fit_split, progress=ProgressHook(prog),
                )
        except BaseException:  # nothing half-written: the run folder is new (new_run_dir checked)
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        doc["run"] = run_name
        log(f"wrote {run_dir} (model.safetensors, logits.safetensors, tradeoff.csv, wise.json, tradeoff.png)")
        render(_report(doc), fmt)
        log(f"run the weighted exits: vcc eval {run_name} --threshold T (T from the table above)")


def _report(doc: dict):
    from vcc.core.report import Report, Table, human_count, percent

    full = doc["full"]
    n_exits = len(doc["exits"])
    # one long table (a method column), numbers in their own cells: a CSV a spreadsheet can read
    t = Table(["method", "threshold", "acc %", "MACs per video", "% full", *[f"exit {k + 1} %" for k in range(n_exits)]],
              title="accuracy vs MACs per threshold")
    for method, rows in doc["methods"].items():
        for r in rows:
            pct = round(100 * r["macs"] / full["macs"], 1) if full["macs"] else None
            t.add(method, r["threshold"], percent(r["accuracy"]), int(round(r["macs"])), pct,
                  *[percent(v, 1) for v in r["exits"]])
    tables = [t]
    ex = Table(["exit", "stage", "cumulative MACs", "WISE weights (exits 1..k)"], title="exits")
    for row, w in zip(doc["exits"], doc["wise_weights"], strict=False):
        ex.add(row["exit"], row["stage"], int(row["macs"]), " ".join(f"{v:.3g}" for v in w))
    tables.append(ex)
    n_classes = doc.get("num_classes")
    notes = [
        f"full model (the backbone's own classifier, no exit heads): accuracy {100 * full['accuracy']:.2f}%, "
        f"{human_count(full['macs'])} MACs/video; run {doc.get('run', '')}",
        "MACs are averages per video: each video pays everything it ran, exit heads included; WISE and constant "
        f"ensembles also pay their weighted sums, k*C MACs at exit k{f' (C = {n_classes} classes)' if n_classes else ''}",
    ]
    return Report(doc, tables, notes)
