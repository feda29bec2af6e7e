"""Which convs get faster when pruned: per-layer MACs and CPU latency, unpruned vs pruned.

Usage: python bench/conv_scaling.py [--arch r3d_tiny] [--frames 8] [--size 32] [--target-macs 0.5]
                                    [--threads 1,2] [--rounds 5]

Builds ARCH with random weights, prunes it to --target-macs of its MACs with `vcc prune`'s planner
(l1 scores), records every Conv3d's input in one forward of each model, and times each conv alone
on that input with its fastest CPU kernel (PyTorch's choice, oneDNN, oneDNN on a packed weight: the
kernels `vcc`'s inference form picks from), unpruned and pruned interleaved, the median of --rounds.
Prints one JSON document: per layer its MACs and time, unpruned -> pruned, and
`latency_ratio / macs_ratio` (1.0: the layer's time falls as fast as its MACs; the pruning
issue's goal asks 0.8 of the whole model). It shows where the whole-model ratio is lost: on
r3d_tiny at 8x32 the 3x7x7 stem holds 70% of the MACs, and oneDNN's kernel for 3 input channels
takes the same time for 8 output channels as for 16.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="r3d_tiny")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--target-macs", type=float, default=0.5)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    import torch
    from torch import nn

    from vcc.core.artefact import ModelMeta, input_spec
    from vcc.core.compress.prune import count_macs, prune_to_macs
    from vcc.core.compress.rank import rank
    from vcc.core.inference import fold_batchnorm, kernel_candidates
    from vcc.core.models import build_model
    from vcc.core.sysinfo import device_name

    torch.manual_seed(0)
    model = build_model(args.arch, args.classes).eval()
    meta = ModelMeta(arch=args.arch, num_classes=args.classes, classes=[f"c{i}" for i in range(args.classes)],
                     input=input_spec(args.frames, args.size))
    base_macs, _ = count_macs(model, meta)
    pruned = prune_to_macs(copy.deepcopy(model), meta, rank(model, meta, "l1"), args.target_macs).model.eval()
    pruned_macs, _ = count_macs(pruned, meta)
    x = torch.randn(1, 3, args.frames, args.size, args.size)

    def conv_inputs(m: nn.Module) -> dict[str, tuple[nn.Conv3d, torch.Tensor]]:
        m = fold_batchnorm(m)
        got: dict[str, tuple[nn.Conv3d, torch.Tensor]] = {}

        def record(name: str):
            def hook(mod: nn.Module, inp: tuple, _out: object) -> None:  # None: keeps the output
                got.setdefault(name, (mod, inp[0].detach()))
            return hook

        hooks = [mod.register_forward_hook(record(n)) for n, mod in m.named_modules() if isinstance(mod, nn.Conv3d)]
        with torch.inference_mode():
            m(x)
        for h in hooks:
            h.remove()
        return got

    a, b = conv_inputs(model), conv_inputs(pruned)

    def macs(conv: nn.Conv3d, inp: torch.Tensor) -> int:
        with torch.inference_mode():
            out = conv(inp)
        k = conv.weight[0].numel()  # in/groups * kT * kH * kW
        return int(out.numel() * k)

    def fastest(conv: nn.Conv3d, inp: torch.Tensor) -> float:
        forms = [conv, *kernel_candidates(conv, inp).values()]
        best = float("inf")
        with torch.inference_mode():
            for f in forms:
                try:
                    for _ in range(3):
                        f(inp)
                    ts = []
                    for _ in range(15):
                        t0 = time.perf_counter()
                        f(inp)
                        ts.append(time.perf_counter() - t0)
                    best = min(best, statistics.median(ts))
                except (RuntimeError, NotImplementedError, AttributeError):
                    pass
        return best

    out: dict = {"device": device_name(), "arch": args.arch, "input": [args.frames, args.size],
                 "macs": {"unpruned": base_macs, "pruned": pruned_macs, "ratio": round(base_macs / pruned_macs, 3)},
                 "threads": {}}
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        times: dict[str, dict[str, list[float]]] = {n: {"u": [], "p": []} for n in a if n in b}
        for _ in range(args.rounds):
            for n in times:
                times[n]["u"].append(fastest(*a[n]))
                times[n]["p"].append(fastest(*b[n]))
        rows = []
        tot_u = tot_p = 0.0
        for n, t in times.items():
            mu, mp = macs(*a[n]), macs(*b[n])
            tu, tp = statistics.median(t["u"]) * 1e3, statistics.median(t["p"]) * 1e3
            tot_u, tot_p = tot_u + tu, tot_p + tp
            rows.append({"layer": n, "channels": [tuple(a[n][0].weight.shape[:2]), tuple(b[n][0].weight.shape[:2])],
                         "macs": [mu, mp], "ms": [round(tu, 4), round(tp, 4)],
                         "ratio": round((tu / tp) / (mu / mp), 3) if mp and tp else None})
        out["threads"][threads] = {
            "layers": rows, "conv_ms": [round(tot_u, 3), round(tot_p, 3)],
            "conv_ratio": round((tot_u / tot_p) / (base_macs / pruned_macs), 3),
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
