"""Run every benchmark in bench/ and rewrite bench/RESULTS.md with their JSON, device named.

Usage: python bench/run_all.py [--quick] [--only NAME ...]

Each benchmark is a script printing one JSON document on stdout; this runner executes them in
turn (subprocesses, so each starts clean), then writes a markdown report with one section per
benchmark: its headline ratios and the full JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ["cli_startup", "loader", "train_step", "prune", "prune_latency", "vib", "exits"]


def device_name() -> str:
    """The accelerator, or the CPU model and core count, with the torch version."""
    try:
        import torch

        from vcc.core.sysinfo import device_name as _name

        return f"{_name()}, torch {torch.__version__}"
    except Exception:  # pragma: no cover
        return platform.platform()


def run_one(name: str, quick: bool) -> dict:
    script = HERE / f"{name}.py"
    cmd = [sys.executable, str(script)] + (["--quick"] if quick else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    out = {"name": name, "returncode": proc.returncode, "wall_s": round(wall, 1)}
    try:
        out["result"] = json.loads(proc.stdout)
    except json.JSONDecodeError:
        out["result"] = None
        out["stderr_tail"] = proc.stderr[-2000:]
    return out


def headline(result: dict | None) -> list[str]:
    """Top-level scalar fields (ratios, goals) as bullet lines."""
    if not isinstance(result, dict):
        return []
    lines = []
    for key, value in result.items():
        if isinstance(value, (int, float, str, bool)) and key not in ("device",):
            lines.append(f"- `{key}`: {value}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    ap.add_argument("--only", nargs="*", default=None, help="run only these benchmarks")
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = ap.parse_args()
    names = args.only or BENCHES
    dev = device_name()
    results = []
    for name in names:
        print(f"[run_all] {name} ...", file=sys.stderr, flush=True)
        results.append(run_one(name, args.quick))
        print(f"[run_all] {name}: rc={results[-1]['returncode']} in {results[-1]['wall_s']} s", file=sys.stderr, flush=True)
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = ["# Benchmark results", "", f"Device: **{dev}**  ", f"Run: {now}{' (--quick)' if args.quick else ''} by `python bench/run_all.py`", ""]
    for r in results:
        md += [f"## {r['name']}", "", f"exit code {r['returncode']}, {r['wall_s']} s wall", ""]
        md += headline(r.get("result"))
        md += ["", "```json", json.dumps(r.get("result"), indent=2) if r.get("result") is not None else r.get("stderr_tail", ""), "```", ""]
    Path(args.out).write_text("\n".join(md))
    print(json.dumps({"device": dev, "benchmarks": {r["name"]: r["returncode"] for r in results}}, indent=2))


if __name__ == "__main__":
    main()
