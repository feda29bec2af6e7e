"""`vcc demo`: the whole job on a fresh machine, from nothing to a summary table.

prepare synthetic -> train r3d_tiny -> rank (taylor) -> prune to half the MACs -> finetune ->
port -> evaluate; VIB on a CNN-LSTM (train, gate, port); early exits + WISE on the trained
r3d_tiny. Every step goes through the same core calls as the commands and leaves a reusable
artefact in the workspace (runs named ``<prefix>-...``, replaced when the demo is re-run).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from vcc.core.artefact import ModelMeta, load_model, provenance, save_model
from vcc.core.progress import ProgressFn
from vcc.core.workspace import Workspace, atomic_dir

Log = Callable[[str], None] | None


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and epochs of the demo (the full plan fits in 5 minutes on a 2-core CPU)."""

    classes: int = 8
    videos_per_class: int = 96
    video_frames: int = 40
    video_size: int = 64
    train_epochs: int = 20
    finetune_epochs: int = 6
    lstm_epochs: int = 6
    vib_epochs: int = 4
    exit_epochs: int = 3
    wise_iters: int = 200
    eval_clips: int = 2
    latency_runs: int = 10


FULL = DemoPlan()
QUICK = DemoPlan(classes=4, videos_per_class=12, video_frames=16, video_size=32, train_epochs=3, finetune_epochs=1,
                 lstm_epochs=2, vib_epochs=2, exit_epochs=1, wise_iters=60, eval_clips=1, latency_runs=5)


@dataclass
class DemoResult:
    """Rows of the summary (one per stage), the runs written, and timings."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    runs: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    dataset: str = ""
    wise: dict[str, Any] = field(default_factory=dict)


def _measure(model: nn.Module, meta: ModelMeta, info: Any, plan: DemoPlan, progress: ProgressFn | None) -> dict[str, Any]:
    """params, MACs and video top-1 of a model on the test split (latency: timed side by side at the end)."""
    from vcc.core.evaluate import summarise_model

    row = summarise_model(model, meta, info, clips=plan.eval_clips, latency_runs=0, progress=progress)
    return {k: row[k] for k in ("params", "macs", "video_top1")}


def run_demo(ws: Workspace, *, quick: bool = False, prefix: str = "demo", device: str = "cpu",
             progress: ProgressFn | None = None, log: Log = None) -> DemoResult:
    """Run the whole pipeline in `ws`; returns the summary rows (see module docstring)."""
    from vcc.core import train_run
    from vcc.core.compress.port import port_model
    from vcc.core.compress.prune import PruneJob, prune_model
    from vcc.core.compress.rank import rank, save_ranking
    from vcc.core.compress.vib import prune_vib
    from vcc.core.data.manifest import load_dataset
    from vcc.core.data.synthetic import prepare_synthetic
    from vcc.core.evaluate import add_paired_latency
    from vcc.core.exits import train_exits
    from vcc.core.training import TrainConfig
    from vcc.core.wise import run_wise

    plan = QUICK if quick else FULL
    say = log or (lambda _msg: None)
    out = DemoResult()
    t_all = time.perf_counter()
    names = {k: f"{prefix}-{k}" for k in ("r3d", "pruned", "finetuned", "ported", "lstm", "vib", "vib-dense", "exits", "wise")}
    for name in names.values():  # the demo's own runs from an earlier demo
        shutil.rmtree(ws.run_dir(name), ignore_errors=True)

    def stage(key: str) -> None:
        out.timings[key] = round(time.perf_counter() - t_stage[0], 1)
        t_stage[0] = time.perf_counter()

    t_stage = [time.perf_counter()]
    say("1/7 preparing the synthetic dataset")
    data_name = f"{prefix}-synthetic"
    prep = prepare_synthetic(ws, name=data_name, replace=True, classes=plan.classes, videos_per_class=plan.videos_per_class,
                             frames=plan.video_frames, size=plan.video_size, seed=0, progress=progress)
    info = load_dataset(prep.path)
    out.dataset = data_name
    stage("prepare")

    base_cfg = TrainConfig(frames=8, size=32, batch_size=8, workers=0, device=device, seed=0)

    say("2/7 training r3d_tiny")
    cfg = dataclasses.replace(base_cfg, epochs=plan.train_epochs)
    run = train_run.start_train(ws, data=str(info.root), arch="r3d_tiny", name=names["r3d"], cfg=cfg, progress=progress)
    base_path = run.fit.model_path
    out.runs["trained"] = str(base_path)
    model, meta = load_model(base_path)
    stage("train")

    say("3/7 ranking channels (taylor) and pruning to half the MACs")
    scores = rank(model, meta, "taylor", data=info, batches=4, batch_size=8, device="cpu", progress=progress)
    ranking_path = save_ranking(run.run_dir / "ranking-taylor.safetensors", scores, method="taylor", model_path=base_path, meta=meta, batches=4)
    job = PruneJob(method="taylor", target_macs=0.5, ranking=str(ranking_path), finetune_epochs=0, eval_clips=plan.eval_clips,
                   latency_runs=0, train=base_cfg)  # timed with every row below
    pruned_dir = ws.run_dir(names["pruned"])
    with atomic_dir(pruned_dir) as tmp:
        pres = prune_model(base_path, info, job, tmp, progress=progress)
    pruned_path = pruned_dir / "model.safetensors"
    out.runs["pruned"] = str(pruned_path)
    keys = ("params", "macs", "video_top1")
    timed: list[tuple[dict[str, Any], nn.Module, ModelMeta]] = []  # every row's model, timed side by side at the end
    out.rows.append({"stage": "trained r3d_tiny", "run": names["r3d"], **{k: pres["before"].get(k) for k in keys}})
    timed.append((out.rows[-1], model, meta))
    out.rows.append({"stage": "pruned (taylor, 50% MACs)", "run": names["pruned"], **{k: pres["after"].get(k) for k in keys}})
    timed.append((out.rows[-1], *load_model(pruned_path)))
    stage("prune")

    say("4/7 fine-tuning the pruned model and porting it")
    cfg = dataclasses.replace(base_cfg, epochs=plan.finetune_epochs, lr=1e-3, warmup=0)
    ft = train_run.start_finetune(ws, model_spec=str(pruned_path), data=str(info.root), name=names["finetuned"], cfg=cfg, progress=progress)
    fm, fmeta = load_model(ft.fit.model_path)
    out.runs["finetuned"] = str(ft.fit.model_path)
    ft_row = _measure(fm, fmeta, info, plan, progress)
    out.rows.append({"stage": "finetuned", "run": names["finetuned"], **ft_row})
    timed.append((out.rows[-1], fm, fmeta))
    dense, dmeta, pinfo = port_model(fm, fmeta)
    dmeta.provenance = provenance(parent=ft.fit.model_path, metrics={"max_abs_diff": pinfo.get("max_abs_diff")})
    ported_path = save_model(ws.run_dir(names["ported"], create=True) / "model.safetensors", dense, dmeta)
    out.runs["ported"] = str(ported_path)
    ported_row = _measure(dense, dmeta, info, plan, progress) if pinfo.get("changed", True) else ft_row
    out.rows.append({"stage": "ported (dense)", "run": names["ported"], **ported_row})
    timed.append((out.rows[-1], dense, dmeta))
    stage("finetune+port")

    say("5/7 training a CNN-LSTM, compressing its LSTM with VIB, porting to a dense nn.LSTM")
    lstm_cfg = dataclasses.replace(base_cfg, epochs=plan.lstm_epochs, lr=3e-3, weight_decay=1e-4)
    lrun = train_run.start_train(ws, data=str(info.root), arch="cnn_lstm", name=names["lstm"], cfg=lstm_cfg,
                                 arch_options={"backbone": "tiny", "hidden_size": 128}, progress=progress)
    lm, lmeta = load_model(lrun.fit.model_path)
    out.runs["cnn_lstm"] = str(lrun.fit.model_path)
    out.rows.append({"stage": "cnn_lstm", "run": names["lstm"], **_measure(lm, lmeta, info, plan, progress)})
    timed.append((out.rows[-1], lm, lmeta))
    vib_cfg = dataclasses.replace(lstm_cfg, epochs=plan.vib_epochs, lr=1e-3, warmup=0)
    vib_dir = ws.run_dir(names["vib"])
    with atomic_dir(vib_dir) as tmp:
        prune_vib(lrun.fit.model_path, info, vib_cfg, tmp, kml=1.0, ib_lr=0.1, kl_factor=2e-3, mask_threshold=0.0,
                  kml_layer={}, finetune=False, freeze_backbone=True, progress=progress)
    gm, gmeta = load_model(vib_dir / "model.safetensors")
    out.runs["vib"] = str(vib_dir / "model.safetensors")
    vdense, vmeta, vinfo = port_model(gm, gmeta)
    vmeta.provenance = provenance(parent=vib_dir / "model.safetensors", metrics={"max_abs_diff": vinfo.get("max_abs_diff")})
    vpath = save_model(ws.run_dir(names["vib-dense"], create=True) / "model.safetensors", vdense, vmeta)
    out.runs["vib_dense"] = str(vpath)
    row = {"stage": "cnn_lstm + VIB (ported)", "run": names["vib-dense"], **_measure(vdense, vmeta, info, plan, progress)}
    for key in ("lstm_params_before", "lstm_params_after", "compression"):
        if key in vinfo:
            row[key] = vinfo[key]
    out.rows.append(row)
    timed.append((row, vdense, vmeta))
    stage("vib")
    add_paired_latency(timed, runs=plan.latency_runs)  # interleaved rounds: the rows' ratios share the machine's noise
    stage("latency")

    say("6/7 early exits on the trained r3d_tiny (progressive KD)")
    ecfg = dataclasses.replace(base_cfg, epochs=plan.exit_epochs, lr=3e-3, warmup=0)
    exits_dir = ws.run_dir(names["exits"], create=True)
    ex = train_exits(base_path, info, ecfg, exits_dir, exits="auto", kd="progressive", progress=progress)
    out.runs["exits"] = str(ex.model_path)
    stage("exits")

    say("7/7 fitting WISE and sweeping exit thresholds")
    wdoc = run_wise(ex.model_path, info, ws.run_dir(names["wise"], create=True), iters=plan.wise_iters, device="cpu", progress=progress)
    full = wdoc["full"]
    rows = wdoc["methods"]["wise"]
    ok = [r for r in rows if r["accuracy"] >= full["accuracy"] - 0.005]
    best = min(ok, key=lambda r: r["macs"]) if ok else max(rows, key=lambda r: (r["accuracy"], -r["macs"]))
    out.wise = {"full": full, "best": best}
    out.rows.append({"stage": f"early exits + WISE (threshold {best['threshold']:.2f})", "run": names["wise"],
                     "params": None, "macs": int(best["macs"]), "latency_ms": None, "video_top1": best["accuracy"]})
    stage("wise")
    out.timings["total"] = round(time.perf_counter() - t_all, 1)
    return out
