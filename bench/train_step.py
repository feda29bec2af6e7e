"""Training-step throughput and model FLOP utilisation (MFU), AMP vs fp32.

Usage: python bench/train_step.py [--arch r3d_18] [--frames 16] [--size 112] [--batch B] [--steps N]
                                  [--device auto|cpu|cuda] [--compile] [--stem auto|plain|s2d]
                                  [--layout auto|all|contiguous] [--peak-tflops X] [--quick]

In-memory uint8 batches (normalised on the device, as in `vcc train`), so the model is measured,
not the decoder. One step = forward + backward + SGD update, the same autocast / GradScaler /
channels_last_3d path as `vcc.core.training.fit` (TF32 on for fp32 on CUDA, as `fit` sets it;
`--compile` as `vcc train --compile`). FLOPs per clip = 2 * MACs * 3 (forward plus a
backward of twice the forward), MACs from `vcc.core.macs.count_macs`. MFU = achieved FLOP/s over the
device's dense peak for that precision (bf16/fp16 tensor-core peak for AMP, TF32 tensor-core peak for
fp32 on CUDA): known GPUs are looked up by name, `--peak-tflops` overrides; on a CPU the peak is unknown
unless given. On CUDA it also times a large bf16 matrix product, the device's measured ceiling, and
reports MFU against it too.
Prints one JSON document.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
import torch.nn.functional as F

# Dense peaks in TFLOP/s: (16-bit tensor core, fp32 as `fit` runs it: TF32 tensor core where the
# GPU has one, else plain fp32). Vendor datasheets, no sparsity.
PEAKS = {
    "H200": (989.0, 494.7),
    "H100 SXM": (989.0, 494.7),
    "H100 80GB HBM3": (989.0, 494.7),
    "H100 NVL": (835.0, 417.5),
    "H100 PCIe": (756.0, 378.0),
    "H100": (989.0, 494.7),
    "A100": (312.0, 156.0),
    "L40S": (362.0, 183.0),
    "L4": (121.0, 60.0),
    "A10": (125.0, 62.5),
    "RTX 4090": (165.2, 82.6),
    "V100": (125.0, 15.7),
    "T4": (65.0, 8.1),
}


def peak_tflops(name: str, amp: bool) -> float | None:
    for key, (half, fp32) in PEAKS.items():
        if key in name:
            return half if amp else fp32
    return None


def matmul_tflops(device: torch.device, n: int = 8192, reps: int = 20) -> float:
    """The device's measured bf16 ceiling: median TFLOP/s of an n*n*n product on random data."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    times.sort()
    return 2 * n**3 / times[len(times) // 2] / 1e12


def run(arch: str, frames: int, size: int, batch: int, steps: int, warmup: int, device: torch.device, amp: bool,
        classes: int = 101, compile: bool = False, compile_mode: str | None = None, stem: str = "auto",
        layout: str = "auto") -> dict:
    from vcc.core.artefact import input_spec
    from vcc.core.models import build_model
    from vcc.core.training import (
        amp_dtype,
        autocast,
        channels_last_convs,
        has_conv3d,
        prepare_input,
        space_to_depth_stem,
    )

    torch.manual_seed(0)
    model = build_model(arch, num_classes=classes).to(device).train()
    dtype = amp_dtype(device) if amp else None
    if amp and device.type == "cpu":
        dtype = torch.bfloat16  # CPU autocast, for completeness; fit() does not use it
    channels_last = device.type == "cuda" and dtype is not None and has_conv3d(model) and layout != "contiguous"  # as fit()
    if channels_last:
        if layout == "all":  # every weight, ambiguous layouts too (what fit did before; broke --compile on tiny inputs)
            model = model.to(memory_format=torch.channels_last_3d)
        else:
            channels_last_convs(model, (3, frames, size, size))
    if stem == "auto":
        stem = "s2d" if device.type == "cuda" and dtype is not None else "plain"  # as fit() does
    if stem == "s2d":
        space_to_depth_stem(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    train_model = torch.compile(model, mode=compile_mode) if compile else model
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    spec = input_spec(frames, size)
    g = torch.Generator().manual_seed(0)
    x_u8 = torch.randint(0, 256, (batch, 3, frames, size, size), dtype=torch.uint8, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    if device.type == "cuda":
        x_u8, y = x_u8.pin_memory(), y.pin_memory()
        torch.backends.cudnn.benchmark = True  # as fit() sets them
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def step() -> None:
        x = prepare_input(x_u8, device, spec["mean"], spec["std"], channels_last)
        ctx = autocast(device, dtype) if device.type == "cuda" else (torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext())
        with ctx:
            loss = F.cross_entropy(train_model(x).float(), y.to(device, non_blocking=True))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    precision = str(dtype).removeprefix("torch.") if dtype else ("tf32" if device.type == "cuda" else "fp32")
    return {"precision": precision, "compile": (compile_mode or True) if compile else False, "stem": stem, "layout": layout if channels_last else "contiguous", "batch": batch, "steps": steps,
            "step_ms": round(1000 * dt / steps, 2), "clips_per_s": round(batch * steps / dt, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="r3d_18")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--batch", type=int, default=None, help="default: 32 on CUDA, 2 on CPU")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: 30 on CUDA, 3 on CPU)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model, as `vcc train --compile`")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    ap.add_argument("--stem", choices=["auto", "plain", "s2d"], default="auto",
                    help="how the RGB input conv runs: as fit() does (auto: space-to-depth on the CUDA AMP path), as is, or space-to-depth")
    ap.add_argument("--layout", choices=["auto", "all", "contiguous"], default="auto",
                    help="conv weights on the CUDA AMP path: as fit() does (auto: channels_last_3d where unambiguous), "
                         "all channels_last_3d, or all contiguous")
    ap.add_argument("--amp-only", action="store_true", help="skip the fp32 measurement")
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the device's peak (same for both precisions)")
    ap.add_argument("--no-cpu-amp", action="store_true", help="on CPU, skip the bf16 autocast measurement")
    ap.add_argument("--quick", action="store_true", help="fewer steps")
    args = ap.parse_args()

    from vcc.core.macs import count_macs
    from vcc.core.models import build_model
    from vcc.core.sysinfo import device_name
    from vcc.core.training import resolve_device

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch or (32 if cuda else 2)
    steps = args.steps or ((10 if args.quick else 30) if cuda else (1 if args.quick else 3))
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    macs = count_macs(build_model(args.arch, num_classes=101), (3, args.frames, args.size, args.size), by_layer=False).macs
    flops_per_clip = 2 * macs * 3
    name = device_name(device)
    results = []
    modes = [True, False] if (cuda or not args.no_cpu_amp) else [False]
    if args.amp_only:
        modes = [True]
    ceiling = round(matmul_tflops(device), 1) if cuda else None
    for amp in modes:
        r = run(args.arch, args.frames, args.size, batch, steps, warmup, device, amp, compile=args.compile or bool(args.compile_mode),
                compile_mode=args.compile_mode, stem=args.stem, layout=args.layout)
        achieved = r["clips_per_s"] * flops_per_clip / 1e12
        peak = args.peak_tflops or (peak_tflops(name, amp) if cuda else None)
        r.update({"amp": amp, "achieved_tflops": round(achieved, 4), "peak_tflops": peak,
                  "mfu": round(achieved / peak, 4) if peak else None})
        if ceiling and amp:
            r["share_of_measured_bf16_matmul"] = round(achieved / ceiling, 4)
        results.append(r)
    by = {r["amp"]: r for r in results}
    doc = {
        "bench": "train_step",
        "device": name,
        "torch": torch.__version__,
        "arch": args.arch,
        "input": [3, args.frames, args.size, args.size],
        "macs_per_clip": macs,
        "measured_bf16_matmul_tflops": ceiling,
        "flops_per_clip_train": flops_per_clip,
        "results": results,
        "amp_speedup": round(by[True]["clips_per_s"] / by[False]["clips_per_s"], 3) if True in by and False in by else None,
        "note": "MFU = achieved / datasheet dense peak of the precision (TF32 for fp32 on CUDA); FLOPs = 2*MACs*3 per clip (fwd+bwd). CPU peak unknown unless --peak-tflops.",
    }
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
