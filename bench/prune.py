"""Structured pruning end to end: train r3d_tiny, prune to half the MACs, finetune, compare.

Usage: python bench/prune.py [--quick] [--model PATH | --options JSON] [--epochs N] [--finetune-epochs N] [--workspace DIR]

On the synthetic default dataset: trains r3d_tiny (or takes --model), then for each method
(taylor, l1, and a plain Torch-Pruning baseline: tp.importance.MagnitudeImportance with its own
BasePruner, per-layer ratio searched for the same MACs) prunes to --target-macs of the MACs,
finetunes and evaluates video top-1. Measures CPU latency at batch 1 of the unpruned and the
taylor-pruned model (interleaved, median of --latency-runs). Prints one JSON document with the
goals: top-1 within 1 point of the unpruned model; latency speedup >= 0.8 x the MACs reduction.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def tp_magnitude_prune(model, meta, target: float, base_macs: int):
    """Torch-Pruning's own pruner + MagnitudeImportance(p=2), per-layer ratio bisected to `target` MACs."""
    import torch
    import torch_pruning as tp

    from vcc.core.compress.prune import count_macs, example_input

    def attempt(ratio: float):
        m = copy.deepcopy(model).cpu().eval()
        pruner = tp.pruner.BasePruner(
            m, example_input(meta), importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=ratio, ignored_layers=[m.fc], global_pruning=False,
        )
        pruner.step()
        with torch.no_grad():
            m(example_input(meta))
        return m, count_macs(m, meta)[0]

    lo, hi = 0.0, 0.95
    best = attempt(hi)
    while hi - lo > 0.005:
        mid = (lo + hi) / 2
        m, macs = attempt(mid)
        if macs <= target * base_macs:
            hi, best = mid, (m, macs)
        else:
            lo = mid
    return best[0], best[1], hi


def machine_state() -> dict:
    """How fast this machine is right now, to read the latency figures by: a 256x256 float32
    matmul's ms on each core alone (pinned, 1 thread), and how much a second thread speeds up a
    64x64 matmul (sized like r3d_tiny's small convs). On a shared VM both change from minute to minute."""
    import os

    import torch

    def ms(a: torch.Tensor, n: int) -> float:
        for _ in range(20):
            a @ a
        t = time.perf_counter()
        for _ in range(n):
            a @ a
        return (time.perf_counter() - t) * 1000 / n

    threads = torch.get_num_threads()
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    out: dict = {"matmul_256_ms_per_core": {}}
    try:
        torch.set_num_threads(1)
        big = torch.randn(256, 256)
        for c in cores:
            os.sched_setaffinity(0, {c})
            out["matmul_256_ms_per_core"][f"cpu{c}"] = round(statistics.median(ms(big, 200) for _ in range(3)), 4)
    finally:
        if cores:
            os.sched_setaffinity(0, set(cores))
    small = torch.randn(64, 64)
    one = statistics.median(ms(small, 2000) for _ in range(3))
    torch.set_num_threads(2)
    two = statistics.median(ms(small, 2000) for _ in range(3))
    out["matmul_64_second_thread_speedup"] = round(one / two, 3)
    torch.set_num_threads(threads)
    return out


def _runtime_forms(runtime: str, models: dict, meta, x, threads: list[int], tmp: Path, fold: bool) -> dict:
    """{(model key, threads): callable x -> output} for one runtime (built once per model and thread count)."""
    import torch

    from vcc.core.inference import inference_form

    out = {}
    for th in threads:
        torch.set_num_threads(th)  # the kernel choice is made per thread count
        for k, m in models.items():
            if runtime in ("eager", "compile"):
                f = inference_form(m, x, script=runtime == "eager") if fold else m
                if runtime == "compile":
                    f = torch.compile(f)
                    with torch.inference_mode():
                        f(x)
                out[(k, th)] = f
            elif runtime == "python":  # vcc's inference form without TorchScript (sessions 6-11)
                out[(k, th)] = inference_form(m, x, script=False) if fold else m
            elif runtime == "eager-default":  # folded, but every conv on the kernel PyTorch picks
                out[(k, th)] = inference_form(m, x, kernels=False, script=False) if fold else m
            elif runtime == "onnxruntime":
                import onnxruntime as ort

                from vcc.core.compress.port import export_onnx

                if (k, threads[0]) not in out:  # export once, what `vcc port --onnx` writes
                    path = Path(export_onnx(m, meta, tmp / f"latency-{k}.onnx")["path"])
                so = ort.SessionOptions()
                so.intra_op_num_threads, so.inter_op_num_threads = th, 1
                sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
                out[(k, th)] = (lambda s: lambda t: s.run(None, {"clip": t.numpy()}))(sess)
            else:
                raise SystemExit(f"--latency-runtimes: unknown runtime {runtime!r} (eager, python, eager-default, compile, onnxruntime)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny run (small dataset, 2+1 epochs): checks the pipeline, not the goals")
    ap.add_argument("--model", default=None, help="a trained r3d_tiny-like artefact to start from (skips training)")
    ap.add_argument("--options", default="{}",
                    help='r3d_tiny builder options as JSON, e.g. \'{"conv1_s_size": 3, "t_stride": 1}\' (a 3x3x3 stem: '
                         "the stock 3x7x7 stem is 70%% of the MACs at 32 px); ignored with --model")
    ap.add_argument("--epochs", type=int, default=40, help="training epochs of the unpruned model")
    ap.add_argument("--finetune-epochs", type=int, default=12)
    ap.add_argument("--target-macs", type=float, default=0.5)
    ap.add_argument("--scope", default="global")
    ap.add_argument("--lr", type=float, default=3e-3, help="AdamW lr of the unpruned model's training")
    ap.add_argument("--finetune-lr", type=float, default=1e-3, help="AdamW lr of the finetuning")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--batches", type=int, default=8, help="taylor ranking batches")
    ap.add_argument("--eval-clips", type=int, default=3)
    ap.add_argument("--latency-runs", type=int, default=20)
    ap.add_argument("--latency-rounds", type=int, default=9, help="interleaved rounds (the median round is reported)")
    ap.add_argument("--methods", default="taylor,l1,tp-magnitude")
    ap.add_argument("--round-to", type=int, default=1, help="keep a multiple of N channels per layer (taylor/l1)")
    ap.add_argument("--latency-threads", default="1,2", help="torch CPU thread counts to time batch-1 latency with")
    ap.add_argument("--latency-runtimes", default="eager,python,eager-default",
                    help="comma list: eager (vcc's inference form, as `vcc prune` reports: BatchNorm folded, each conv on "
                         "the fastest of its CPU kernels, chosen per thread count, and the whole frozen by TorchScript where "
                         "that is faster), python (the same without TorchScript), eager-default (folded, every "
                         "conv on the kernel PyTorch's rule picks, no TorchScript), compile (torch.compile of the eager form, inductor; "
                         "needs a C compiler) and onnxruntime (the `vcc port --onnx` export; needs onnxruntime); the "
                         "goals use eager")
    ap.add_argument("--no-fold-bn", action="store_true", help="eager/compile time the models as they are (no inference form)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--workspace", default=None, help="keep artefacts here (default: a temp dir)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(2)
    from vcc.core.artefact import ModelMeta, input_spec, load_model, save_model
    from vcc.core.compress.prune import count_macs, prune_to_macs
    from vcc.core.compress.rank import rank
    from vcc.core.data.manifest import load_dataset
    from vcc.core.data.synthetic import prepare_synthetic
    from vcc.core.evaluate import evaluate, median_ms
    from vcc.core.models import build_model
    from vcc.core.sysinfo import CpuContention
    from vcc.core.training import TrainConfig, fit
    from vcc.core.workspace import Workspace

    tmp = tempfile.TemporaryDirectory(prefix="vcc-bench-prune-")
    ws = Workspace(Path(args.workspace or tmp.name))
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    ds_opts = {"classes": 4, "videos_per_class": 8, "frames": 16, "size": 32} if args.quick else {}
    if args.quick:
        args.epochs, args.finetune_epochs, args.batches, args.eval_clips, args.latency_runs, args.latency_rounds = 2, 1, 2, 1, 10, 3
    res = prepare_synthetic(ws, name="bench-prune" + ("-quick" if args.quick else ""), replace=True, **ds_opts)
    info = load_dataset(res.path)
    timings["prepare_s"] = time.perf_counter() - t0
    common = {"frames": 8, "size": 32, "batch_size": args.batch_size, "workers": args.workers, "device": "cpu", "seed": 0,
              "optimizer": "adamw", "weight_decay": 1e-4}

    t = time.perf_counter()
    if args.model:
        base_path = Path(args.model)
    else:
        torch.manual_seed(0)
        options = json.loads(args.options)
        model = build_model("r3d_tiny", len(info.classes), **options)
        meta = ModelMeta(arch="r3d_tiny", num_classes=len(info.classes), options=options, classes=list(info.classes), input=input_spec(8, 32))
        fr = fit(model, meta, info, TrainConfig(epochs=args.epochs, lr=args.lr, **common), ws.run_dir("base", create=True))
        base_path = fr.model_path
    timings["train_s"] = time.perf_counter() - t
    base, meta = load_model(base_path)
    base_macs, base_params = count_macs(base, meta)
    base_eval = evaluate(base, meta, info, split="test", clips=args.eval_clips, device="cpu", workers=args.workers, latency_runs=0)
    base.cpu()

    results: dict[str, dict] = {}
    pruned_models: dict[str, torch.nn.Module] = {}
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        t = time.perf_counter()
        if method == "tp-magnitude":
            pm, macs, ratio = tp_magnitude_prune(base, meta, args.target_macs, base_macs)
            detail = {"ratio_per_layer": round(ratio, 4)}
        else:
            scores = rank(base, meta, method, data=info, batches=args.batches, batch_size=8)
            base.cpu()
            out = prune_to_macs(base, meta, scores, args.target_macs, scope=args.scope, round_to=args.round_to)
            pm, macs, detail = out.model, out.macs, {"ratio": round(out.ratio, 4), "removed": out.removed}
        prune_s = time.perf_counter() - t
        no_ft = evaluate(pm, meta, info, split="test", clips=args.eval_clips, device="cpu", workers=args.workers, latency_runs=0)
        pm.cpu()
        t = time.perf_counter()
        pmeta = meta.child()
        ft = fit(pm, pmeta, info, TrainConfig(epochs=args.finetune_epochs, lr=args.finetune_lr, warmup=0, **common),
                 ws.run_dir(f"ft-{method}", create=True))
        tuned, tmeta = load_model(ft.model_path)
        ft_s = time.perf_counter() - t
        ev = evaluate(tuned, tmeta, info, split="test", clips=args.eval_clips, device="cpu", workers=args.workers, latency_runs=0)
        tuned.cpu()
        save_model(ws.run_dir(f"ft-{method}") / "pruned.safetensors", tuned, tmeta)
        pruned_models[method] = tuned
        results[method] = {
            "macs": macs, "macs_fraction": round(macs / base_macs, 4), "params": sum(p.numel() for p in tuned.parameters()),
            "video_top1_before_finetune": no_ft["video_top1"], "video_top1": ev["video_top1"], "clip_top1": ev["clip_top1"],
            "top1_gap_points": round(100 * (base_eval["video_top1"] - ev["video_top1"]), 2),
            "prune_s": round(prune_s, 1), "finetune_s": round(ft_s, 1), **detail,
        }

    # latency: interleave unpruned and pruned measurements to share the machine's noise
    fold = not args.no_fold_bn
    x = torch.randn(1, *meta.input_shape)
    timed = {k: m.cpu().eval() for k, m in {"base": base, **pruned_models}.items()}
    runtimes = [r.strip() for r in args.latency_runtimes.split(",") if r.strip()]
    threads = [int(t) for t in args.latency_threads.split(",") if t.strip()]
    forms = {rt: _runtime_forms(rt, timed, meta, x, threads, Path(ws.root), fold) for rt in runtimes}
    machine = {"before_latency": machine_state()}
    latency: dict[str, dict] = {}
    for rt in runtimes:
        for th in threads:
            torch.set_num_threads(th)
            lat: dict[str, list[float]] = {k: [] for k in timed}
            with CpuContention() as contention:  # other processes' cores while timing: > 0.5 means noise
                for _ in range(args.latency_rounds):
                    for k in timed:
                        lat[k].append(median_ms(forms[rt][(k, th)], x, warmup=5, runs=args.latency_runs))
            med = {k: statistics.median(v) for k, v in lat.items()}
            key = f"threads_{th}" if rt == "eager" else f"{rt}_threads_{th}"
            machine.setdefault("busy_cores_while_timing", {})[key] = contention.others
            latency[key] = {
                k: {"latency_ms": round(med[k], 3), "latency_min_ms": round(min(lat[k]), 3),
                    "form": "torchscript" if isinstance(forms[rt][(k, th)], torch.jit.ScriptModule) else "python",
                    **({} if k == "base" else {
                        "speedup": round(med["base"] / med[k], 3),
                        "speedup_over_macs_reduction": round(med["base"] / med[k] / (base_macs / results[k]["macs"]), 3),
                        # the same ratio per interleaved round: its spread is the measurement's noise
                        "per_round_range": [round(min(r), 3), round(max(r), 3)] if (r := [
                            b / p / (base_macs / results[k]["macs"]) for b, p in zip(lat["base"], lat[k], strict=True)]) else None,
                    })}
                for k in lat}
    machine["after_latency"] = machine_state()
    torch.set_num_threads(2)
    for k in pruned_models:
        results[k]["macs_reduction"] = round(base_macs / results[k]["macs"], 3)
        results[k]["latency"] = {t: v[k] for t, v in latency.items()}
    taylor = results.get("taylor")
    out = {
        "bench": "prune",
        "quick": args.quick,
        "setup": {"arch": "r3d_tiny", "options": meta.options, "frames": 8, "size": 32, "dataset": {"classes": len(info.classes), **res.counts},
                  "epochs": args.epochs, "finetune_epochs": args.finetune_epochs, "lr": args.lr, "finetune_lr": args.finetune_lr,
                  "optimizer": "adamw", "target_macs": args.target_macs,
                  "scope": args.scope, "eval_clips": args.eval_clips, "threads": torch.get_num_threads(),
                  "round_to": args.round_to,
                  "latency": f"median over {args.latency_rounds} interleaved rounds of the median of {args.latency_runs} batch-1 CPU forwards"
                             + (", in vcc's inference form (BatchNorm folded; conv kernels chosen by timing, except eager-default; "
                                   "frozen by TorchScript where faster, eager only)"
                                if fold else ", models as they are"),
                  "latency_runtimes": runtimes},
        "unpruned": {"macs": base_macs, "params": base_params, "video_top1": base_eval["video_top1"],
                     "clip_top1": base_eval["clip_top1"], "latency": {t: v["base"] for t, v in latency.items()}},
        "methods": results,
        "machine": machine,
        "goals": None if taylor is None else {
            "taylor_top1_within_1pt": taylor["top1_gap_points"] <= 1.0,
            **{f"taylor_speedup_ge_0.8x_macs_reduction_{t}": v["taylor"]["speedup_over_macs_reduction"] >= 0.8
               for t, v in latency.items() if t.startswith("threads_")},  # the eager inference form, as vcc reports it
        },
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "total_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
