"""`vcc prune`: channel pruning (taylor, l1, l2, oracle), magnitude masks, or VIB."""

from __future__ import annotations

from typing import Annotated

import typer

from vcc.commands._common import DeviceOpt, Format, FormatOpt, NameOpt, WorkersOpt


def register(app: typer.Typer) -> None:
    @app.command("prune")
    def prune(
        model: Annotated[str, typer.Argument(metavar="MODEL", help="A model .safetensors path or a run name (RUN, RUN:best, RUN:last).", show_default=False)],
        method: Annotated[str | None, typer.Option("--method", "-m", help="taylor | l1 | l2 | oracle (channels), magnitude (element-wise masks) or vib (default: taylor, or --ranking's method).", show_default=False)] = None,
        ratio: Annotated[float | None, typer.Option("--ratio", help="Fraction of prunable channels to remove, in (0, 1).")] = None,
        target_macs: Annotated[float | None, typer.Option("--target-macs", help="Fraction of the MACs to keep, in (0, 1): 0.5 halves them (the ratio is searched).")] = None,
        scope: Annotated[str, typer.Option("--scope", help="global: rank channels across layers (each layer relative to its mean score); layer: the same ratio in every layer.")] = "global",
        ranking: Annotated[str | None, typer.Option("--ranking", help="A ranking from `vcc rank` for the first step (else ranked here): its file, or the rank run's name (RUN, RUN:METHOD).")] = None,
        steps: Annotated[int, typer.Option("--steps", min=1, help="Prune in N steps on a cubic (AGP) schedule, finetuning after each.")] = 1,
        finetune_epochs: Annotated[int, typer.Option("--finetune-epochs", min=0, help="Epochs of finetuning after each step (needs --data).")] = 0,
        round_to: Annotated[int, typer.Option("--round-to", min=1, help="Keep a multiple of N channels in every pruned layer (e.g. 8: faster kernels on CPU SIMD and GPU tensor cores).")] = 1,
        ignore: Annotated[list[str] | None, typer.Option("--ignore", help="Layer-name glob whose output channels are kept (repeatable), e.g. 'layer4.*' or 'layer4' (all inside it).")] = None,
        data: Annotated[str | None, typer.Option("--data", "-d", help="Dataset name or folder: ranking (taylor/oracle), finetuning, accuracy before/after.")] = None,
        batches: Annotated[int, typer.Option("--batches", min=1, help="Batches for taylor/oracle ranking.")] = 8,
        sparsity: Annotated[float | None, typer.Option("--sparsity", help="magnitude: fraction of weights to mask in every conv/linear but the classifier.")] = None,
        sparsity_csv: Annotated[str | None, typer.Option("--sparsity-csv", help="magnitude: per-layer sparsities, CSV rows 'layer,sparsity'.")] = None,
        kml: Annotated[float, typer.Option("--kml", help="vib: KL multiplier per layer.")] = 1.0,
        ib_lr: Annotated[float, typer.Option("--ib-lr", help="vib: learning rate of the gate parameters (mu, logD).")] = 0.1,
        kl_factor: Annotated[float, typer.Option("--kl-factor", help="vib: global KL factor (higher prunes more).")] = 2e-3,
        mask_threshold: Annotated[float, typer.Option("--mask-threshold", help="vib: keep a unit iff log alpha < threshold.")] = 0.0,
        kml_layer: Annotated[list[str] | None, typer.Option("--kml-layer", help="vib: NAME=K, a layer's own KL multiplier (repeatable).")] = None,
        finetune: Annotated[bool, typer.Option("--finetune", help="vib: train weights only under the frozen masks of a VIB model.")] = False,
        epochs: Annotated[int, typer.Option("--epochs", min=1, help="vib: training epochs.")] = 10,
        lr: Annotated[float | None, typer.Option("--lr", help="Learning rate for finetuning / vib training.")] = None,
        batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Batch size for ranking, finetuning and evaluation.")] = 8,
        eval_clips: Annotated[int, typer.Option("--eval-clips", min=1, help="Clips per test video for the accuracy columns.")] = 1,
        workers: WorkersOpt = 0,
        latency_runs: Annotated[int, typer.Option("--latency-runs", min=1, help="Timed CPU forward passes for the latency rows (median).")] = 10,
        device: DeviceOpt = "auto",
        name: NameOpt = None,
        fmt: FormatOpt = Format.table,
    ) -> None:
        """Prune a model into a new run (runs/NAME/model.safetensors) and print a before -> after table.

        Channel methods remove whole output channels with Torch-Pruning's dependency graph, so
        residual adds (shortcut A and B), grouped/depthwise convs and BN stay consistent; the
        classifier keeps its classes. Nothing is written if anything fails.

        Examples:

          vcc prune base -d synthetic --method taylor --target-macs 0.5
          vcc prune base -d synthetic --target-macs 0.5 --steps 3 --finetune-epochs 4
          vcc prune base --method l1 --ratio 0.3 --ignore layer4
          vcc prune base -d synthetic --method magnitude --sparsity 0.8
          vcc prune lstm -d synthetic --method vib --kml 4
        """
        from vcc.commands._common import (
            ProgressHook,
            dataset_for,
            log,
            parse_kv,
            progress,
            render,
            workspace,
        )
        from vcc.core.errors import UsageError
        from vcc.core.report import Report, Table
        from vcc.core.workspace import atomic_dir

        ws = workspace()
        model_path = ws.resolve_model(model)
        from vcc.core.artefact import read_doc
        from vcc.core.compress.prune import needs_data

        ranking_path = ws.resolve_ranking(ranking) if ranking else None
        method_l = (method or (ranking_path and read_doc(ranking_path).get("method")) or "taylor").lower()
        # the recorded dataset where the work needs one, else data only where given
        wanted = needs_data(method_l, finetune_epochs=finetune_epochs, steps=steps, ranked=ranking_path is not None)
        data_path = dataset_for(ws, data, model_path, model) if data or wanted else None
        run_name, _ = ws.new_run_dir(name, f"prune-{ws.model_stem(model_path)}-{method_l}")
        from vcc.core.training import TrainConfig

        mdoc = read_doc(model_path)
        inp = mdoc.get("input") or {}
        cfg = TrainConfig(
            frames=int(inp.get("frames", 8)), size=int(inp.get("size", 32)), epochs=epochs if method_l == "vib" else max(1, finetune_epochs),
            batch_size=batch_size, workers=workers, device=device, command="prune",
            init=str(model_path), **({"lr": lr} if lr is not None else {}),
            **({"optimizer": "adamw", "weight_decay": 1e-4, **({} if lr is not None else {"lr": 1e-3})} if method_l == "vib" else {}),
        )
        run_dir = ws.run_dir(run_name)
        with progress() as prog:
            hook = ProgressHook(prog)
            if method_l == "vib":
                if data_path is None:
                    raise UsageError("--method vib needs --data")
                from vcc.core.compress.vib import prune_vib

                with atomic_dir(run_dir, replace=False) as tmp:
                    res = prune_vib(
                        model_path, data_path, cfg, tmp, kml=kml, ib_lr=ib_lr, kl_factor=kl_factor,
                        mask_threshold=mask_threshold, kml_layer={k: float(v) for k, v in parse_kv(kml_layer, "--kml-layer").items()},
                        finetune=finetune, summaries=True, eval_clips=eval_clips, latency_runs=latency_runs, progress=hook,
                    )
                res = _relocate(res, str(tmp), str(run_dir))
                for w in res.get("warnings", []):
                    log(f"warning: {w}")
                from vcc.core.compress import compare_table

                # before -> after like every other method; "after" is the result's dense port
                tables = [compare_table(res["before"], res["after"], after_label="after (dense port)",
                                        title=f"vcc prune --method vib: {model} -> {run_name} (after: its dense port)")]
                if res.get("table"):
                    tables.append(Table(list(res.get("columns") or [f"c{i}" for i in range(len(res["table"][0]))]), [list(r) for r in res["table"]], title="VIB: kept units per layer"))
                labels = {"compression": "compression x (the gated part: LSTM params or else channels)",
                          "model_compression": "compression x (the whole model: dense port params)",
                          "lstm_compression": None}  # the same figure as compression
                scalars = [[labels.get(k, k), v] for k, v in res.items()
                           if isinstance(v, (int, float, str)) and not isinstance(v, bool) and labels.get(k, k)]
                tables.append(Table(["key", "value"], scalars, title=f"vcc prune --method vib -> {run_name}"))
                render(Report({"run": run_name, **res}, tables, [
                    f"model: {run_dir / 'model.safetensors'} (gated: same MACs until `vcc port {run_name}` makes it dense, "
                    "as the 'after' column is)"]), fmt)
                return
            from vcc.core.compress import compare_table
            from vcc.core.compress.prune import PruneJob, prune_model

            job = PruneJob(
                method=method_l, ratio=ratio, target_macs=target_macs, scope=scope, steps=steps,
                finetune_epochs=finetune_epochs, ignore=list(ignore or []), ranking=str(ranking_path) if ranking_path else None, batches=batches,
                sparsity=sparsity, sparsity_csv=sparsity_csv, eval_clips=eval_clips, latency_runs=latency_runs, round_to=round_to, train=cfg,
            )
            job.validate()
            with atomic_dir(run_dir, replace=False) as tmp:
                res = prune_model(model_path, data_path, job, tmp, progress=hook)
            res["model"] = str(run_dir / "model.safetensors")
        log(f"saved {res['model']}")
        if method_l == "magnitude":  # masks: no channels go, MACs and params stay
            steps_t = Table(["step", "target sparsity", "weights masked (layer mean)"], title="Steps")
            for s in res["steps"]:
                steps_t.add(s["step"], s.get("sparsity") if s.get("sparsity") is not None else "per layer",
                            round(s["masked_fraction"], 4))
        else:
            steps_t = Table(["step", "target", "ratio", "MACs", "params", "channels removed"], title="Steps")
            for s in res["steps"]:
                steps_t.add(s["step"], s.get("target_macs"), s.get("ratio"), s.get("macs"), s.get("params"),
                            sum((s.get("removed") or {}).values()))
        tables = [compare_table(res["before"], res["after"], title=f"vcc prune --method {method_l}: {model} -> {run_name}"), steps_t]
        notes = ["MACs = multiply-accumulates for one clip; latency = median CPU forward at batch 1 (this machine, on the threads named: `vcc --threads N prune ...` picks them; BatchNorm folded, each conv on its fastest CPU kernel, frozen by TorchScript where faster)."]
        if method_l == "magnitude":
            notes.append("Masks do not make the dense model faster: run `vcc port` to drop fully masked channels.")
        if any(s.get("selected_on") == "test" for s in res["steps"]):
            notes.append("Each finetuning step kept its best epoch, chosen on the test split (the dataset has no other): "
                         "the after accuracy is optimistic by that selection.")
        render(Report({"run": run_name, **res}, tables, notes), fmt)


def _relocate(doc: dict, old: str, new: str) -> dict:
    """Replace the temporary run folder in path strings of a result dict."""
    out = {}
    for k, v in doc.items():
        out[k] = v.replace(old, new) if isinstance(v, str) else v
    return out
