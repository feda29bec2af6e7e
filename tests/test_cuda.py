"""CUDA paths: AMP training, channels_last_3d, device-side normalisation, NCCL. Skipped without a GPU.

CI has no GPU; these run on any machine that has one (`pytest tests/test_cuda.py`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch

from tests.conftest import run_vcc
from vcc.core.artefact import load_model
from vcc.core.models import build_model
from vcc.core.training import amp_dtype, prepare_input, weights_sha256

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
FAST = ["--epochs", "1", "--workers", "0", "--batch-size", "8"]


def test_uint8_batches_normalise_on_device_in_channels_last() -> None:
    dev = torch.device("cuda")
    x = torch.randint(0, 256, (2, 3, 8, 32, 32), dtype=torch.uint8)
    y = prepare_input(x, dev, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], channels_last=True)
    assert y.is_cuda and y.dtype == torch.float32
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    ref = (x.float() / 255 - 0.5) / 0.25
    assert torch.allclose(y.cpu(), ref, atol=1e-6)


def test_amp_dtype_is_bf16_where_supported() -> None:
    dev = torch.device("cuda")
    want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert amp_dtype(dev) == want


def test_cuda_amp_train_then_cpu_and_cuda_agree(ws, tiny_synthetic) -> None:
    proc = run_vcc("train", "--data", str(tiny_synthetic), "--name", "g1", *FAST, "--device", "cuda", "--amp", "-f", "json", check=True)
    doc = json.loads(proc.stdout)
    model, meta = load_model(doc["model"])  # loads on the CPU
    assert all(not p.is_cuda for p in model.parameters())
    x = torch.randn(2, 3, meta.frames, meta.size, meta.size)
    model.eval()
    with torch.no_grad():
        cpu = model(x)
        gpu = model.cuda()(x.cuda()).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-3, rtol=1e-3)
    ev = json.loads(run_vcc("eval", doc["model"], "--data", str(tiny_synthetic), "--device", "cuda", "-f", "json", check=True).stdout)
    assert 0.0 <= ev["video_top1"] <= 1.0 and ev["latency_ms"] > 0


def test_compiled_cuda_forward_matches_eager() -> None:
    torch.manual_seed(0)
    model = build_model("r3d_tiny", num_classes=4).cuda().eval()
    x = torch.randn(2, 3, 8, 32, 32, device="cuda")
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model)(x)
    assert torch.allclose(eager, compiled, atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_torchrun_nccl_two_ranks_agree(ws, tiny_synthetic, tmp_path) -> None:
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not installed")
    hashes = tmp_path / "hashes"
    env = {**os.environ, "VCC_HOME": str(ws.root), "VCC_WEIGHTS_HASH_DIR": str(hashes)}
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "vcc", "train", "--data", str(tiny_synthetic),
                           "--name", "nccl", *FAST, "--device", "cuda", "-f", "json"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    r0, r1 = (hashes / "rank0.sha256").read_text(), (hashes / "rank1.sha256").read_text()
    assert r0 == r1
    model, _ = load_model(doc["last"])
    assert weights_sha256(model) == r0.strip()


def test_space_to_depth_stem_matches_on_cuda_amp_channels_last() -> None:
    """The stem fit() runs on the CUDA AMP path: same outputs and weight gradient in bf16 channels_last."""
    from torch import nn

    from vcc.core.training import space_to_depth_stem

    torch.manual_seed(0)
    conv = nn.Conv3d(3, 64, (3, 7, 7), (1, 2, 2), (1, 3, 3), bias=False).cuda().to(memory_format=torch.channels_last_3d)
    x = torch.randn(4, 3, 8, 112, 112, device="cuda").contiguous(memory_format=torch.channels_last_3d)
    g = torch.randn(4, 64, 8, 56, 56, device="cuda")

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        conv.weight.grad = None
        with torch.autocast("cuda", torch.bfloat16):
            y = conv(x)
        y.backward(g)
        return y.float(), conv.weight.grad.clone()

    y0, g0 = run()
    undo = space_to_depth_stem(conv)
    assert undo is not None
    y1, g1 = run()
    assert ((y1 - y0).norm() / y0.norm()).item() < 1e-2
    assert ((g1 - g0).norm() / g0.norm()).item() < 1e-2


@pytest.mark.parametrize("flags", [["--compile"], ["--compile-mode", "max-autotune-no-cudagraphs"]], ids=["default", "max-autotune"])
def test_compiled_cuda_training_through_the_cli(ws, tiny_synthetic, flags: list[str]) -> None:
    proc = run_vcc("train", "--data", str(tiny_synthetic), "--name", "gc", *FAST, "--device", "cuda", *flags, "-f", "json", check=True)
    doc = json.loads(proc.stdout)
    model, _ = load_model(doc["model"])
    assert not any(k.startswith("_orig_mod") for k in model.state_dict())
    ev = json.loads(run_vcc("eval", doc["model"], "--data", str(tiny_synthetic), "--device", "cuda", "-f", "json", check=True).stdout)
    assert 0.0 <= ev["video_top1"] <= 1.0
