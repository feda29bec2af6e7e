"""Training-step throughput and model FLOP utilisation (MFU), AMP vs fp32.

Usage: python bench/train_step.py [--arch r3d_18] [--frames 16] [--size 112] [--batch B] [--steps N]
                                  [--device auto|cpu|cuda] [--peak-tflops X] [--quick]

In-memory uint8 batches (normalised on the device, as in `vcc train`), so the model is measured,
not the decoder. One step = forward + backward + SGD update, the same autocast / GradScaler /
channels_last_3d path as `vcc.core.training.fit`. FLOPs per clip = 2 * MACs * 3 (forward plus a
backward of twice the forward), MACs from `vcc.core.macs.count_macs`. MFU = achieved FLOP/s over the
device's dense peak for that precision (bf16/fp16 tensor-core peak for AMP, fp32 for fp32): known
GPUs are looked up by name, `--peak-tflops` overrides; on a CPU the peak is unknown unless given.
Prints one JSON document.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
import torch.nn.functional as F

# Dense peaks in TFLOP/s: (16-bit tensor core, fp32 without TF32). Vendor datasheets, no sparsity.
PEAKS = {
    "H200": (989.0, 67.0),
    "H100 SXM": (989.0, 67.0),
    "H100 NVL": (835.0, 60.0),
    "H100 PCIe": (756.0, 51.0),
    "H100": (989.0, 67.0),
    "A100": (312.0, 19.5),
    "L40S": (362.0, 91.6),
    "L4": (121.0, 30.3),
    "A10": (125.0, 31.2),
    "RTX 4090": (165.0, 82.6),
    "V100": (125.0, 15.7),
    "T4": (65.0, 8.1),
}


def peak_tflops(name: str, amp: bool) -> float | None:
    for key, (half, fp32) in PEAKS.items():
        if key in name:
            return half if amp else fp32
    return None


def run(arch: str, frames: int, size: int, batch: int, steps: int, warmup: int, device: torch.device, amp: bool, classes: int = 101) -> dict:
    from vcc.core.artefact import input_spec
    from vcc.core.models import build_model
    from vcc.core.training import amp_dtype, autocast, has_conv3d, prepare_input

    torch.manual_seed(0)
    model = build_model(arch, num_classes=classes).to(device).train()
    dtype = amp_dtype(device) if amp else None
    if amp and device.type == "cpu":
        dtype = torch.bfloat16  # CPU autocast, for completeness; fit() does not use it
    channels_last = device.type == "cuda" and dtype is not None and has_conv3d(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    spec = input_spec(frames, size)
    g = torch.Generator().manual_seed(0)
    x_u8 = torch.randint(0, 256, (batch, 3, frames, size, size), dtype=torch.uint8, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    if device.type == "cuda":
        x_u8, y = x_u8.pin_memory(), y.pin_memory()
        torch.backends.cudnn.benchmark = True

    def step() -> None:
        x = prepare_input(x_u8, device, spec["mean"], spec["std"], channels_last)
        ctx = autocast(device, dtype) if device.type == "cuda" else (torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext())
        with ctx:
            loss = F.cross_entropy(model(x).float(), y.to(device, non_blocking=True))
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
    return {"precision": str(dtype).removeprefix("torch.") if dtype else "fp32", "batch": batch, "steps": steps,
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
    for amp in modes:
        r = run(args.arch, args.frames, args.size, batch, steps, warmup, device, amp)
        achieved = r["clips_per_s"] * flops_per_clip / 1e12
        peak = args.peak_tflops or (peak_tflops(name, amp) if cuda else None)
        r.update({"amp": amp, "achieved_tflops": round(achieved, 4), "peak_tflops": peak,
                  "mfu": round(achieved / peak, 4) if peak else None})
        results.append(r)
    by = {r["amp"]: r for r in results}
    doc = {
        "bench": "train_step",
        "device": name,
        "torch": torch.__version__,
        "arch": args.arch,
        "input": [3, args.frames, args.size, args.size],
        "macs_per_clip": macs,
        "flops_per_clip_train": flops_per_clip,
        "results": results,
        "amp_speedup": round(by[True]["clips_per_s"] / by[False]["clips_per_s"], 3) if True in by and False in by else None,
        "note": "MFU = achieved / dense peak of the precision; FLOPs = 2*MACs*3 per clip (fwd+bwd). CPU peak unknown unless --peak-tflops.",
    }
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
