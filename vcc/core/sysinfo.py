"""What machine a measurement ran on (benchmarks and reports name the device)."""

from __future__ import annotations

import os
import platform
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

