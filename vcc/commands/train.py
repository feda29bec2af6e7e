"""`vcc train`: train a model on a prepared dataset (resume, KD, early exits, torchrun)."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from vcc.commands._common import (
    AmpOpt,
    CompileModeOpt,
    CompileOpt,
    DeviceOpt,
    Format,
    FormatOpt,
    KdAlphaOpt,
    KdTemperatureOpt,
    MaxBatchesOpt,
    NameOpt,
    OptimizerOpt,
    ScheduleOpt,
    SeedOpt,
    TeacherOpt,
    WarmupOpt,
    WeightDecayOpt,
)


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train(
        ctx: typer.Context,
        data: Annotated[str | None, typer.Option("--data", "-d", help="Prepared dataset name or folder (with --init, by default the one that model was made with).")] = None,
        arch: Annotated[str | None, typer.Option("--arch", "-a", help="Model arch (default: r3d_tiny, or --init's arch).")] = None,
        name: NameOpt = None,
        option: Annotated[list[str] | None, typer.Option("--option", "-o", help="Arch builder option KEY=VALUE (repeatable), e.g. -o backbone=tiny -o hidden_size=64.")] = None,
        frames: Annotated[int | None, typer.Option("--frames", min=1, help="Frames per clip (default: the arch's; r3d_tiny 8).", show_default=False)] = None,
        size: Annotated[int | None, typer.Option("--size", min=1, help="Crop size in pixels (default: the arch's; r3d_tiny 32).", show_default=False)] = None,
        epochs: Annotated[int | None, typer.Option("--epochs", "-e", min=1, help="Epochs (default: 20).")] = None,
        batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Clips per batch (per process under torchrun).")] = 8,
        lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.")] = 3e-3,
        optimizer: OptimizerOpt = "adamw",
        schedule: ScheduleOpt = "cosine",
        warmup: WarmupOpt = 1.0,
        weight_decay: WeightDecayOpt = 0.01,
        workers: Annotated[int | None, typer.Option("--workers", "-j", help="Loader worker processes (default: 0 on CPU, up to 8 on CUDA).")] = None,
        device: DeviceOpt = "auto",
        amp: AmpOpt = True,
        compile_: CompileOpt = False,
        compile_mode: CompileModeOpt = None,
        seed: SeedOpt = 0,
        init: Annotated[str | None, typer.Option("--init", help="Initial weights: a vcc model/run, or a third-party .pth/.safetensors.")] = None,
        teacher: TeacherOpt = None,
        kd_temperature: KdTemperatureOpt = 4.0,
        kd_alpha: KdAlphaOpt = 0.5,
        resume: Annotated[str | None, typer.Option("--resume", help="Continue run RUN from its last checkpoint.")] = None,
        exits: Annotated[str | None, typer.Option("--exits", help="Early exits on --init's frozen backbone: auto or STAGE,STAGE...")] = None,
        kd: Annotated[str, typer.Option("--kd", help="Early-exit training: ce, progressive or anti-progressive.")] = "progressive",
        teachers: Annotated[str | None, typer.Option("--teachers", help="Early-exit KD teachers, weakest first: A,B,...")] = None,
        kd_epochs: Annotated[str | None, typer.Option("--kd-epochs", help="Epochs per teacher, weakest first, one per teacher plus one for the final classifier (without --teachers: one per exit); their sum is the run's length.")] = None,
        stop_after: Annotated[int | None, typer.Option("--stop-after", hidden=True, help="Stop resumably after N epochs.")] = None,
        max_batches: MaxBatchesOpt = None,
        fmt: FormatOpt = Format.table,
    ) -> None:
        """Train a model on a prepared dataset; saves runs/<name>/model.safetensors (the best epoch).

        Checkpoints every epoch; Ctrl-C keeps a resumable checkpoint (exit 130),
        and [bold]--resume RUN[/bold] continues it exactly.
        Under [bold]torchrun --nproc_per_node N -m vcc train ...[/bold] it trains
        with DistributedDataParallel.

        Examples:

          vcc train -d synthetic -a r3d_tiny --epochs 20 --name base
          vcc train -d ucf101 -a r3d_18 --frames 16 --size 112 --amp --compile
          vcc train -d synthetic --init base --exits auto --kd progressive
          vcc train -d synthetic --resume base
        """
        from vcc.commands._common import (
            ProgressHook,
            dataset_for,
            fit_report,
            interrupted,
            parse_kv,
            progress,
            render,
            workspace,
        )
        from vcc.core import train_run
        from vcc.core.errors import UsageError
        from vcc.core.training import TrainConfig

        ws = workspace()
        if resume:
            _check_resume_options(ctx)
        if exits is None:
            stray = [p for p in ("kd", "teachers", "kd_epochs") if _given(ctx, p)]
            if stray:
                raise UsageError(f"{', '.join('--' + p.replace('_', '-') for p in stray)} set early-exit training and need "
                                 f"--exits (distillation from one model is --teacher)")
        elif not exits.strip():
            raise UsageError("--exits needs auto or a comma list of stages, e.g. layer1,layer2")
        if kd_epochs:
            try:
                kd_epoch_list = [int(e) for e in kd_epochs.split(",") if e.strip()]
            except ValueError as exc:
                raise UsageError(f"--kd-epochs expects integers E1,E2,..., got {kd_epochs!r}") from exc
            if kd != "ce" and epochs is not None and sum(kd_epoch_list) != epochs:
                raise UsageError(f"--kd-epochs {kd_epochs} trains {sum(kd_epoch_list)} epochs but --epochs is {epochs}; "
                                 f"give one of them (--kd-epochs alone sets the length)")
        else:
            kd_epoch_list = None
        try:
            with progress() as prog:
                hook = ProgressHook(prog)
                if resume:
                    res = train_run.resume(ws, resume, data=data, overrides={"epochs": epochs, "workers": workers, "device": device if device != "auto" else None,
                                                                  "stop_after": stop_after, "max_batches": max_batches}, progress=hook)
                else:
                    if not data and init:  # the dataset the initial model was made with
                        data = str(dataset_for(ws, None, ws.resolve_model(init), init))
                    if not data:
                        raise UsageError("--data NAME is required (or --resume RUN, or --init MODEL that records its dataset)")
                    cfg = TrainConfig(
                        frames=frames or 0, size=size or 0, epochs=20 if epochs is None else epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                        schedule=schedule, warmup=warmup, weight_decay=weight_decay, workers=_auto_workers(device) if workers is None else workers,
                        device=device, amp=amp, compile=compile_, compile_mode=compile_mode, seed=seed, kd_temperature=kd_temperature, kd_alpha=kd_alpha,
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
            raise interrupted(resume or name) from None
        if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
            render(fit_report(res, f"run {res.name}"), fmt)


RESUME_OPTIONS = {"resume", "epochs", "workers", "device", "stop_after", "max_batches", "fmt", "data"}


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether option `name` was set on the command line (or by its environment variable)."""
    return getattr(ctx.get_parameter_source(name), "name", "") in ("COMMANDLINE", "ENVIRONMENT")


def _check_resume_options(ctx: typer.Context) -> None:
    """--resume continues a run with the settings it started with: refuse options it would ignore."""
    from vcc.core.errors import UsageError

    given = [p for p in ctx.command.params if p.name not in RESUME_OPTIONS and _given(ctx, p.name)]
    if given:
        names = ", ".join(max(p.opts, key=len) for p in given)
        raise UsageError(f"--resume continues a run with the settings it started with; {names} cannot change "
                         f"(with --resume: --epochs to extend it, --workers, --device, --data where its dataset is now)")


def _auto_workers(device: str) -> int:
    """0 on CPU (decoding competes with the model for the cores), else up to 8 processes."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))

