"""`vcc finetune`: continue training any model artefact (pruned, masked or gated ones included)."""

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
    WorkersOpt,
)


def register(app: typer.Typer) -> None:
    @app.command("finetune")
    def finetune(
        model: Annotated[str, typer.Argument(help="Model artefact (.safetensors) or run name.")],
        data: Annotated[str | None, typer.Option("--data", "-d", help="Prepared dataset name or folder (default: the one the model was made with).", show_default=False)] = None,
        name: NameOpt = None,
        epochs: Annotated[int, typer.Option("--epochs", "-e", help="Epochs.")] = 5,
        batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Clips per batch.")] = 8,
        lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (lower than training from scratch).")] = 1e-3,
        optimizer: OptimizerOpt = "adamw",
        schedule: ScheduleOpt = "cosine",
        warmup: WarmupOpt = 0.0,
        weight_decay: WeightDecayOpt = 0.01,
        workers: WorkersOpt = 0,
        device: DeviceOpt = "auto",
        amp: AmpOpt = True,
        compile_: CompileOpt = False,
        compile_mode: CompileModeOpt = None,
        seed: SeedOpt = 0,
        teacher: TeacherOpt = None,
        kd_temperature: KdTemperatureOpt = 4.0,
        kd_alpha: KdAlphaOpt = 0.5,
        max_batches: MaxBatchesOpt = None,
        fmt: FormatOpt = Format.table,
    ) -> None:
        """Fine-tune a model on a dataset, keeping its structure (pruned shapes, masks, gates).

        Frames and size come from the model's input spec. Continue an interrupted fine-tune with
        [bold]vcc train --resume RUN[/bold].

        Examples:

          vcc finetune base-pruned -d synthetic --epochs 6 --lr 1e-3
          vcc finetune base-pruned -d synthetic --teacher base
        """
        from vcc.commands._common import (
            ProgressHook,
            dataset_for,
            fit_report,
            interrupted,
            progress,
            render,
            workspace,
        )
        from vcc.core import train_run
        from vcc.core.training import TrainConfig

        ws = workspace()
        data = str(dataset_for(ws, data, ws.resolve_model(model), model))
        cfg = TrainConfig(
            frames=0, size=0, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, schedule=schedule,
            warmup=warmup, weight_decay=weight_decay, workers=workers, device=device, amp=amp, compile=compile_, compile_mode=compile_mode,
            seed=seed, kd_temperature=kd_temperature, kd_alpha=kd_alpha, max_batches=max_batches,
        )
        try:
            with progress() as prog:
                res = train_run.start_finetune(ws, model_spec=model, data=data, name=name, cfg=cfg, teacher=teacher, progress=ProgressHook(prog))
        except KeyboardInterrupt:
            raise interrupted(name) from None
        if os.environ.get("RANK", "0") != "0":
            return
        render(fit_report(res, f"finetune {res.name}", {"parent": str(ws.resolve_model(model))}), fmt)
