"""`vcc rank`: per-channel importance of every prunable conv, or a sensitivity analysis."""

from __future__ import annotations

from typing import Annotated

import typer

from vcc.commands._common import DeviceOpt, Format, FormatOpt, NameOpt


def register(app: typer.Typer) -> None:
    @app.command("rank")
    def rank(
        model: Annotated[str, typer.Argument(metavar="MODEL", help="A model .safetensors path or a run name (RUN, RUN:best, RUN:last).", show_default=False)],
        data: Annotated[str | None, typer.Option("--data", "-d", help="Dataset name or folder (taylor, oracle and --sensitivity need it).")] = None,
        method: Annotated[str, typer.Option("--method", "-m", help="taylor (|mean act*grad|, L2-normalised per layer), oracle (AdapNet++), l1 or l2 (filter norms).")] = "taylor",
        batches: Annotated[int, typer.Option("--batches", min=1, help="Training batches to accumulate taylor/oracle scores over.")] = 8,
        batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Clips per batch.")] = 4,
        sensitivity: Annotated[bool, typer.Option("--sensitivity", help="Prune one layer at a time at each --ratios value (no retraining) and evaluate.")] = False,
        ratios: Annotated[str, typer.Option("--ratios", help="Comma-separated pruning ratios for --sensitivity.")] = "0.1,0.25,0.5,0.75",
        clips: Annotated[int, typer.Option("--clips", min=1, help="Clips per test video in --sensitivity evaluations.")] = 1,
        ignore: Annotated[list[str] | None, typer.Option("--ignore", help="Layer-name glob to leave out (repeatable), e.g. 'layer4' (all inside it).")] = None,
        out: Annotated[str | None, typer.Option("--out", "-o", help="Ranking file to write (default: runs/NAME/ranking-METHOD.safetensors, NAME from --name or rank-MODEL-METHOD).")] = None,
        device: DeviceOpt = "auto",
        name: NameOpt = None,
        fmt: FormatOpt = Format.table,
    ) -> None:
        """Rank the output channels of every prunable conv and save a ranking for `vcc prune --ranking`.

        With --sensitivity, also prune each coupled channel group alone at every ratio, evaluate
        on the test split, and save sensitivity-METHOD.csv and .png beside the ranking.

        Examples:

          vcc rank base -d synthetic --method taylor --batches 8
          vcc rank base --method l1
          vcc rank base -d synthetic --sensitivity --ratios 0.2,0.4,0.6
        """
        from pathlib import Path

        from vcc.commands._common import ProgressHook, dataset_for, log, progress, render, workspace
        from vcc.core.artefact import load_model
        from vcc.core.compress.rank import DATA_METHODS, layer_table, save_ranking
        from vcc.core.compress.rank import rank as rank_fn
        from vcc.core.report import Report, Table, percent
        from vcc.core.workspace import atomic_dir

        ws = workspace()
        model_path = ws.resolve_model(model)
        method_l = method.lower()
        needs_data = sensitivity or method_l in DATA_METHODS
        data_path = dataset_for(ws, data, model_path, model) if data or needs_data else None
        ratio_list = None
        if sensitivity:
            from vcc.core.compress.sensitivity import parse_ratios

            ratio_list = parse_ratios(ratios)
        net, meta = load_model(model_path)
        with progress() as prog:
            hook = ProgressHook(prog)
            scores = rank_fn(net, meta, method_l, data=data_path, batches=batches, batch_size=batch_size,
                             device=device, ignore=list(ignore or []), progress=hook)
            net.cpu()
            rows = None
            if sensitivity:
                from vcc.core.compress.sensitivity import sensitivity as sens_fn

                rows = sens_fn(net, meta, data_path, scores, ratio_list, clips=clips, device=device,
                               ignore=list(ignore or []), progress=hook)
        written: dict[str, str] = {}

        def save(path: Path) -> None:
            save_ranking(path, scores, method=method_l, model_path=model_path, meta=meta,
                         batches=batches if method_l in DATA_METHODS else None)

        run_name: str | None = None
        if out and not sensitivity:
            save(Path(out))
            written["ranking"] = str(Path(out))
        else:
            run_name, run_dir = ws.new_run_dir(name, f"rank-{ws.model_stem(model_path)}-{method_l}")
            with atomic_dir(run_dir, replace=False) as tmp:
                save(Path(out) if out else tmp / f"ranking-{method_l}.safetensors")
                if rows is not None:
                    from vcc.core.compress.sensitivity import plot, write_csv

                    write_csv(tmp / f"sensitivity-{method_l}.csv", rows)
                    plot(tmp / f"sensitivity-{method_l}.png", rows, title=f"{meta.arch}: sensitivity ({method_l} ranking, no retraining)")
            written["ranking"] = str(Path(out) if out else run_dir / f"ranking-{method_l}.safetensors")
            if rows is not None:
                written["csv"] = str(run_dir / f"sensitivity-{method_l}.csv")
                written["png"] = str(run_dir / f"sensitivity-{method_l}.png")
        for k, v in written.items():
            log(f"saved {k}: {v}")
        layers = layer_table(scores)
        table = Table(["layer", "channels", "min", "median", "max"], [[r["layer"], r["channels"], r["min"], r["median"], r["max"]] for r in layers],
                      title=f"{method_l} ranking of {model}")
        doc = {"model": str(model_path), "method": method_l, "files": written, "layers": layers}
        tables = [table]
        if rows is not None:
            doc["sensitivity"] = rows
            tables.append(Table(["layer", "coupled convs", "channels", "ratio", "removed", "MACs", "video top-1 %"],
                                [[r["layer"], r["coupled"], r["channels"], r["ratio"], r["removed"], r["macs"], percent(r["video_top1"])] for r in rows],
                                title="Sensitivity: one channel group pruned at a time, no retraining"))
        use = written["ranking"] if out else run_name  # a run made here is named; a file given is itself
        render(Report(doc, tables, [f"prune with it: vcc prune {model} --ranking {use} --target-macs 0.5 (or --ratio R)"]), fmt)
