"""`vcc train`: train a model on a prepared dataset (resume, KD, early exits, torchrun)."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from vcc.commands._common import DeviceOpt, Format, FormatOpt, NameOpt


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train(
        data: Annotated[str | None, typer.Option("--data", "-d", help="Prepared dataset name or folder.")] = None,
        arch: Annotated[str | None, typer.Option("--arch", "-a", help="Model arch (default: r3d_tiny, or --init's arch).")] = None,
        name: NameOpt = None,
        option: Annotated[list[str] | None, typer.Option("--option", "-o", help="Arch builder option KEY=VALUE (repeatable), e.g. -o backbone=tiny -o hidden_size=64.")] = None,
        frames: Annotated[int, typer.Option("--frames", help="Frames per clip (default: the arch's; r3d_tiny 8).", show_default=False)] = 0,
        size: Annotated[int, typer.Option("--size", help="Crop size in pixels (default: the arch's; r3d_tiny 32).", show_default=False)] = 0,
        epochs: Annotated[int | None, typer.Option("--epochs", "-e", help="Epochs (default: 20).")] = None,
        batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Clips per batch (per process under torchrun).")] = 8,
        lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.")] = 3e-3,
        optimizer: Annotated[str, typer.Option("--optimizer", help="adamw or sgd (Nesterov momentum 0.9; try --lr 0.05).")] = "adamw",
        schedule: Annotated[str, typer.Option("--schedule", help="cosine, step (x0.1 every third of the epochs) or constant.")] = "cosine",
        warmup: Annotated[float, typer.Option("--warmup", help="Epochs of linear lr warm-up.")] = 1.0,
        weight_decay: Annotated[float, typer.Option("--weight-decay", help="Weight decay (not on biases/norms).")] = 0.01,
        workers: Annotated[int | None, typer.Option("--workers", "-j", help="Loader worker processes (default: 0 on CPU, up to 8 on CUDA).")] = None,
        device: DeviceOpt = "auto",
        amp: Annotated[bool, typer.Option("--amp/--no-amp", help="Mixed precision on CUDA (bf16 where supported, else fp16).")] = True,
        compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the model (CUDA; first epoch slower).")] = False,
        seed: Annotated[int, typer.Option("--seed", help="Random seed (runs are reproducible on CPU).")] = 0,
        init: Annotated[str | None, typer.Option("--init", help="Initial weights: a vcc model/run, or a third-party .pth/.safetensors.")] = None,
        teacher: Annotated[str | None, typer.Option("--teacher", help="Distil from this model (vcc artefact or run).")] = None,
        kd_temperature: Annotated[float, typer.Option("--kd-temperature", help="KD softmax temperature T.")] = 4.0,
        kd_alpha: Annotated[float, typer.Option("--kd-alpha", help="KD weight: (1-A)*CE + A*T^2*KL.")] = 0.5,
        resume: Annotated[str | None, typer.Option("--resume", help="Continue run RUN from its last checkpoint.")] = None,
        exits: Annotated[str | None, typer.Option("--exits", help="Early exits on --init's frozen backbone: auto or STAGE,STAGE...")] = None,
        kd: Annotated[str, typer.Option("--kd", help="Early-exit training: ce, progressive or anti-progressive.")] = "progressive",
        teachers: Annotated[str | None, typer.Option("--teachers", help="Early-exit KD teachers, weakest first: A,B,...")] = None,
        kd_epochs: Annotated[str | None, typer.Option("--kd-epochs", help="Epochs per teacher: E1,E2,...")] = None,
        stop_after: Annotated[int | None, typer.Option("--stop-after", hidden=True, help="Stop resumably after N epochs.")] = None,
        max_batches: Annotated[int | None, typer.Option("--max-batches", hidden=True, help="Cap batches per epoch (smoke runs).")] = None,
        fmt: FormatOpt = Format.table,
    ) -> None:
        """Train a model on a prepared dataset; saves runs/<name>/model.safetensors (the best epoch).

        Checkpoints every epoch; Ctrl-C keeps a resumable checkpoint (exit 130),
        and [bold]--resume RUN[/bold] continues it exactly.
        Under [bold]torchrun --nproc_per_node N -m vcc train ...[/bold] it trains
        with DistributedDataParallel.
        """
        from vcc.commands._common import ProgressHook, parse_kv, progress, render, workspace
        from vcc.core import train_run
        from vcc.core.errors import UsageError, VccError
        from vcc.core.training import TrainConfig

        ws = workspace()
        if kd_epochs:
            try:
                kd_epoch_list = [int(e) for e in kd_epochs.split(",") if e.strip()]
            except ValueError as exc:
                raise UsageError(f"--kd-epochs expects integers E1,E2,..., got {kd_epochs!r}") from exc
        else:
            kd_epoch_list = None
        try:
            with progress() as prog:
                hook = ProgressHook(prog)
                if resume:
                    res = train_run.resume(ws, resume, overrides={"epochs": epochs, "workers": workers, "device": device if device != "auto" else None,
                                                                  "stop_after": stop_after, "max_batches": max_batches}, progress=hook)
                else:
                    if not data:
                        raise UsageError("--data NAME is required (or --resume RUN)")
                    cfg = TrainConfig(
                        frames=frames, size=size, epochs=epochs or 20, batch_size=batch_size, lr=lr, optimizer=optimizer,
                        schedule=schedule, warmup=warmup, weight_decay=weight_decay, workers=_auto_workers(device) if workers is None else workers,
                        device=device, amp=amp, compile=compile_, seed=seed, kd_temperature=kd_temperature, kd_alpha=kd_alpha,
                        stop_after=stop_after, max_batches=max_batches,
                    )
                    if exits:
                        res = train_run.train_exits_run(
                            ws, data=data, init=init, name=name, cfg=cfg, exits=exits, kd=kd,
                            teachers=[t for t in (teachers or "").split(",") if t], kd_epochs=kd_epoch_list,
                            kd_temperature=kd_temperature, progress=hook,
                        )
                    else:
                        res = train_run.start_train(ws, data=data, arch=arch, name=name, cfg=cfg, init=init, teacher=teacher,
                                                    arch_options=parse_kv(option, "--option") or None, progress=hook)
        except KeyboardInterrupt:
            run = resume or name or "RUN"
            raise VccError(f"interrupted: the last checkpoint is kept; continue with `vcc train --resume {run}`", exit_code=130) from None
        if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
            render(_report(res), fmt)


def _auto_workers(device: str) -> int:
    """0 on CPU (decoding competes with the model for the cores), else up to 8 processes."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def _report(res):
    from vcc.core.report import Report, Table

    fr = res.fit
    best = fr.best or {}
    doc = {
        "run": res.name,
        "run_dir": str(res.run_dir),
        "model": str(fr.model_path),
        "best": str(fr.best_path),
        "last": str(fr.last_path),
        "epochs": len(fr.history),
        "best_epoch": best.get("epoch"),
        "video_top1": best.get("val_video_top1"),
        "history": fr.history,
    }
    table = Table(["epoch", "train loss", "train acc", "val video top-1", "clips/s", "time s"], title=f"run {res.name}")
    for h in fr.history:
        table.add(h.get("epoch"), h.get("train_loss"), h.get("train_acc"), h.get("val_video_top1"), h.get("clips_per_s"), h.get("time_s"))
    notes = list(res.notes)
    if best:
        notes.append(f"best epoch {best.get('epoch')}: val video top-1 {best.get('val_video_top1')}; model: {fr.model_path}")
    return Report(doc, [table], notes)
