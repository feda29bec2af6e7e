"""VIB compression benchmark: train a CNN-LSTM, VIB-compress its LSTM, port it dense, compare.

Usage: python bench/vib.py [--quick] [--workspace DIR] [--arch cnn_lstm|lstm_e2e] [...]

On the synthetic default dataset (generated into the workspace): train the model, run VIB
(gates on the LSTM input features and on i, f, g, o), fine-tune the weights under the frozen
masks, port to a dense model with a standard nn.LSTM, and evaluate all of them. cnn_lstm
defaults: tiny backbone with motion=true (the LSTM sees [f_t, f_t - f_(t-1)]), the backbone
trained along (--no-end-to-end freezes it: features only). Prints one JSON document: video
top-1 before/after, LSTM parameters before/after (the paper's 4H(H+L)+8H count), whole-model
parameters, the dense-vs-gated max output difference, timings and the device.
Goal (issue 6): LSTM parameters >= 20x fewer, video top-1 within 1 point.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch


def device_name(device: torch.device) -> str:
    """The device a figure was measured on."""
    from vcc.core.sysinfo import device_name as _name

    return _name(device)


def val_top1(run_dir: Path, epoch: int) -> dict:
    """The validation video top-1 (1 clip, gates hard) fit logged for 1-based `epoch` (hooks count from 0)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("epoch") == epoch and "val_video_top1" in row:
            return {"val_video_top1": row["val_video_top1"]}
    return {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer videos and epochs (a smoke run)")
    ap.add_argument("--workspace", default=None, help="workspace folder (default: a temporary one)")
    ap.add_argument("--arch", default="cnn_lstm", choices=["cnn_lstm", "lstm_e2e", "r3d_tiny"])
    ap.add_argument("--backbone", default="tiny")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument(
        "--motion",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="cnn_lstm: feed the LSTM [f_t, f_t - f_(t-1)] (the synthetic classes differ only in motion)",
    )
    ap.add_argument(
        "--options",
        default=None,
        help="extra arch options as JSON, e.g. '{\"dropout\": 0.2}' (override the flags)",
    )
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=60, help="baseline training epochs")
    ap.add_argument("--vib-epochs", type=int, default=20)
    ap.add_argument(
        "--ft-epochs", type=int, default=20, help="fine-tuning epochs under frozen masks (0: none)"
    )
    ap.add_argument("--lr", type=float, default=3e-3, help="AdamW lr of the baseline")
    ap.add_argument(
        "--vib-lr", type=float, default=2e-3, help="AdamW weight lr during VIB and fine-tuning"
    )
    ap.add_argument("--ib-lr", type=float, default=0.03, help="AdamW lr of the gates (mu, logD)")
    ap.add_argument("--kml", type=float, default=1.0)
    ap.add_argument(
        "--kml-layer",
        action="append",
        default=None,
        metavar="NAME=K",
        help="per-layer kml (repeatable; glob names: lstm.input, lstm.l0.*; default for LSTMs: "
        "lstm.input=2, as an input feature costs 4H LSTM params; --kml-layer none: none)",
    )
    ap.add_argument("--kl-factor", type=float, default=1.5e-3)
    ap.add_argument(
        "--end-to-end",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="cnn_lstm: train the backbone during VIB and fine-tuning too (--no-end-to-end: frozen backbone, features only)",
    )
    ap.add_argument(
        "--base",
        default=None,
        help="reuse this trained model artefact instead of training the baseline",
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1 is fastest on a busy shared CPU)",
    )
    ap.add_argument(
        "--classes", type=int, default=None, help="synthetic classes (default: the dataset default)"
    )
    ap.add_argument("--videos-per-class", type=int, default=None)
    args = ap.parse_args()

    from vcc.core.artefact import ModelMeta, input_spec, load_model, read_model_meta, save_model
    from vcc.core.compress.port import max_abs_diff
    from vcc.core.compress.vib import port_vib, prune_vib
    from vcc.core.data.manifest import load_dataset
    from vcc.core.data.synthetic import prepare_synthetic
    from vcc.core.evaluate import evaluate
    from vcc.core.models import build_model
    from vcc.core.training import TrainConfig, fit, resolve_device
    from vcc.core.workspace import Workspace

    kml_layer: dict[str, float] = {}
    for item in args.kml_layer or []:
        if item == "none":
            continue
        name, sep, val = item.partition("=")
        if not sep:
            ap.error(f"--kml-layer wants NAME=K, not {item!r}")
        kml_layer[name.strip()] = float(val)
    torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    tmp = None
    if args.workspace is None:
        tmp = tempfile.TemporaryDirectory(prefix="vcc-bench-vib-")
        root = Path(tmp.name)
    else:
        root = Path(args.workspace)
    ws = Workspace(root)
    device = resolve_device(args.device)
    t_all = time.perf_counter()
    synth = {"classes": 4, "videos_per_class": 8} if args.quick else {}
    if args.classes:
        synth["classes"] = args.classes
    if args.videos_per_class:
        synth["videos_per_class"] = args.videos_per_class
    if args.quick:
        args.epochs, args.vib_epochs, args.ft_epochs = 2, 2, 1
    t0 = time.perf_counter()
    dname = "synthetic" + "".join(f"-{k[0]}{v}" for k, v in synth.items())
    res = prepare_synthetic(ws, name=dname, replace=True, **synth)
    info = load_dataset(res.path)
    t_prepare = time.perf_counter() - t0

    opts = (
        {"backbone": args.backbone, "hidden_size": args.hidden, "motion": args.motion}
        if args.arch == "cnn_lstm"
        else {"hidden_size": args.hidden}
    )
    if args.arch == "r3d_tiny":
        opts = {}
    if args.options:
        extra = json.loads(args.options)
        if not isinstance(extra, dict):
            ap.error("--options must be a JSON object")
        opts.update(extra)
    torch.manual_seed(args.seed)
    model = build_model(args.arch, num_classes=len(info.classes), **opts)
    meta = ModelMeta(
        arch=args.arch,
        num_classes=len(info.classes),
        options=opts,
        classes=list(info.classes),
        input=input_spec(args.frames, args.size),
    )
    common = {
        "frames": args.frames,
        "size": args.size,
        "device": args.device,
        "seed": args.seed,
        "workers": 0,
        "batch_size": 8,
    }

    def cfg(epochs: int, lr: float, command: str) -> TrainConfig:
        return TrainConfig(
            epochs=epochs, lr=lr, optimizer="adamw", weight_decay=1e-4, command=command, **common
        )

    def acc(path: Path) -> dict:
        m, mt = load_model(path, device=device)
        r = evaluate(m, mt, info, split="test", clips=3, device=str(device))
        return {
            "video_top1": r["video_top1"],
            "clip_top1": r["clip_top1"],
            "latency_ms": r.get("latency_ms"),
        }

    t0 = time.perf_counter()
    if args.base:
        base_path = Path(args.base)
        bmeta = read_model_meta(base_path)
        opts, args.arch = bmeta.options, bmeta.arch
    else:
        base_dir = ws.run_dir("vib-base", create=True)
        fit(model, meta, info, cfg(args.epochs, args.lr, "train"), base_dir)
        base_path = base_dir / "last.safetensors"
    t_train = time.perf_counter() - t0
    base = acc(base_path)

    if args.kml_layer is None and args.arch in ("cnn_lstm", "lstm_e2e"):
        kml_layer = {"lstm.input": 2.0}
    t0 = time.perf_counter()
    freeze = args.arch == "cnn_lstm" and not args.end_to_end

    def run_vib(src: Path, epochs: int, command: str, run_dir: Path, finetune: bool) -> dict:
        return prune_vib(
            src,
            info,
            cfg(epochs, args.vib_lr, command),
            run_dir,
            kml=args.kml,
            ib_lr=args.ib_lr,
            kl_factor=args.kl_factor,
            mask_threshold=0.0,
            kml_layer=kml_layer,
            finetune=finetune,
            freeze_backbone=freeze,
            progress=None,
        )

    vib_dir = ws.run_dir("vib", create=True)
    vib = run_vib(base_path, args.vib_epochs, "prune", vib_dir, finetune=False)
    t_vib = time.perf_counter() - t0
    gated_path = Path(vib["model"])
    vib_acc = acc(gated_path)
    ft_acc, t_ft = None, 0.0
    if args.ft_epochs > 0:
        t0 = time.perf_counter()
        ft = run_vib(
            gated_path, args.ft_epochs, "finetune", ws.run_dir("vib-ft", create=True), finetune=True
        )
        t_ft = time.perf_counter() - t0
        gated_path = Path(ft["model"])
        ft_acc = acc(gated_path)

    t0 = time.perf_counter()
    gated, gmeta = load_model(gated_path, device="cpu")
    dense, dmeta, pinfo = port_vib(gated, gmeta)
    diff = max_abs_diff(gated, dense, gmeta, batch=4)
    dense_path = ws.run_dir("vib-dense", create=True) / "model.safetensors"
    save_model(dense_path, dense, dmeta)
    t_port = time.perf_counter() - t0
    dense_acc = acc(dense_path)

    final = ft_acc or vib_acc
    doc = {
        "benchmark": "vib",
        "device": device_name(device),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "quick": args.quick,
        "dataset": {
            "name": info.name,
            "classes": len(info.classes),
            "train": len(info.split("train")),
            "test": len(info.split("test")),
        },
        "model": {
            "arch": args.arch,
            **opts,
            "frames": args.frames,
            "size": args.size,
            "backbone_frozen_during_vib": freeze,
        },
        "settings": {
            "epochs": args.epochs,
            "vib_epochs": args.vib_epochs,
            "ft_epochs": args.ft_epochs,
            "lr": args.lr,
            "vib_lr": args.vib_lr,
            "ib_lr": args.ib_lr,
            "kml": args.kml,
            "kml_layer": kml_layer,
            "kl_factor": args.kl_factor,
        },
        "base": base,
        "vib": vib_acc,
        "vib_finetuned": ft_acc,
        "dense": dense_acc,
        "chance_video_top1": round(1.0 / len(info.classes), 4),
        "video_top1_drop_points": round(100 * (base["video_top1"] - dense_acc["video_top1"]), 2),
        "kept": vib["kept"],
        "lstm_params_before": pinfo.get("lstm_params_before"),
        "lstm_params_after": pinfo.get("lstm_params_after"),
        "lstm_compression": None
        if pinfo.get("lstm_compression") is None
        else round(pinfo["lstm_compression"], 2),
        "model_params_before": pinfo["params_before"],
        "model_params_after": pinfo["params_after"],
        "model_compression": None
        if pinfo["model_compression"] is None
        else round(pinfo["model_compression"], 3),
        "dense_vs_gated_max_abs_diff": diff,
        "goal_lstm_20x": None
        if "lstm_compression" not in pinfo
        else (pinfo["lstm_compression"] is None or pinfo["lstm_compression"] >= 20),
        "base_above_chance": base["video_top1"] > 1.0 / len(info.classes) + 0.05,
        "goal_within_1_point": (base["video_top1"] - dense_acc["video_top1"]) <= 0.01,
        "paper": {"ucf11_cnn_lstm_compression": 16360, "ucf11_end_to_end_compression": 332},
        "seconds": {
            "prepare": round(t_prepare, 1),
            "train": round(t_train, 1),
            "vib": round(t_vib, 1),
            "finetune": round(t_ft, 1),
            "port": round(t_port, 2),
            "total": round(time.perf_counter() - t_all, 1),
        },
        "history": [
            {**{k: v for k, v in h.items() if k != "kept"}, **val_top1(vib_dir, h["epoch"] + 1)}
            for h in vib["history"]
        ],
        "final_gated_video_top1": final["video_top1"],
    }
    print(json.dumps(doc, indent=2))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
