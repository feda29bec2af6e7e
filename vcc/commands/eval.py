"""`vcc eval`: accuracy (clip/video top-1/top-5, per class, confusion), latency and throughput."""

from __future__ import annotations

from typing import Annotated

import typer

from vcc.commands._common import DeviceOpt, Format, FormatOpt, WorkersOpt


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_(
        model: Annotated[str, typer.Argument(help="Model artefact (.safetensors) or run name (RUN, RUN:best, RUN:last).")],
        data: Annotated[str | None, typer.Option("--data", "-d", help="Prepared dataset name or folder (default: the one the model was made with).", show_default=False)] = None,
        split: Annotated[str, typer.Option("--split", help="Dataset split to evaluate: test, train, or val where prepared with --holdout.")] = "test",
        clips: Annotated[int, typer.Option("--clips", "-k", help="Evenly spaced clips per video (video score = mean clip softmax).")] = 3,
        crops: Annotated[int, typer.Option("--crops", help="Spatial crops per clip: 1 (centre) or 3.")] = 1,
        batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Clips per batch.")] = 8,
        workers: WorkersOpt = 0,
        device: DeviceOpt = "auto",
        amp: Annotated[bool, typer.Option("--amp/--no-amp", help="Mixed precision on CUDA.")] = False,
        threshold: Annotated[float | None, typer.Option("--threshold", help="Multi-exit models: leave at the first exit whose max softmax exceeds this.")] = None,
        fmt: FormatOpt = Format.table,
    ) -> None:
        """Evaluate a model: clip/video top-1 and top-5, per-class accuracy, confusion matrix (CSV saved
        beside the model), latency at batch 1 and throughput.

        Examples:

          vcc eval base --clips 3 --crops 3   # on the dataset base was trained on
          vcc eval base-exits -d synthetic --threshold 0.9
          vcc eval runs/base/model.safetensors -d ucf101 -f json
        """
        from pathlib import Path

        from vcc.commands._common import ProgressHook, dataset_for, log, progress, render, workspace
        from vcc.core.artefact import load_model
        from vcc.core.data.manifest import load_dataset
        from vcc.core.errors import UsageError
        from vcc.core.evaluate import evaluate
        from vcc.core.report import Report, Table, latency_label, percent
        from vcc.core.training import check_classes, resolve_device
        from vcc.core.workspace import atomic_write_text

        if crops not in (1, 3):
            raise UsageError(f"--crops must be 1 or 3, got {crops}")
        ws = workspace()
        path = ws.resolve_model(model)
        info = load_dataset(dataset_for(ws, data, path, model))
        dev = resolve_device(device)
        net, meta = load_model(path, device=dev)
        check_classes(meta, list(info.classes), model_name=f"model {model!r}", data_name=f"dataset {info.name!r}")
        with progress(transient=True) as prog:
            hook = ProgressHook(prog)
            if threshold is not None:
                from vcc.core.exits import evaluate_early_exit, is_multi_exit

                if not is_multi_exit(meta):
                    raise UsageError(f"--threshold needs a multi-exit model; {model!r} has no early exits (train some with `vcc train --exits`)")
                res = evaluate_early_exit(net, meta, info, threshold=threshold, split=split, clips=clips, device=dev, progress=hook)
                how = ", WISE-weighted exits" if res["ensemble"] else ""
                render(_early_exit_report(res, f"{model} on {info.name}/{split}, exit threshold {threshold:g}{how}"), fmt)
                return
            res = evaluate(net, meta, info, split=split, clips=clips, crops=crops, batch_size=batch_size, device=dev,
                           workers=workers, progress=hook, amp=amp)
        # confusion matrix beside the model (its run folder for run models); where that folder
        # cannot be written (a read-only share), in the workspace's evals/ folder instead
        # one file per dataset and split, so evaluating another split never overwrites this one
        tag = f"confusion-{info.name}-{split}.csv"
        name = tag if path.name == "model.safetensors" else f"{path.stem}.{tag}"
        import csv
        import io

        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")  # quoted: class names may hold commas or quotes
        writer.writerow(["true\\pred", *info.classes])
        writer.writerows([c, *row] for c, row in zip(info.classes, res["confusion"], strict=True))
        csv_text = buf.getvalue()
        cm_path: Path | None = Path(path).with_name(name)
        try:
            atomic_write_text(cm_path, csv_text)
        except OSError:
            cm_path = ws.root / "evals" / f"{path.parent.name}.{name}"
            try:
                cm_path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(cm_path, csv_text)
            except OSError as exc:  # a read-only model store and workspace: the results still count
                log(f"warning: confusion matrix not saved (neither beside the model nor in {cm_path.parent} is writable: "
                    f"{exc.strerror or exc})")
                cm_path = None
        res["confusion_csv"] = None if cm_path is None else str(cm_path)
        res["model"] = str(path)
        res["dataset"] = info.name
        shown = model if path.name != Path(model).name else path.name  # the run name as typed, else the file
        summary = Table(["metric", "value"], title=f"{shown} on {info.name}/{split}")
        for key in ("clip_top1", "clip_top5", "video_top1", "video_top5"):
            summary.add(key.replace("_", " "), percent(res[key]))
        summary.add("videos", res["videos"])
        summary.add("clips", res["clips"])
        summary.add(latency_label(res.get("latency_threads")), res["latency_ms"])
        summary.add("clips/s (model)", res["clips_per_s"])
        summary.add("clips/s (with decoding)", res["end_to_end_clips_per_s"])
        per_class = Table(["class", "videos", "video top-1 %"], title="per class")
        counts = [sum(row) for row in res["confusion"]]
        for c, n in zip(info.classes, counts, strict=True):
            acc = res["per_class"][c]
            per_class.add(c, n, percent(acc))
        notes = [f"accuracies in %; confusion matrix: {cm_path or 'not saved'}"]
        missing = res["videos_in_split"] - res["videos"]
        if missing > 0:
            notes.append(f"{missing} of {res['videos_in_split']} {split} videos could not be read and are left out of these "
                         f"figures (the warnings above name them)")
        render(Report(res, [summary, per_class], notes), fmt)


def _early_exit_report(res: dict, title: str):
    """`vcc eval --threshold`: the same conventions as a plain eval (accuracies in %, exact MACs)."""
    from vcc.core.report import Report, Table, latency_label, percent

    summary = Table(["metric", "value"], title=title)
    summary.add("video top1", percent(res["accuracy"]))
    summary.add("clip top1", percent(res["clip_accuracy"]))
    summary.add("videos", res["videos"])
    summary.add("clips", res["clips"])
    summary.add("MACs per clip (average)", int(round(res["macs"])))
    summary.add("MACs at the last exit", res["macs_full"])
    summary.add("% of the last exit's MACs", round(100 * res["macs"] / res["macs_full"], 1) if res["macs_full"] else None)
    summary.add(latency_label(res.get("latency_threads"), "median"), round(res["latency_ms"], 3))
    summary.add(latency_label(res.get("latency_threads"), "mean"), round(res["latency_mean_ms"], 3))
    exits = Table(["exit", "stage", "cumulative MACs", "clips leaving %"], title="exits")
    for i, row in enumerate(res["exits"]):
        exits.add(i + 1, row.get("stage"), int(row["macs"]), percent(row["share"], 1))
    notes = ["accuracies in %; every clip pays the MACs of everything it ran, the exit heads it passed included"]
    if res.get("ensemble"):
        notes.append("each exit's output is its WISE-weighted sum of exits 1..k (from `vcc wise`), whose k*C MACs are charged too")
    return Report(res, [summary, exits], notes)
