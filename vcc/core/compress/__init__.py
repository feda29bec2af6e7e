"""Compression: channel pruning (rank, prune, sensitivity, schedules), magnitude masks, port, VIB.

Light on import: submodules load torch and Torch-Pruning when used.
"""

from __future__ import annotations

from typing import Any

COMPARE_ROWS = (
    ("params", "params"),
    ("nonzero_params", "non-zero params"),
    ("macs", "MACs"),
    ("latency_ms", "CPU latency ms (batch 1)"),
    ("video_top1", "video top-1 %"),
    ("clip_top1", "clip top-1 %"),
)
PERCENT_ROWS = {"video_top1", "clip_top1"}  # fractions in the summaries, % in the table


def compare_table(before: dict[str, Any], after: dict[str, Any], title: str = "before -> after", after_label: str = "after"):
    """A Table of metric, before, after, after/before for the keys both summaries have (`after_label`
    names the after column, e.g. "after (dense port)" where it is not the saved model itself)."""
    from vcc.core.report import Table, latency_label, percent

    t = Table(["metric", "before", after_label, f"{after_label}/before"], title=title)
    for key, label in COMPARE_ROWS:
        if key not in before and key not in after:
            continue
        b, a = before.get(key, before.get("params") if key == "nonzero_params" else None), after.get(key)
        ratio = round(a / b, 4) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None
        if key in PERCENT_ROWS:
            b, a = percent(b), percent(a)
        if key == "latency_ms":  # the threads it was timed on (`vcc --threads N`)
            label = latency_label(after.get("latency_threads") or before.get("latency_threads"), device="CPU")
        t.add(label, b, a, ratio)
    return t
