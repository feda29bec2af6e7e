"""`vcc finetune`: continue training any model artefact (pruned, masked or gated ones included)."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from vcc.commands._common import DeviceOpt, Format, FormatOpt, NameOpt


def register(app: typer.Typer) -> None:
    @app.command("finetune")
    def finetune(
        model: Annotated[str, typer.Argument(help="Model artefact (.safetensors) or run name.")],
        data: Annotated[str, typer.Option("--data", "-d", help="Prepared dataset name or folder.")],
        name: NameOpt = None,
        epochs: Annotated[int, typer.Option("--epochs", "-e", help="Epochs.")] = 5,
        batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Clips per batch.")] = 8,
        lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (lower than training from scratch).")] = 1e-3,
        optimizer: Annotated[str, typer.Option("--optimizer", help="adamw or sgd.")] = "adamw",
        schedule: Annotated[str, typer.Option("--schedule", help="cosine, step or constant.")] = "cosine",
        warmup: Annotated[float, typer.Option("--warmup", help="Epochs of linear lr warm-up.")] = 0.0,
        weight_decay: Annotated[float, typer.Option("--weight-decay", help="Weight decay (not on biases/norms).")] = 0.01,
        workers: Annotated[int, typer.Option("--workers", "-j", help="Loader worker processes (0: decode in the main process).")] = 0,
        device: DeviceOpt = "auto",
        amp: Annotated[bool, typer.Option("--amp/--no-amp", help="Mixed precision on CUDA.")] = True,
        compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
        seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
        teacher: Annotated[str | None, typer.Option("--teacher", help="Distil from this model (e.g. the unpruned one).")] = None,
        kd_temperature: Annotated[float, typer.Option("--kd-temperature", help="KD softmax temperature T.")] = 4.0,
        kd_alpha: Annotated[float, typer.Option("--kd-alpha", help="KD weight: (1-A)*CE + A*T^2*KL.")] = 0.5,
        max_batches: Annotated[int | None, typer.Option("--max-batches", hidden=True, help="Cap batches per epoch.")] = None,
        fmt: FormatOpt = Format.table,
    ) -> None:
        """Fine-tune a model on a dataset, keeping its structure (pruned shapes, masks, gates).

        Frames and size come from the model's input spec. Continue an interrupted fine-tune with
        [bold]vcc train --resume RUN[/bold].
        """
        from vcc.commands._common import ProgressHook, progress, render, workspace
        from vcc.core import train_run
        from vcc.core.errors import VccError
        from vcc.core.report import Report, Table
        from vcc.core.training import TrainConfig

        ws = workspace()
        cfg = TrainConfig(
            frames=0, size=0, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, schedule=schedule,
            warmup=warmup, weight_decay=weight_decay, workers=workers, device=device, amp=amp, compile=compile_,
            seed=seed, kd_temperature=kd_temperature, kd_alpha=kd_alpha, max_batches=max_batches,
        )
        try:
            with progress() as prog:
                res = train_run.start_finetune(ws, model_spec=model, data=data, name=name, cfg=cfg, teacher=teacher, progress=ProgressHook(prog))
        except KeyboardInterrupt:
            raise VccError(f"interrupted: the last checkpoint is kept; continue with `vcc train --resume {name or 'RUN'}`", exit_code=130) from None
        if os.environ.get("RANK", "0") != "0":
            return
        fr = res.fit
        best = fr.best or {}
        doc = {
            "run": res.name, "run_dir": str(res.run_dir), "model": str(fr.model_path), "best": str(fr.best_path),
            "last": str(fr.last_path), "parent": str(ws.resolve_model(model)), "epochs": len(fr.history),
            "best_epoch": best.get("epoch"), "video_top1": best.get("val_video_top1"), "history": fr.history,
        }
        table = Table(["epoch", "train loss", "train acc", "val video top-1", "clips/s", "time s"], title=f"finetune {res.name}")
        for h in fr.history:
            table.add(h.get("epoch"), h.get("train_loss"), h.get("train_acc"), h.get("val_video_top1"), h.get("clips_per_s"), h.get("time_s"))
        render(Report(doc, [table], [f"model: {fr.model_path}"]), fmt)
