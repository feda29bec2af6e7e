"""Shared fixtures: a temporary workspace, a tiny synthetic dataset, tiny model artefacts.

Keep sizes tiny (8 frames, 32 px, r3d_tiny): the whole suite must run on 2 CPU cores in minutes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHARED_VIDEOS = SHARED / "videos"
UCF_SPLITS = SHARED / "ucf101-splits"

# Small but learnable: 4 classes x 6 videos, 16 frames of 32 px.
TINY_SYNTH = {"classes": 4, "videos_per_class": 6, "frames": 16, "size": 32, "seed": 0}


def pytest_configure(config: pytest.Config) -> None:
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh workspace in a temp dir, also exported as $VCC_HOME for subprocesses."""
    from vcc.core.workspace import Workspace

    root = tmp_path / "ws"
    monkeypatch.setenv("VCC_HOME", str(root))
    return Workspace(root)


@pytest.fixture(scope="session")
def session_ws(tmp_path_factory: pytest.TempPathFactory):
    """A workspace shared by the whole session (for expensive fixtures)."""
    from vcc.core.workspace import Workspace

    return Workspace(tmp_path_factory.mktemp("session_ws"))


@pytest.fixture(scope="session")
def tiny_synthetic(session_ws) -> Path:
    """A tiny synthetic dataset prepared once per session; returns its folder."""
    from vcc.core.data.synthetic import prepare_synthetic

    res = prepare_synthetic(session_ws, name="tiny", **TINY_SYNTH)
    return Path(res.path)


@pytest.fixture(scope="session")
def tiny_model(session_ws, tiny_synthetic) -> Path:
    """An untrained r3d_tiny artefact whose classes match `tiny_synthetic`."""
    import torch

    from vcc.core.artefact import ModelMeta, input_spec, save_model
    from vcc.core.data.manifest import load_dataset
    from vcc.core.models import build_model

    info = load_dataset(tiny_synthetic)
    torch.manual_seed(0)
    model = build_model("r3d_tiny", num_classes=len(info.classes))
    meta = ModelMeta(arch="r3d_tiny", num_classes=len(info.classes), classes=list(info.classes), input=input_spec(8, 32))
    path = session_ws.root / "tiny_model.safetensors"
    save_model(path, model, meta)
    return path


def run_vcc(*args: str, env: dict[str, str] | None = None, check: bool = False, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real `vcc` CLI in a subprocess (python -m vcc)."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "vcc", *args], capture_output=True, text=True, env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"vcc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
