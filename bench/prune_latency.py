"""What channel pruning buys in CPU latency at a realistic size, by conv kernel choice.

Usage: python bench/prune_latency.py [--arch r3d_18] [--frames 16] [--size 112] [--target-macs 0.5]
                                     [--method l1] [--round-to 1] [--threads 1,2] [--rounds 5] [--runs 5]

Builds ARCH with random weights (latency does not depend on their values), prunes it to
--target-macs of its MACs with `vcc prune`'s planner (l1 scores need no data), and times batch-1
forwards of the unpruned and the pruned model, interleaved, in two forms: BatchNorm folded with
every conv on the kernel PyTorch's own rule picks ("default"), and vcc's inference form, which also
gives each conv the faster of PyTorch's two CPU kernels by timing ("chosen"; what `vcc prune`,
`vcc port` and `vcc eval` report). Prints one JSON document: per thread count and form,
the medians, the speedup and speedup / MACs reduction (the pruning issue's goal is >= 0.8).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="r3d_18")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--classes", type=int, default=101)
    ap.add_argument("--target-macs", type=float, default=0.5)
    ap.add_argument("--method", default="l1", choices=["l1", "l2"])
    ap.add_argument("--round-to", type=int, default=1)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median round is reported")
    ap.add_argument("--runs", type=int, default=5, help="timed forwards per round (median)")
    ap.add_argument("--quick", action="store_true", help="r3d_tiny at 8x32, 3 rounds (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.arch, args.frames, args.size, args.rounds = "r3d_tiny", 8, 32, 3

    import torch

    from vcc.core.artefact import ModelMeta, input_spec
    from vcc.core.compress.prune import count_macs, prune_to_macs
    from vcc.core.compress.rank import rank
    from vcc.core.evaluate import median_ms
    from vcc.core.inference import OneDNNConv3d, PackedOneDNNConv3d, inference_form
    from vcc.core.models import build_model
    from vcc.core.sysinfo import device_name

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = build_model(args.arch, args.classes).eval()
    meta = ModelMeta(arch=args.arch, num_classes=args.classes, classes=[f"c{i}" for i in range(args.classes)],
                     input=input_spec(args.frames, args.size))
    base_macs, _ = count_macs(model, meta)
    out = prune_to_macs(model, meta, rank(model, meta, args.method), args.target_macs, round_to=args.round_to)
    pruned = out.model.eval()
    reduction = base_macs / out.macs
    x = torch.randn(1, *meta.input_shape)
    doc: dict = {
        "bench": "prune_latency", "device": device_name(), "torch": torch.__version__,
        "setup": {"arch": args.arch, "input": f"1x3x{args.frames}x{args.size}x{args.size}", "method": args.method,
                  "target_macs": args.target_macs, "round_to": args.round_to,
                  "timing": f"median of {args.rounds} interleaved rounds of the median of {args.runs} forwards"},
        "macs": {"unpruned": base_macs, "pruned": out.macs, "reduction": round(reduction, 3)},
        "threads": {},
    }
    for th in [int(t) for t in args.threads.split(",") if t.strip()]:
        torch.set_num_threads(th)
        forms = {("default", k): inference_form(m, x, kernels=False) for k, m in (("unpruned", model), ("pruned", pruned))}
        forms |= {("chosen", k): inference_form(m, x) for k, m in (("unpruned", model), ("pruned", pruned))}
        times: dict = {key: [] for key in forms}
        for _ in range(args.rounds):
            for key, f in forms.items():
                times[key].append(median_ms(f, x, warmup=1, runs=args.runs))
        row = {}
        for form in ("default", "chosen"):
            b, p = (statistics.median(times[(form, k)]) for k in ("unpruned", "pruned"))
            row[form] = {
                "unpruned_ms": round(b, 2), "pruned_ms": round(p, 2), "speedup": round(b / p, 3),
                "speedup_over_macs_reduction": round(b / p / reduction, 3),
                "onednn_convs": {k: sum(type(m) is OneDNNConv3d for m in forms[(form, k)].modules()) for k in ("unpruned", "pruned")},
                "packed_onednn_convs": {k: sum(type(m) is PackedOneDNNConv3d for m in forms[(form, k)].modules())
                                        for k in ("unpruned", "pruned")},
            }
        row["chosen_vs_default"] = {k: round(row["default"][f"{k}_ms"] / row["chosen"][f"{k}_ms"], 3) for k in ("unpruned", "pruned")}
        doc["threads"][str(th)] = row
    doc["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
