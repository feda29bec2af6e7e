"""Result tables, independent of any terminal library.

A command's core call returns a :class:`Report`: a JSON document (the `--format json` output,
with a shape fixed per command) plus one or more tables for humans (table, csv, markdown).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Table:
    """A titled table: column headers and rows of plain values."""

    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    title: str = ""
    caption: str = ""

    def add(self, *values: Any) -> None:
        self.rows.append(list(values))


@dataclass
class Report:
    """What a command prints: `doc` for json, `tables` for table/csv/markdown."""

    doc: Any
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def fmt_value(v: Any) -> str:
    """Human formatting of one cell: ints with thousands separators, floats to 4 significant digits."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4g}"
    return str(v)


def percent(fraction: float | None, digits: int = 2) -> float | None:
    """A fraction as a percentage for a human table (0.97917 -> 97.92); None stays None.

    Tables show accuracies and shares in %; the JSON documents keep fractions."""
    return None if fraction is None else round(100.0 * fraction, digits)


def latency_label(threads: int | None, stat: str = "", device: str = "") -> str:
    """A latency row's name, with what it was timed on: 'CPU latency ms (batch 1, 2 threads)'."""
    parts = ["batch 1", *([f"{threads} thread{'s' if threads != 1 else ''}"] if threads else []), *([stat] if stat else [])]
    return f"{device + ' ' if device else ''}latency ms ({', '.join(parts)})"


def busy_note(doc: Any) -> str | None:
    """A warning when other processes kept CPU cores busy while a result's latencies were timed
    (the largest ``latency_busy_cores`` anywhere in `doc` above :data:`vcc.core.sysinfo.BUSY_CORES`)."""
    from vcc.core.sysinfo import BUSY_CORES, usable_cores

    found: list[float] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            v = x.get("latency_busy_cores")
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                found.append(float(v))
            for item in x.values():
                walk(item)
        elif isinstance(x, (list, tuple)):
            for item in x:
                walk(item)

    walk(doc)
    if not found or max(found) <= BUSY_CORES:
        return None
    return (f"other processes kept {max(found):.1f} of {usable_cores()} CPU cores busy while the latencies were timed: "
            "they are not the model's alone; time again on a quiet machine")


def human_count(n: float, unit: str = "") -> str:
    """1234567 -> '1.23 M'; used for MACs and parameter counts."""
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def to_json(doc: Any) -> str:
    """One JSON document."""
    return json.dumps(doc, indent=2, default=_json_default)


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def to_csv(table: Table) -> str:
    """The table as CSV (raw values, no thousands separators)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(table.columns)
    for row in table.rows:
        w.writerow(["" if v is None else v for v in row])
    return buf.getvalue()


def to_markdown(table: Table) -> str:
    """The table as a GitHub-flavoured markdown table, titled with a bold line."""
    lines = []
    if table.title:
        lines += [f"**{table.title}**", ""]
    lines.append("| " + " | ".join(table.columns) + " |")
    aligns = []
    for i, _ in enumerate(table.columns):
        numeric = table.rows and all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool) for r in table.rows if r[i] is not None)
        aligns.append("---:" if numeric else "---")
    lines.append("| " + " | ".join(aligns) + " |")
    for row in table.rows:
        lines.append("| " + " | ".join(fmt_value(v).replace("|", "\\|") for v in row) + " |")
    if table.caption:
        lines += ["", table.caption]
    return "\n".join(lines) + "\n"
