"""Evaluation: clip- and video-level top-k, per-class accuracy, confusion, latency, throughput.

A video's score is the mean of its clips' softmax (K temporal clips x 1 or 3 spatial crops).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from vcc.core.artefact import ModelMeta
from vcc.core.errors import UsageError, VccError
from vcc.core.inference import inference_form, median_ms, sync
from vcc.core.progress import ProgressFn
from vcc.core.training import (
    amp_dtype,
    autocast,
    check_classes,
    dataset_info,
    final_logits,
    has_conv3d,
    prepare_input,
    resolve_device,
)


def predict(
    model: nn.Module,
    loader: Iterable,
    device: str | torch.device,
    meta: ModelMeta,
    *,
    amp: bool = False,
    progress: ProgressFn | None = None,
    task: str = "eval",
    timing: dict[str, float] | None = None,
    all_exits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run `model` over `loader`: (logits (clips, C) float32 CPU, labels (clips,), video_idx (clips,)).

    With `all_exits` (a multi-exit model), logits are every exit's: (exits, clips, C).
    With `timing` (a dict), adds ``model_s`` (forward time, synchronised) and ``total_s``.
    """
    device = resolve_device(device)
    was_training = model.training
    model.eval()
    dtype = amp_dtype(device) if amp else None
    channels_last = device.type == "cuda" and dtype is not None and has_conv3d(model)
    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    outs, labels, vids = [], [], []
    model_s = 0.0
    t_start = time.perf_counter()
    with torch.inference_mode():
        for i, batch in enumerate(loader):
            x = prepare_input(batch[0], device, meta.mean, meta.std, channels_last)
            sync(device)
            t0 = time.perf_counter()
            with autocast(device, dtype):
                out = torch.stack(model.forward_exits(x)) if all_exits else final_logits(model(x))
            sync(device)
            model_s += time.perf_counter() - t0
            outs.append(out.float().cpu())
            labels.append(batch[1].cpu().long())
            vids.append(batch[2].cpu().long() if len(batch) > 2 else torch.arange(len(batch[1])) + sum(len(v) for v in vids))
            if progress:
                progress(task, i + 1, total, {})
    model.train(was_training)
    if timing is not None:
        timing["model_s"] = model_s
        timing["total_s"] = time.perf_counter() - t_start
    if not outs:
        raise VccError("no clips to evaluate (empty split?)")
    return torch.cat(outs, 1 if all_exits else 0), torch.cat(labels), torch.cat(vids)


def video_scores(logits: torch.Tensor, labels: torch.Tensor, video_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean clip softmax per video: (scores (V, C), labels (V,), video ids (V,), sorted by id)."""
    vids, inverse = torch.unique(video_idx, sorted=True, return_inverse=True)
    probs = torch.softmax(logits.float(), dim=1)
    sums = torch.zeros(len(vids), probs.shape[1]).index_add_(0, inverse, probs)
    counts = torch.zeros(len(vids)).index_add_(0, inverse, torch.ones(len(inverse)))
    vlabels = torch.zeros(len(vids), dtype=torch.long).scatter_(0, inverse, labels.long())
    return sums / counts[:, None], vlabels, vids


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose label is among the `k` highest scores."""
    if len(labels) == 0:
        return 0.0
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    return int((top == labels[:, None]).any(dim=1).sum()) / len(labels)  # exact: 7/12, not float32's 0.58333331


def video_accuracy(logits: torch.Tensor, labels: torch.Tensor, video_idx: torch.Tensor, topk: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """clip_topK and video_topK accuracies (fractions) from per-clip logits."""
    vs, vl, _ = video_scores(logits, labels, video_idx)
    out: dict[str, float] = {}
    for k in topk:
        out[f"clip_top{k}"] = topk_accuracy(logits, labels, k)
        out[f"video_top{k}"] = topk_accuracy(vs, vl, k)
    return out


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[list[int]]:
    """rows = true class, columns = predicted class."""
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    cm.index_put_((labels.long(), pred.long()), torch.ones(len(labels), dtype=torch.long), accumulate=True)
    return cm.tolist()


def measure_latency(model: nn.Module, meta: ModelMeta, device: str | torch.device = "cpu", batch: int = 1, warmup: int = 3,
                    runs: int = 10, fold_bn: bool = True, min_s: float = 0.2, stats: dict[str, Any] | None = None) -> float:
    """Median wall time in ms of one forward pass at batch `batch` on `device` (after warm-up).

    With `fold_bn` (default) the timed model is :func:`vcc.core.inference.inference_form`'s copy
    (BatchNorm folded, CPU conv kernels chosen by timing, small models frozen by TorchScript where
    faster); without, the model as it is. Small
    models run more than `runs` times, until `min_s` seconds are timed: ten 1-ms forwards are
    too few to outlast a neighbour's burst.
    """
    return paired_latency([(model, meta)], device=device, batch=batch, warmup=warmup, runs=runs, rounds=1, min_s=min_s,
                          fold_bn=fold_bn, stats=stats)[0]


def evaluate(
    model: nn.Module,
    meta: ModelMeta,
    data: Any,
    *,
    split: str = "test",
    clips: int = 3,
    crops: int = 1,
    batch_size: int = 8,
    device: str | torch.device = "auto",
    workers: int = 0,
    progress: ProgressFn | None = None,
    amp: bool = False,
    latency_runs: int = 10,
) -> dict[str, Any]:
    """Evaluate `model` on a dataset split: accuracies (fractions), per-class, confusion, speed.

    Keys: clip_top1, clip_top5, video_top1, video_top5, videos, clips, latency_ms (batch 1,
    median; None with ``latency_runs=0``, for callers that only want accuracy), latency_threads
    (the CPU threads it was timed on; None on a GPU), latency_busy_cores (the cores other
    processes kept busy meanwhile), clips_per_s (model forward throughput at `batch_size`), end_to_end_clips_per_s
    (including decoding), per_class ({class: video accuracy}), confusion (video level,
    rows = true class), classes, videos_in_split and load_failures (a video that cannot be read
    is left out of the accuracies: ``videos`` < ``videos_in_split``).
    """
    from vcc.core.data.loader import make_loader

    if crops not in (1, 3):
        raise VccError(f"--crops must be 1 or 3, got {crops}")
    if clips < 1 or batch_size < 1:
        raise UsageError("--clips and --batch-size must be >= 1")
    info = dataset_info(data)
    check_classes(meta, list(info.classes), data_name=f"dataset {info.name!r}")
    if not info.split(split):
        have = sorted({e.split for e in info.entries})
        raise VccError(f"dataset {info.name!r} has no {split!r} videos (splits: {', '.join(have) or 'none'})")
    dev = resolve_device(device)
    model = model.to(dev)
    loader = make_loader(
        info, split, train=False, frames=meta.frames, size=meta.size, batch_size=batch_size,
        workers=workers, clips=clips, crops=crops, pin_memory=dev.type == "cuda",
    )
    timing: dict[str, float] = {}
    logits, labels, vidx = predict(model, loader, dev, meta, amp=amp, progress=progress, timing=timing)
    acc = video_accuracy(logits, labels, vidx, topk=(1, 5))
    vs, vl, _ = video_scores(logits, labels, vidx)
    vpred = vs.argmax(1)
    n_cls = len(info.classes)
    per_class = {}
    for c, name in enumerate(info.classes):
        mask = vl == c
        per_class[name] = int((vpred[mask] == c).sum()) / int(mask.sum()) if mask.any() else None
    lat_stats: dict[str, Any] = {}
    latency = measure_latency(model, meta, dev, batch=1, warmup=3, runs=latency_runs, stats=lat_stats) if latency_runs > 0 else None
    return {
        **{k: acc[k] for k in ("clip_top1", "clip_top5", "video_top1", "video_top5")},
        "videos": int(len(vl)),
        "clips": int(len(labels)),
        "latency_ms": None if latency is None else round(latency, 3),
        **latency_context(dev, lat_stats.get("busy_cores"), timed=latency is not None),
        "clips_per_s": round(len(labels) / max(1e-9, timing["model_s"]), 2),
        "end_to_end_clips_per_s": round(len(labels) / max(1e-9, timing["total_s"]), 2),
        "split": split,
        "clips_per_video": clips,
        "crops": crops,
        # videos that failed to load are left out (their clips were replaced by other videos' clips)
        "videos_in_split": len(info.split(split)),
        "load_failures": int(loader.dataset.failures),
        "device": str(dev),
        "per_class": per_class,
        "classes": list(info.classes),
        "confusion": confusion_matrix(vpred, vl, n_cls),
    }


def summarise_model(
    model: nn.Module,
    meta: ModelMeta,
    data: Any = None,
    *,
    clips: int = 1,
    latency_runs: int = 10,
    device: str | torch.device = "cpu",
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """One before/after row: params, MACs, CPU latency at batch 1 (not with ``latency_runs=0``: a
    pair of rows is timed side by side by :func:`add_paired_latency`) and, with `data`, test
    video/clip top-1."""
    from vcc.core.macs import count_macs

    counted = count_macs(model, meta.input_shape, by_layer=False)
    doc: dict[str, Any] = {"params": int(counted.params), "macs": int(counted.macs)}
    model = model.cpu().eval()
    if latency_runs > 0:
        add_paired_latency([(doc, model, meta)], runs=latency_runs)
    if data is not None:
        res = evaluate(model, meta, data, split="test", clips=clips, device=device, progress=progress, latency_runs=0)
        doc["video_top1"] = res["video_top1"]
        doc["clip_top1"] = res["clip_top1"]
        model.cpu()
    return doc


def latency_context(device: torch.device, busy_cores: float | None, timed: bool = True) -> dict[str, Any]:
    """What a latency was timed on, as every result document records it: the CPU threads
    (``latency_threads``) and the cores other processes kept busy (``latency_busy_cores``);
    both None off the CPU or when nothing was `timed`."""
    cpu = timed and torch.device(device).type == "cpu"
    return {"latency_threads": torch.get_num_threads() if cpu else None,
            "latency_busy_cores": busy_cores if cpu else None}


def paired_latency(models: Sequence[tuple[nn.Module, ModelMeta]], *, device: str | torch.device = "cpu", batch: int = 1,
                   warmup: int = 2, runs: int = 10, rounds: int = 5, min_s: float = 0.2, fold_bn: bool = True,
                   stats: dict[str, Any] | None = None) -> list[float]:
    """Latency in ms at batch `batch` of each (model, meta), timed side by side (as
    :func:`measure_latency` times one): `rounds` interleaved rounds of about `runs` / `rounds`
    forwards (at least `min_s` / `rounds` seconds) each, the median of the rounds' medians.
    Timed one after the other, two copies of one model could read 0.8 and 1.2 ms on a busy
    machine; interleaved, a burst of noise falls on both. Each model's train/eval mode is kept.
    `stats`, if given, receives ``busy_cores``: the cores other processes kept busy meanwhile
    (:class:`vcc.core.sysinfo.CpuContention`; None where unknown)."""
    from vcc.core.sysinfo import CpuContention

    device = resolve_device(device)
    modes = [model.training for model, _ in models]
    forms, inputs = [], []
    for model, meta in models:
        model = model.to(device).eval()
        x = torch.randn(batch, *meta.input_shape, device=device)
        forms.append(inference_form(model, x) if fold_bn else model)
        inputs.append(x)
    per_round = max(1, -(-runs // rounds))
    times: list[list[float]] = [[] for _ in forms]
    with CpuContention() as contention:
        for _ in range(rounds):
            for i, (fn, x) in enumerate(zip(forms, inputs, strict=True)):
                times[i].append(median_ms(fn, x, warmup=warmup, runs=per_round, min_s=min_s / rounds))
    if stats is not None:
        stats["busy_cores"] = contention.others
    for (model, _), training in zip(models, modes, strict=True):
        model.train(training)
    return [float(statistics.median(t)) for t in times]


def add_paired_latency(rows: Sequence[tuple[dict[str, Any], nn.Module, ModelMeta]], runs: int = 10) -> None:
    """Set ``latency_ms`` and :func:`latency_context`'s keys of each summary row (:func:`summarise_model`)
    from :func:`paired_latency` of its model: before/after rows whose ratio means something."""
    stats: dict[str, Any] = {}
    ms = paired_latency([(m, meta) for _, m, meta in rows], runs=runs, stats=stats)
    for (doc, _, _), v in zip(rows, ms, strict=True):
        doc["latency_ms"] = round(v, 3)
        doc.update(latency_context(torch.device("cpu"), stats.get("busy_cores")))
