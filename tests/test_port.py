"""`vcc port`: masked -> dense models whose outputs match, ONNX export, nothing-to-remove."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from typer.testing import CliRunner

from vcc.cli import app
from vcc.core.artefact import load_model, load_tensors, save_model

runner = CliRunner()


def _masked_with_dead_filters(tiny_model: Path, tmp_path: Path) -> Path:
    """r3d_tiny with 60% magnitude masks, plus whole filters masked in two layers.

    layer1.0.conv1: 4 filters whose BN output is 0 (exactly removable); layer3.0.conv1: 6 filters
    whose BN shift is negative (ReLU clamps them to 0: removable); layer2.0.conv1: 3 filters whose
    BN shift is positive (a constant channel: must NOT be removed).
    """
    from vcc.core.compress.magnitude import apply_magnitude
    from vcc.core.compress.prune import clone

    model, meta = load_model(tiny_model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model, meta, _ = apply_magnitude(model, meta, 0.6)
    with torch.no_grad():
        def kill(conv: nn.Module, bn: nn.Module, k: int, shift: float) -> None:
            conv.weight_mask[:k] = 0
            bn.running_mean[:k] = 0.0
            bn.bias[:k] = shift

        kill(model.layer1[0].conv1, model.layer1[0].bn1, 4, 0.0)
        kill(model.layer3[0].conv1, model.layer3[0].bn1, 6, -0.5)
        kill(model.layer2[0].conv1, model.layer2[0].bn1, 3, 0.5)
    return save_model(tmp_path / "masked.safetensors", clone(model), meta)


def test_port_masks_removes_exactly_removable_channels(ws, tiny_model: Path, tmp_path: Path) -> None:
    path = _masked_with_dead_filters(tiny_model, tmp_path)
    onnx_path = tmp_path / "dense.onnx"
    res = runner.invoke(app, ["port", "--latency-runs", "2", str(path), "--onnx", str(onnx_path), "--name", "dense", "--format", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["kind"] == "masks" and doc["changed"]
    assert doc["removed"] == {"layer1.0.conv1": 4, "layer3.0.conv1": 6}
    assert doc["max_abs_diff"] <= 1e-4
    assert doc["after"]["params"] < doc["before"]["params"] and doc["after"]["macs"] < doc["before"]["macs"]
    dense, meta = load_model(ws.runs_dir / "dense" / "model.safetensors")
    assert meta.wrappers == []
    assert dense.layer1[0].conv1.out_channels == 12 and dense.layer3[0].conv1.out_channels == 58
    assert dense.layer2[0].conv1.out_channels == 32  # constant (BN shift > 0) channels stay
    masked, _ = load_model(path)
    x = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        assert float((dense(x) - masked(x)).abs().max()) <= 1e-4
    assert float((dense.layer2[0].conv2.weight == 0).float().mean()) > 0.5  # masks baked in
    import onnx

    proto = onnx.load(str(onnx_path))
    onnx.checker.check_model(proto)
    assert doc["onnx"]["checked"] and proto.graph.input[0].name == "clip"


def test_port_of_a_dense_model_is_an_equal_artefact(ws, tiny_model: Path) -> None:
    res = runner.invoke(app, ["port", "--latency-runs", "2", str(tiny_model), "--name", "same"])
    assert res.exit_code == 0, res.output
    assert "nothing to remove" in res.stdout
    a, _ = load_tensors(tiny_model)
    b, doc = load_tensors(ws.runs_dir / "same" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert doc["provenance"]["parent_sha256"]


def test_port_bad_input(ws, tmp_path: Path) -> None:
    bogus = tmp_path / "x.safetensors"
    bogus.write_bytes(b"not a safetensors file")
    res = runner.invoke(app, ["port", "--latency-runs", "2", str(bogus), "--name", "nope"])
    assert res.exit_code == 1 and "error:" in res.output
    assert not (ws.runs_dir / "nope").exists()
