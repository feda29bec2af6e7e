"""Distiller-style sensitivity analysis: prune one layer at a time at several ratios, no retraining."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vcc.core.errors import UsageError
from vcc.core.progress import ProgressFn


def parse_ratios(text: str) -> list[float]:
    """'0.1,0.2,0.5' -> [0.1, 0.2, 0.5], each in (0, 1)."""
    try:
        ratios = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--ratios must be comma-separated numbers, got {text!r}") from None
    if not ratios or any(not 0.0 < r < 1.0 for r in ratios):
        raise UsageError(f"--ratios must be numbers in (0, 1), got {text!r}")
    return sorted(set(ratios))


def sensitivity(model: nn.Module, meta: Any, data: Any, scores: dict[str, torch.Tensor], ratios: list[float], *,
                clips: int = 1, device: str = "cpu", ignore: list[str] | None = None,
                progress: ProgressFn | None = None) -> list[dict[str, Any]]:
    """Rows (layer, coupled, ratio, removed, macs, video_top1, clip_top1) plus a ratio-0 baseline per layer.

    Each "layer" is one coupled channel group, named by its root conv (the name `vcc prune`'s
    per-layer ratios use), in network order; pruning it removes the lowest-scored `ratio` of the
    group's channels from every coupled conv.
    """
    from vcc.core.compress.prune import Surgeon, clone, count_macs, example_input, group_scores
    from vcc.core.evaluate import evaluate

    base = evaluate(model, meta, data, split="test", clips=clips, device=device, latency_runs=0)
    model.cpu()
    base_macs, _ = count_macs(model, meta)
    probe = Surgeon(clone(model).cpu(), example_input(meta), ignore)
    probe.finish()
    gscores = group_scores(probe.groups, scores, normalise=False)
    rows: list[dict[str, Any]] = []
    total = len(probe.groups) * len(ratios)
    done = 0
    # in network order (by each group's first conv), not the dependency graph's
    pos = {n: i for i, (n, _) in enumerate(model.named_modules())}
    order_of = sorted(range(len(probe.groups)),
                      key=lambda i: min(pos.get(n, len(pos)) for n in [probe.groups[i].root, *probe.groups[i].members]))
    for gi in order_of:
        g = probe.groups[gi]
        rows.append({"layer": g.root, "coupled": len(g.members), "channels": g.size, "ratio": 0.0, "removed": 0,
                     "macs": base_macs, "video_top1": base["video_top1"], "clip_top1": base["clip_top1"]})
        order = torch.argsort(gscores[gi], stable=True).tolist()
        for r in ratios:
            k = min(g.size - 1, int(round(r * g.size)))
            trial = clone(model).cpu().eval()
            s = Surgeon(trial, example_input(meta), ignore)
            s.prune({gi: [g.channels[j] for j in order[:k]]} if k > 0 else {})
            macs, _ = count_macs(trial, meta)
            res = evaluate(trial, meta, data, split="test", clips=clips, device=device, latency_runs=0)
            rows.append({"layer": g.root, "coupled": len(g.members), "channels": g.size, "ratio": r, "removed": k,
                         "macs": macs, "video_top1": res["video_top1"], "clip_top1": res["clip_top1"]})
            done += 1
            if progress:
                progress("sensitivity", done, total, {"layer": g.root, "ratio": r, "top1": res["video_top1"]})
    return rows


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Rows as CSV (atomic)."""
    import csv
    import io

    from vcc.core.workspace import atomic_write_text

    buf = io.StringIO()
    cols = ["layer", "coupled", "channels", "ratio", "removed", "macs", "video_top1", "clip_top1"]
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def plot(path: str | Path, rows: list[dict[str, Any]], title: str = "") -> None:
    """Video top-1 vs pruning ratio, one line per layer (PNG, matplotlib Agg; atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vcc.core.workspace import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    layers: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        layers.setdefault(r["layer"], []).append((r["ratio"], r["video_top1"]))
    for name, pts in layers.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("fraction of the layer's channels pruned")
    ax.set_ylabel("video top-1 (%)")
    ax.set_title(title or "Pruning sensitivity (no retraining)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
