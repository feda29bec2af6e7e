"""`vcc macs`: multiply-accumulates and parameters of an arch or a model, total and per layer."""

from __future__ import annotations

from typing import Annotated

import typer

from vcc.commands._common import Format, FormatOpt


def register(app: typer.Typer) -> None:
    @app.command("macs")
    def macs(
        target: Annotated[
            str,
            typer.Argument(
                metavar="ARCH_OR_MODEL",
                help="An arch name (see the list in the error for an unknown one), a model .safetensors path, or a run name (RUN, RUN:best, RUN:last).",
                show_default=False,
            ),
        ],
        frames: Annotated[int | None, typer.Option("--frames", "-T", min=1, help="Clip length T (default: the arch's, or the model's input spec).")] = None,
        size: Annotated[int | None, typer.Option("--size", "-S", min=1, help="Frame height = width (default: the arch's, or the model's input spec).")] = None,
        num_classes: Annotated[int | None, typer.Option("--num-classes", "-n", min=1, help="Classifier outputs for an arch name (default: 400, as in published Kinetics-400 figures).")] = None,
        by_layer: Annotated[bool, typer.Option("--by-layer", help="Also list every layer's own MACs and parameters (JSON 'layers' is empty without it).")] = False,
        fmt: FormatOpt = Format.table,
    ) -> None:
        """Count MACs (multiply-accumulates, not FLOPs) and parameters for one clip at batch size 1.

        Convolutions, linear layers, matrix products and recurrent layers (LSTM: T*4H*(I+H) per layer) count; elementwise ops, pooling and BatchNorm (folded into convs at inference) do not. For a multi-exit model each exit's cumulative MACs are listed too.

        Examples:

          vcc macs r3d_18 --frames 16 --size 112
          vcc macs base --by-layer -f csv > macs.csv
        """
        from vcc.commands._common import log, render, workspace
        from vcc.core.macs import count_macs, exit_macs_for, resolve_target
        from vcc.core.report import Report, Table

        tgt = resolve_target(target, workspace(), num_classes)
        t = frames or tgt.frames
        s = size or tgt.size
        shape = [tgt.channels, t, s, s]
        res = count_macs(tgt.model, shape, by_layer=by_layer)
        exits = exit_macs_for(tgt, t, s)
        if res.uncounted:
            log(f"warning: MACs of these ops are not counted: {', '.join(res.uncounted)}")

        doc: dict = {
            "model": tgt.label,
            "input": shape,
            "macs": res.macs,
            "params": res.params,
            "layers": res.layers,
            "uncounted": res.uncounted,  # ops that may carry MACs but are not counted (missing from the total)
            "not_macs": res.ignored,  # ops counted as no MACs by definition: elementwise, pooling, norms
        }
        if exits is not None:
            doc["exits"] = exits

        dims = "x".join(str(d) for d in shape)
        summary = Table(
            ["model", "input (CxTxHxW)", "GMACs", "M params", "MACs", "params"],
            [[tgt.label, dims, round(res.macs / 1e9, 3), round(res.params / 1e6, 3), res.macs, res.params]],
            title=f"MACs of {tgt.label} for one {dims} clip",
        )
        tables = [summary]
        if by_layer:
            layer_table = Table(["layer", "type", "MACs", "% of MACs", "params"], title="Per layer (own MACs and parameters)")
            for row in res.layers:
                share = round(100.0 * row["macs"] / res.macs, 2) if res.macs else 0.0
                layer_table.add(row["name"] or "(top)", row["type"], row["macs"], share, row["params"])
            tables.append(layer_table)
        if exits:
            full = exits[-1]["macs"] or 1
            exit_table = Table(["exit", "stage", "GMACs", "MACs", "% of final"], title="Cumulative MACs per exit")
            for row in exits:
                exit_table.add(row["exit"], row["stage"], round(row["macs"] / 1e9, 3), row["macs"], round(100.0 * row["macs"] / full, 1))
            tables.append(exit_table)
        notes = ["MACs = multiply-accumulates (one fused multiply-add each), not FLOPs; batch size 1."]
        if exits:
            notes.append(f"MACs above: one forward to the final classifier ({res.macs:,}), without the exit heads; the "
                         f"final exit's {exits[-1]['macs']:,} also charges every head a sample passes on the way "
                         "(params count the heads too).")
            if getattr(tgt.model, "combine", None) is not None:
                notes.append("WISE model: each exit it passes also costs its weighted sum of the exits so far (k*C MACs at "
                             "exit k, C classes), counted in the per-exit MACs.")
        if res.ignored:
            notes.append(f"Not MACs (elementwise, pooling, norms): {', '.join(res.ignored)}.")
        if res.uncounted:
            notes.append(f"Uncounted ops (their MACs are missing from the total): {', '.join(res.uncounted)}.")
        render(Report(doc, tables, notes), fmt)
