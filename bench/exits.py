"""Early exits end to end on the synthetic motion dataset: backbone -> ICs (CE vs progressive KD) -> WISE.

Usage: python bench/exits.py [--quick] [--arch A --options JSON --frames T --size S ...]

Prints one JSON document: per-exit test accuracy of ICs trained with CE and with progressive KD
(self-distillation from later exits, then the final classifier), the WISE / vanilla / constant
threshold sweeps (fair MACs: every video pays everything it ran), and the two goals:
WISE at its best threshold within 0.5 point of the final classifier at <= 60% of its MACs, and
WISE at least as accurate as vanilla ICs at every MACs budget of the vanilla sweep.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def goals(doc: dict) -> dict:
    """Check the two goals on a `run_wise` document."""
    from vcc.core.wise import frontier_accuracy

    full_acc, full_macs = doc["full"]["accuracy"], doc["full"]["macs"]
    wise = doc["methods"]["wise"]
    ok = [r for r in wise if r["accuracy"] >= full_acc - 0.005]
    best = min(ok, key=lambda r: r["macs"]) if ok else max(wise, key=lambda r: (r["accuracy"], -r["macs"]))
    budgets = []
    for r in doc["methods"]["vanilla"]:
        w = frontier_accuracy(wise, r["macs"])
        budgets.append({"macs": r["macs"], "vanilla": r["accuracy"], "wise": w})
    return {
        "wise_best": {**best, "macs_fraction": best["macs"] / full_macs, "accuracy_gap_points": 100 * (full_acc - best["accuracy"])},
        "goal_accuracy_within_0.5pt_at_le_60pct_macs": bool(ok) and best["macs"] <= 0.6 * full_macs,
        "wise_ge_vanilla_every_budget": all(b["wise"] is not None and b["wise"] >= b["vanilla"] for b in budgets),
        "wise_gt_vanilla_budgets": sum(1 for b in budgets if b["wise"] is not None and b["wise"] > b["vanilla"]),
        "budgets": len(budgets),
        "min_exit_macs_fraction": doc["exits"][0]["macs"] / full_macs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny run (r3d_tiny, few epochs): checks the pipeline, not the goals")
    ap.add_argument("--arch", default="r3d_tiny")
    ap.add_argument("--options", default="{}", help="builder options as JSON")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--videos-per-class", type=int, default=24)
    ap.add_argument("--epochs", type=int, default=40, help="backbone training epochs")
    ap.add_argument("--ic-epochs", type=int, default=12, help="IC training epochs (per KD mode)")
    ap.add_argument("--lr", type=float, default=3e-3, help="backbone AdamW lr")
    ap.add_argument("--ic-lr", type=float, default=1e-2, help="IC AdamW lr")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--data", default=None, help="reuse a prepared dataset folder instead of generating one")
    ap.add_argument("--backbone", default=None, help="reuse a trained backbone artefact instead of training one")
    ap.add_argument("--lambda", dest="lam", type=float, default=0.03)
    ap.add_argument("--iters", type=int, default=500)
    ap.add_argument("--thresholds", default="0:1:41")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--workspace", default=None, help="keep artefacts here (default: a temp dir)")
    args = ap.parse_args()
    if args.quick:
        args.arch, args.options, args.classes, args.videos_per_class = "r3d_tiny", "{}", 4, 8
        args.epochs, args.ic_epochs, args.iters, args.thresholds = 2, 2, 100, "0:1:11"

    import torch

    torch.set_num_threads(2)
    from vcc.core.artefact import ModelMeta, input_spec, load_model
    from vcc.core.data.manifest import load_dataset
    from vcc.core.data.synthetic import prepare_synthetic
    from vcc.core.exits import evaluate_early_exit, exit_macs, train_exits
    from vcc.core.models import build_model
    from vcc.core.training import TrainConfig, fit
    from vcc.core.wise import parse_thresholds, run_wise
    from vcc.core.workspace import Workspace

    tmp = tempfile.TemporaryDirectory(prefix="vcc-bench-exits-")
    ws = Workspace(Path(args.workspace or tmp.name))
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    if args.data:
        info = load_dataset(Path(args.data))
    else:
        res = prepare_synthetic(ws, name="bench-exits", classes=args.classes, videos_per_class=args.videos_per_class, seed=0)
        info = load_dataset(res.path)
    timings["prepare_s"] = time.perf_counter() - t0

    options = json.loads(args.options)
    torch.manual_seed(0)
    model = build_model(args.arch, len(info.classes), **options)
    meta = ModelMeta(arch=args.arch, num_classes=len(info.classes), options=options, classes=list(info.classes), input=input_spec(args.frames, args.size))
    common = {"frames": args.frames, "size": args.size, "batch_size": args.batch_size, "workers": args.workers, "device": "cpu", "seed": 0, "optimizer": "adamw", "weight_decay": 1e-4}
    t = time.perf_counter()
    if args.backbone:
        base_path = Path(args.backbone)
        base_top1 = None
    else:
        base = fit(model, meta, info, TrainConfig(epochs=args.epochs, lr=args.lr, **common), ws.run_dir("backbone", create=True))
        base_path, base_top1 = base.model_path, base.best.get("val_video_top1")
    timings["backbone_train_s"] = time.perf_counter() - t

    ic_acc: dict[str, list[float]] = {}
    paths: dict[str, Path] = {}
    for kd in ("ce", "progressive"):
        t = time.perf_counter()
        cfg = TrainConfig(epochs=args.ic_epochs, lr=args.ic_lr, warmup=0, **common)
        r = train_exits(base_path, info, cfg, ws.run_dir(f"exits-{kd}", create=True), kd=kd)
        timings[f"ic_train_{kd}_s"] = time.perf_counter() - t
        ic_acc[kd] = r.history[-1]["val_exit_top1"]
        paths[kd] = r.model_path

    t = time.perf_counter()
    doc = run_wise(paths["progressive"], info, ws.run_dir("wise", create=True), lam=args.lam, iters=args.iters,
                   thresholds=parse_thresholds(args.thresholds), device="cpu", workers=args.workers)
    timings["wise_s"] = time.perf_counter() - t
    ce_doc = run_wise(paths["ce"], info, ws.run_dir("wise-ce", create=True), lam=args.lam, iters=args.iters,
                      thresholds=parse_thresholds(args.thresholds), device="cpu", workers=args.workers)
    mmodel, mmeta = load_model(paths["progressive"])
    t = time.perf_counter()
    runtime = []
    g = goals(doc)
    beta = torch.tensor([row + [0.0] * (len(doc["wise_weights"]) - len(row)) for row in doc["wise_weights"]])
    for label, thr, comb in (("vanilla", 0.0, None), ("vanilla", 0.9, None), ("wise", g["wise_best"]["threshold"], beta), ("vanilla", 1.1, None)):
        r = evaluate_early_exit(mmodel, mmeta, info, threshold=thr, device="cpu", combine=comb)
        runtime.append({"method": label, "threshold": thr, "accuracy": r["accuracy"], "latency_ms": round(r["latency_ms"], 2),
                        "macs": r["macs"], "exits": [round(e["share"], 3) for e in r["exits"]]})
    timings["runtime_s"] = time.perf_counter() - t
    out = {
        "bench": "exits",
        "quick": args.quick,
        "setup": {
            "arch": args.arch, "options": options, "frames": args.frames, "size": args.size,
            "dataset": {"classes": len(info.classes), **info.counts}, "epochs": args.epochs, "ic_epochs": args.ic_epochs,
            "lambda": args.lam, "iters": args.iters, "threads": torch.get_num_threads(),
        },
        "backbone_test_top1": base_top1,
        "exit_macs": exit_macs(mmodel, mmeta),
        "ic_test_top1": {"exits": [r["stage"] for r in doc["exits"]], **ic_acc},
        "full": doc["full"],
        "wise_weights": doc["wise_weights"],
        "goals": g,
        "runtime_batch1": runtime,
        "goals_ce_ics": goals(ce_doc),
        "methods": doc["methods"],
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "total_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
