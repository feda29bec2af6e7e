"""Early exits end to end on the synthetic motion dataset: backbone -> ICs (CE vs progressive KD) -> WISE.

Usage: python bench/exits.py [--quick] [--arch A --options JSON --frames T --size S ...]

Default setup: the synthetic default set (8 classes x 96 videos), r3d_tiny with a 3x3x3 stem and
no temporal downsampling (``{"conv1_s_size": 3, "t_stride": 1}``) at 8x32x32, so the four stages
cost about the same and the first exit ~38% of the MACs (stock r3d_tiny: 87%, its 3x7x7 stem
dominates).

Prints one JSON document: per-exit test accuracy of ICs trained with CE and with progressive KD
(self-distillation from later exits, then the final classifier), the WISE / vanilla / constant
threshold sweeps (fair MACs: every video pays everything it ran, passed exits included), and
the two goals:

(a) WISE at its best threshold within 0.5 point of the final classifier at <= 60% of its MACs;
(b) on the accuracy-vs-MACs frontiers, WISE is never worse than vanilla ICs and better somewhere.

Both are judged on each method's exact trade-off curve: every threshold that can change a decision
(0 and each distinct confidence an early exit gives a test video), so neither method is held to
the points a fixed grid happens to hit. A budget B is every distinct average-MACs value of either
curve; at B, compare the best vanilla accuracy at MACs <= B with the best WISE accuracy at
MACs <= B + the ensemble's own weighted-sum cost (sum_k k*C MACs, 80 for 4 exits x 8 classes: a
fraction of a video moving one exit later, so it only lets WISE's all-at-exit-1 point,
beta_11 * logits_1, stand against vanilla's). Each budget is won, tied or lost; the goal is
lost == 0 and won > 0. Each loss (and win) also gets an exact McNemar test on the paired
per-video correctness of the two operating points (``lost_significantly_p_lt_0.05``): with 192
test videos one video is 0.52 pt, so a loss by a few videos is not evidence that vanilla is
better there. ``goals_grid`` repeats the check the sessions-3/4 way (the sweep's fixed grid of
thresholds, budgets at vanilla's points only) for comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


CRITERION = (
    "budgets = distinct average MACs of the vanilla sweep; at budget B vanilla = best vanilla accuracy with MACs <= B, "
    "WISE = best WISE accuracy with MACs <= B + sum_k k*C (the ensemble's weighted sums); won/tied/lost per budget; "
    "goal (b): lost == 0 and won > 0"
)


CRITERION_EXACT = (
    "each method's whole trade-off curve (every threshold that can change a decision); budgets = every distinct average "
    "MACs of either curve (WISE's less the slack); at budget B vanilla = best vanilla accuracy with MACs <= B, WISE = best "
    "WISE accuracy with MACs <= B + sum_k k*C; won/tied/lost per budget; goal (b): lost == 0 and won > 0"
)


DEFAULT_OPTIONS = {"conv1_s_size": 3, "t_stride": 1}


def fine_thresholds() -> list[float]:
    """0, 0.05, ..., 0.9, then 1 - 10^-e for e = 1.125 ... 5 (steps of 1/8), then 1.

    Well-trained ICs put most test videos above 0.95 confidence, so a linear grid leaves the
    useful part of the trade-off with two or three points; this grid is dense where they are.
    """
    low = [round(0.05 * i, 4) for i in range(19)]
    high = [1 - 10 ** (-(1 + i / 8)) for i in range(1, 33)]
    return [*low, *high, 1.0]


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value from the discordant pairs (binomial, p = 1/2)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2**n)


def _operating_points(doc: dict, method: str, exact: bool = True) -> list[tuple[float, float, Any, float]]:
    """(average MACs, accuracy, per-video correctness, threshold) of `method`'s operating points, from the saved test logits.

    exact: every threshold that can change a decision (0 and each distinct confidence of the early exits),
    so the points are the method's whole trade-off curve; else the thresholds of the bench's sweep.
    """
    from safetensors.torch import load_file

    from vcc.core.exits import average_macs
    from vcc.core.wise import (
        combine,
        constant_weights,
        ensemble_macs,
        exact_thresholds,
        exit_decisions,
        vanilla_weights,
    )

    t = load_file(doc["files"]["logits"])
    test, labels = t["test_logits"], t["test_labels"]
    n = test.shape[0]
    weights = {"wise": t["wise_weights"], "vanilla": vanilla_weights(n), "constant": constant_weights(n)}[method]
    out = combine(test, weights)
    preds = out.argmax(-1)
    macs = ensemble_macs([e["macs"] for e in doc["exits"]], out.shape[-1], ensemble=method != "vanilla")
    thresholds = exact_thresholds(out) if exact else [row["threshold"] for row in doc["methods"][method]]
    pts = []
    for thr in thresholds:
        idx = exit_decisions(out, thr)
        correct = preds.gather(0, idx.view(1, -1))[0] == labels
        pts.append((average_macs(idx, macs), float(correct.float().mean()), correct, float(thr)))
    return pts


def compare_frontiers(doc: dict, num_classes: int, pts: dict[str, list], exact: bool = True) -> dict:
    """WISE vs vanilla at every MACs budget (see CRITERION), with McNemar's test on each loss.

    `pts`: each method's operating points (`_operating_points`), for "vanilla" and "wise".
    """
    n_exits = len(doc["exits"])
    slack = num_classes * n_exits * (n_exits + 1) // 2

    def best(method: str, budget: float):
        ok = [p for p in pts[method] if p[0] <= budget * (1 + 1e-9)]
        return max(ok, key=lambda p: p[1]) if ok else None

    budgets = {p[0] for p in pts["vanilla"]} | ({p[0] - slack for p in pts["wise"]} if exact else set())
    rows = []
    for b in sorted(budgets):
        v, w = best("vanilla", b), best("wise", b + slack)
        if v is None:  # below vanilla's cheapest point: nothing to compare
            continue
        verdict = "lost" if w is None or w[1] < v[1] - 1e-9 else "won" if w[1] > v[1] + 1e-9 else "tied"
        row = {"macs": b, "macs_fraction": round(b / doc["full"]["macs"], 4), "vanilla": v[1], "wise": None if w is None else w[1], "verdict": verdict}
        if w is not None and verdict != "tied":
            only_v, only_w = int((v[2] & ~w[2]).sum()), int((w[2] & ~v[2]).sum())
            row.update(videos_only_vanilla_right=only_v, videos_only_wise_right=only_w, mcnemar_p=round(mcnemar_p(only_v, only_w), 4))
        rows.append(row)
    count = {k: sum(1 for r in rows if r["verdict"] == k) for k in ("won", "tied", "lost")}
    lost = [r for r in rows if r["verdict"] == "lost"]
    keys = ("macs_fraction", "vanilla", "wise", "videos_only_vanilla_right", "videos_only_wise_right", "mcnemar_p")
    return {"criterion": CRITERION_EXACT if exact else CRITERION, "slack_macs": slack, "budgets": len(rows), **count,
            "lost_significantly_p_lt_0.05": sum(1 for r in lost if r.get("mcnemar_p", 0.0) < 0.05),
            "lost_at": [{k: r[k] for k in keys if k in r} for r in lost], "rows": rows}


def goals(doc: dict, num_classes: int, exact: bool = True) -> dict:
    """Check the two goals on a `run_wise` document (on each method's exact trade-off curve, or the sweep's grid)."""
    full_acc, full_macs = doc["full"]["accuracy"], doc["full"]["macs"]

    pts = {m: _operating_points(doc, m, exact) for m in ("vanilla", "wise")}

    def best_of(method: str) -> dict:
        if exact:
            rows = [{"threshold": t, "accuracy": a, "macs": m} for m, a, _, t in pts[method]]
        else:
            rows = doc["methods"][method]
        ok = [r for r in rows if r["accuracy"] >= full_acc - 0.005]
        best = min(ok, key=lambda r: r["macs"]) if ok else max(rows, key=lambda r: (r["accuracy"], -r["macs"]))
        return {**best, "macs_fraction": best["macs"] / full_macs, "accuracy_gap_points": 100 * (full_acc - best["accuracy"]), "within_0.5pt": bool(ok)}

    wise_best, vanilla_best = best_of("wise"), best_of("vanilla")
    cmp = compare_frontiers(doc, num_classes, pts, exact)
    return {
        "frontier": "exact" if exact else "grid",
        "wise_best": wise_best,
        "vanilla_best": vanilla_best,
        "goal_accuracy_within_0.5pt_at_le_60pct_macs": wise_best["within_0.5pt"] and wise_best["macs"] <= 0.6 * full_macs,
        "wise_vs_vanilla": {k: v for k, v in cmp.items() if k != "rows"},
        "goal_wise_never_below_vanilla_and_above_somewhere": cmp["lost"] == 0 and cmp["won"] > 0,
        "exit_macs_fractions": [round(e["macs"] / full_macs, 4) for e in doc["exits"]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny run (4 classes x 8 videos, few epochs): checks the pipeline, not the goals")
    ap.add_argument("--arch", default="r3d_tiny")
    ap.add_argument("--options", default=json.dumps(DEFAULT_OPTIONS), help="builder options as JSON")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--videos-per-class", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=40, help="backbone training epochs")
    ap.add_argument("--ic-epochs", type=int, default=24, help="IC training epochs (per KD mode)")
    ap.add_argument("--lr", type=float, default=3e-3, help="backbone AdamW lr")
    ap.add_argument("--ic-lr", type=float, default=0.1, help="IC AdamW lr")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--data", default=None, help="reuse a prepared dataset folder instead of generating one")
    ap.add_argument("--backbone", default=None, help="reuse a trained backbone artefact instead of training one")
    ap.add_argument("--lambda", dest="lam", type=float, default=0.01)
    ap.add_argument("--iters", type=int, default=3000, help="WISE full-batch SGD steps (3000: converged)")
    ap.add_argument("--thresholds", default="fine", help="'fine' (see fine_thresholds) or a vcc wise spec")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--workspace", default=None, help="keep artefacts here (default: a temp dir)")
    ap.add_argument("--holdout", type=float, default=0.0,
                    help="move this share of each class's training videos to a val split (backbone epochs are "
                         "chosen on it) and also fit WISE on val logits, side by side with the train fit")
    args = ap.parse_args()
    if args.quick:
        args.arch, args.options, args.classes, args.videos_per_class = "r3d_tiny", json.dumps(DEFAULT_OPTIONS), 4, 8
        args.epochs, args.ic_epochs, args.iters = 2, 2, 100

    import torch

    torch.set_num_threads(args.threads)
    from vcc.core.artefact import ModelMeta, input_spec, load_model
    from vcc.core.data.manifest import load_dataset
    from vcc.core.data.synthetic import prepare_synthetic
    from vcc.core.exits import evaluate_early_exit, train_exits
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
        res = prepare_synthetic(ws, name="bench-exits", replace=True, classes=args.classes, videos_per_class=args.videos_per_class, seed=0)
        info = load_dataset(res.path)
    if args.holdout > 0:
        import dataclasses

        from vcc.core.data.manifest import write_dataset
        from vcc.core.data.prepare import hold_out

        entries = [dataclasses.replace(e, path=str(info.root / e.path)) for e in info.entries]
        hold_out(entries, list(info.classes), args.holdout)
        held = ws.dataset_dir(f"{info.name}-holdout")
        held.mkdir(parents=True, exist_ok=True)
        write_dataset(held, held.name, list(info.classes), entries, source="bench", options={"holdout": args.holdout})
        info = load_dataset(held)
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

    thresholds = fine_thresholds() if args.thresholds == "fine" else parse_thresholds(args.thresholds)
    t = time.perf_counter()
    doc = run_wise(paths["progressive"], info, ws.run_dir("wise", create=True), lam=args.lam, iters=args.iters,
                   thresholds=thresholds, device="cpu", workers=args.workers)
    timings["wise_s"] = time.perf_counter() - t
    ce_doc = run_wise(paths["ce"], info, ws.run_dir("wise-ce", create=True), lam=args.lam, iters=args.iters,
                      thresholds=thresholds, device="cpu", workers=args.workers)
    val_docs = {}
    if args.holdout > 0:
        for kd in ("progressive", "ce"):
            val_docs[kd] = run_wise(paths[kd], info, ws.run_dir(f"wise-val-{kd}", create=True), lam=args.lam, iters=args.iters,
                                    thresholds=thresholds, device="cpu", workers=args.workers, fit_split="val")
    mmodel, mmeta = load_model(paths["progressive"])
    t = time.perf_counter()
    runtime = []
    g = goals(doc, len(info.classes))
    beta = torch.tensor([row + [0.0] * (len(doc["wise_weights"]) - len(row)) for row in doc["wise_weights"]])
    for label, thr, comb in (("vanilla", 0.0, None), ("vanilla", 0.9, None), ("wise", g["wise_best"]["threshold"], beta), ("vanilla", 1.1, None)):
        r = evaluate_early_exit(mmodel, mmeta, info, threshold=thr, device="cpu", combine=comb)
        runtime.append({"method": label, "threshold": thr, "accuracy": r["accuracy"], "latency_ms": round(r["latency_ms"], 2),
                        "macs": r["macs"], "exits": [round(e["share"], 3) for e in r["exits"]]})
    timings["runtime_s"] = time.perf_counter() - t
    vsplit = "val" if args.holdout > 0 else "test"
    out = {
        "bench": "exits",
        "quick": args.quick,
        "setup": {
            "arch": args.arch, "options": options, "frames": args.frames, "size": args.size,
            "dataset": {"classes": len(info.classes), **info.counts}, "epochs": args.epochs, "lr": args.lr,
            "holdout": args.holdout, "ic_epochs": args.ic_epochs, "ic_lr": args.ic_lr, "lambda": args.lam, "iters": args.iters,
            "thresholds": args.thresholds if args.thresholds != "fine" else f"fine ({len(thresholds)} values)", "threads": torch.get_num_threads(),
        },
        # fit()'s per-epoch validation: the test split, or val with --holdout
        f"backbone_{vsplit}_top1": base_top1,
        "exit_macs": doc["exits"],  # run_wise's exit_macs table of the same model
        f"ic_{vsplit}_top1": {"exits": [r["stage"] for r in doc["exits"]], **ic_acc},
        "full": doc["full"],
        "wise_weights": doc["wise_weights"],
        "goals": g,
        "runtime_batch1": runtime,
        "goals_grid": goals(doc, len(info.classes), exact=False),  # the sessions-3/4 criterion, for comparison
        "goals_ce_ics": goals(ce_doc, len(info.classes)),
        **({"goals_wise_fit_on_val": goals(val_docs["progressive"], len(info.classes)),
            "goals_ce_ics_wise_fit_on_val": goals(val_docs["ce"], len(info.classes))} if val_docs else {}),
        "methods": doc["methods"],
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "total_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
