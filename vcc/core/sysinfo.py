"""What machine a measurement ran on (benchmarks and reports name the device)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: object = None) -> str:
    """A CUDA device's name (default: cuda:0 when CUDA is available), else 'CPU model (N cores, M threads)'."""
    import torch

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} (CUDA {torch.version.cuda})"
    return f"{cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def set_cpu_threads(n: int) -> None:
    """Run PyTorch's CPU ops on `n` threads in this process (and in the processes it starts).

    Before torch is imported this sets OMP_NUM_THREADS / MKL_NUM_THREADS, which PyTorch reads when
    its thread pool starts (no torch import here: `vcc --threads 1 --help` stays fast); after, it
    calls ``torch.set_num_threads``.
    """
    import sys

    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)



def usable_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _system_busy_s() -> float | None:
    """CPU seconds all processes have spent busy since boot (Linux /proc/stat; steal time counts:
    a VM's host took those cycles). None where unknown."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    if not first or first[0] != "cpu" or len(first) < 8:
        return None
    v = [int(x) for x in first[1:]]
    # user nice system idle iowait irq softirq steal (guest time is inside user already)
    return (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / float(ticks)


class CpuContention:
    """Measures how many cores' worth of CPU *other* processes used while a block ran.

    ``with CpuContention() as c: ...`` then ``c.others`` (cores, e.g. 1.3; None where the system's
    counters cannot be read). A latency timed while others kept a core busy on a 2-core machine
    is not the model's.
    """

    def __init__(self) -> None:
        self.others: float | None = None

    def __enter__(self) -> CpuContention:
        self._t, self._own, self._busy = time.perf_counter(), time.process_time(), _system_busy_s()
        return self

    def __exit__(self, *_exc: object) -> None:
        busy = _system_busy_s()
        wall = time.perf_counter() - self._t
        if busy is None or self._busy is None or wall <= 0:
            return
        own = time.process_time() - self._own
        self.others = round(max(0.0, (busy - self._busy - own) / wall), 2)


# others' cores above which a latency is flagged as taken on a busy machine
BUSY_CORES = 0.5
