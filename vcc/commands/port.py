"""`vcc port`: a masked or gated model -> a dense, physically smaller artefact (optionally ONNX)."""

from __future__ import annotations

from typing import Annotated

import typer

from vcc.commands._common import Format, FormatOpt, NameOpt


def register(app: typer.Typer) -> None:
    @app.command("port")
    def port(
        model: Annotated[str, typer.Argument(metavar="MODEL", help="A model .safetensors path or a run name (RUN, RUN:best, RUN:last).", show_default=False)],
        onnx_path: Annotated[str | None, typer.Option("--onnx", help="Also export the dense model to this ONNX file (reloaded and checked).")] = None,
        data: Annotated[str | None, typer.Option("--data", "-d", help="Dataset name or folder: adds accuracy before/after.")] = None,
        clips: Annotated[int, typer.Option("--clips", min=1, help="Clips per test video for the accuracy rows.")] = 1,
        latency_runs: Annotated[int, typer.Option("--latency-runs", min=1, help="Timed CPU forward passes (median reported).")] = 10,
        name: NameOpt = None,
        fmt: FormatOpt = Format.table,
    ) -> None:
        """Bake magnitude masks or VIB gates into a dense model with the dead channels removed.

        The dense model must reproduce the masked model's outputs (max abs diff printed; error
        above 1e-4 in fp32). A model with nothing to remove ports to an equal artefact (exit 0).
        Writes runs/NAME/model.safetensors (default NAME: port-<model>).

        Examples:

          vcc port base-masked --name base-dense
          vcc port lstm-vib -d synthetic --onnx lstm.onnx
        """

        from vcc.commands._common import log, render, workspace
        from vcc.core.artefact import load_model, provenance, save_model
        from vcc.core.compress import compare_table
        from vcc.core.compress.port import export_onnx, port_model
        from vcc.core.evaluate import add_paired_latency, summarise_model
        from vcc.core.report import Report, Table
        from vcc.core.workspace import atomic_dir

        ws = workspace()
        model_path = ws.resolve_model(model)
        data_path = ws.resolve_dataset(data) if data else None
        run_name, run_dir = ws.new_run_dir(name, f"port-{ws.model_stem(model_path)}")
        net, meta = load_model(model_path)
        dense, dense_meta, info = port_model(net, meta)

        before = summarise_model(net, meta, data_path, clips=clips, latency_runs=0)
        after = summarise_model(dense, dense_meta, data_path, clips=clips, latency_runs=0)
        add_paired_latency([(before, net, meta), (after, dense, dense_meta)], runs=latency_runs)
        dense_meta.provenance = provenance(parent=model_path, metrics={**{k: v for k, v in after.items()}, "max_abs_diff": info.get("max_abs_diff")})
        dense_meta.extra = {**dense_meta.extra, "port": {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool, dict))}}
        onnx_info = None
        with atomic_dir(run_dir, replace=False) as tmp:
            save_model(tmp / "model.safetensors", dense, dense_meta)
            if onnx_path:
                onnx_info = export_onnx(dense, dense_meta, onnx_path)
        out_path = run_dir / "model.safetensors"
        log(f"saved {out_path}")
        if onnx_info:
            log(f"saved ONNX {onnx_info['path']} ({onnx_info['nodes']} nodes, onnx.checker passed)")
        diff = info.get("max_abs_diff")
        doc = {"run": run_name, "model": str(out_path), "source": str(model_path), "kind": info.get("kind", "vib"),
               "changed": bool(info.get("changed", True)), "max_abs_diff": diff, "removed": info.get("removed"),
               "before": before, "after": after, "onnx": onnx_info, "info": info}
        tables = [compare_table(before, after, title=f"vcc port: {model} -> {run_name}")]
        removed = info.get("removed") or {}
        if isinstance(removed, dict) and removed:
            tables.append(Table(["layer (group root)", "channels removed"], [[k, v] for k, v in removed.items()], title="Removed channels"))
        notes = []
        if diff is not None:
            notes.append(f"max |dense - masked| output difference: {diff:.3g} (limit 1e-4, fp32)")
        if info.get("note"):
            notes.append(str(info["note"]))
        render(Report(doc, tables, notes), fmt)
