"""CLI start-up latency: `vcc --help`, `vcc macs --help`, `vcc --version`, and `import vcc.cli`.

Usage: python bench/cli_startup.py [--quick] [--runs N]

Each case runs as a fresh subprocess (`python -m vcc ...`) several times; the JSON on stdout
gives the median and min wall time per case, whether `import vcc.cli` pulled in torch (it must
not: commands import torch lazily), and the goal (< 1 s for the help screens).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

CASES = {
    "vcc --help": ["-m", "vcc", "--help"],
    "vcc macs --help": ["-m", "vcc", "macs", "--help"],
    "vcc --version": ["-m", "vcc", "--version"],
    "python -c pass": ["-c", "pass"],  # the interpreter's own start-up, for reference
}
GOAL_S = 1.0


def time_case(args: list[str], runs: int) -> dict[str, float]:
    """Median and min wall seconds of `python *args` over `runs` fresh subprocesses (after 1 warm-up)."""
    env = {**os.environ, "COLUMNS": "100"}
    subprocess.run([sys.executable, *args], capture_output=True, env=env, check=True)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *args], capture_output=True, env=env, check=True)
        times.append(time.perf_counter() - t0)
    return {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3), "runs": runs}


def heavy_imports() -> list[str]:
    """Heavy modules loaded by `import vcc.cli` (should be none)."""
    code = "import sys, vcc.cli; print(','.join(m for m in ('torch', 'torchvision', 'fvcore', 'numpy', 'decord') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    return [m for m in out.split(",") if m]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 runs per case instead of 7")
    ap.add_argument("--runs", type=int, default=None)
    args = ap.parse_args()
    runs = args.runs or (3 if args.quick else 7)
    results = {name: time_case(cmd, runs) for name, cmd in CASES.items()}
    help_worst = max(results["vcc --help"]["median_s"], results["vcc macs --help"]["median_s"])
    from vcc.core.sysinfo import cpu_model  # no torch import

    doc = {
        "device": f"CPU: {cpu_model()}, {os.cpu_count()} cores (load avg {os.getloadavg()[0]:.1f})",
        "python": platform.python_version(),
        "help_median_s": help_worst,
        "goal_s": GOAL_S,
        "meets_goal": help_worst < GOAL_S,
        "heavy_imports_at_cli_import": heavy_imports(),
        "cases": results,
    }
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
