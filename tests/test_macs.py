"""MAC counting (vcc.core.macs) and the `vcc macs` command."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from tests.conftest import run_vcc
from vcc.cli import app
from vcc.core.macs import count_macs
from vcc.core.models import build_model, get_spec, list_models

runner = CliRunner()


# ---------------------------------------------------------------- published figures

# torchvision's published figures (Kinetics-400 heads): GMACs at the given clip, M params.
PUBLISHED = {
    "r3d_18": ((3, 16, 112, 112), 40.70, 33.37),
    "mc3_18": ((3, 16, 112, 112), 43.34, 11.70),
    "r2plus1d_18": ((3, 16, 112, 112), 40.52, 31.51),
    "s3d": ((3, 16, 224, 224), 17.98, 8.32),
}


@pytest.mark.parametrize(
    "arch",
    [
        "r3d_18",
        "r2plus1d_18",
        pytest.param("mc3_18", marks=pytest.mark.slow),
        pytest.param("s3d", marks=pytest.mark.slow),
    ],
)
def test_published_figures_within_1_percent(arch: str) -> None:
    shape, gmacs, mparams = PUBLISHED[arch]
    res = count_macs(build_model(arch, num_classes=400), shape, by_layer=True)
    assert res.macs / 1e9 == pytest.approx(gmacs, rel=0.01)
    assert res.params / 1e6 == pytest.approx(mparams, rel=0.01)
    assert res.uncounted == []
    # BatchNorm and pooling are not MACs (torchvision's figures leave them out too).
    assert "aten::batch_norm" in res.ignored
    # Per-layer rows own their MACs and parameters: they add up to the totals.
    assert sum(r["macs"] for r in res.layers) == res.macs
    assert sum(r["params"] for r in res.layers) == res.params
    assert {r["type"] for r in res.layers if r["macs"]} >= {"Linear" if arch != "s3d" else "Conv3d"}


# ---------------------------------------------------------------- Conv3d subclasses


def test_torchvision_conv3d_subclasses_are_counted() -> None:
    from torchvision.models.video.resnet import Conv2Plus1D, Conv3DNoTemporal, Conv3DSimple

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.simple = Conv3DSimple(3, 8)
            self.no_temporal = Conv3DNoTemporal(8, 8)
            self.plus = Conv2Plus1D(8, 8, midplanes=6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.plus(self.no_temporal(self.simple(x)))

    net = Net()
    # Counters dispatching on exact module type miss these: none of them is exactly nn.Conv3d.
    assert all(type(m) is not nn.Conv3d for m in (net.simple, net.no_temporal))
    assert type(net.plus) is not nn.Conv3d and isinstance(net.plus, nn.Sequential)
    t, h, w = 4, 6, 6
    out = t * h * w  # stride 1, "same" padding everywhere
    expected = (
        out * 8 * 3 * 27  # Conv3DSimple: 3x3x3
        + out * 8 * 8 * 9  # Conv3DNoTemporal: 1x3x3
        + out * 6 * 8 * 9  # Conv2Plus1D spatial 1x3x3 to midplanes
        + out * 8 * 6 * 3  # Conv2Plus1D temporal 3x1x1
    )
    res = count_macs(net, (3, t, h, w))
    assert res.macs == expected
    by_name = {r["name"]: r for r in res.layers}
    assert by_name["simple"]["type"] == "Conv3DSimple" and by_name["simple"]["macs"] == out * 8 * 3 * 27
    assert by_name["no_temporal"]["type"] == "Conv3DNoTemporal"


# ---------------------------------------------------------------- recurrent layers


class _Seq(nn.Module):
    """(N, C, T, H, W) -> per-frame flattened pixels -> a recurrent layer -> last step."""

    def __init__(self, rnn: nn.Module, batch_first: bool = True) -> None:
        super().__init__()
        self.rnn = rnn
        self.batch_first = batch_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.transpose(1, 2).flatten(2)  # (N, T, C*H*W)
        if not self.batch_first:
            seq = seq.transpose(0, 1)
        out, _ = self.rnn(seq)
        return out[:, -1] if self.batch_first else out[-1]


def test_lstm_counts_t_4h_i_plus_h_exactly() -> None:
    T, n_in, H = 7, 3 * 2 * 2, 10
    model = _Seq(nn.LSTM(n_in, H, batch_first=True))
    res = count_macs(model, (3, T, 2, 2))
    assert res.macs == T * 4 * H * (n_in + H)
    assert res.layers == [{"name": "rnn", "type": "LSTM", "macs": T * 4 * H * (n_in + H), "params": res.params}]
    assert res.uncounted == []

    # Pinned: fvcore alone counts nothing for it, and PyTorch's FlopCounterMode gives 0 on CPU
    # too; that is why vcc adds its own aten::lstm handle (revisit if these ever start counting).
    from fvcore.nn import FlopCountAnalysis
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, T, 2, 2)
    raw = FlopCountAnalysis(model.eval(), (x,))
    raw.unsupported_ops_warnings(False)
    assert raw.total() == 0 and "aten::lstm" in raw.unsupported_ops()
    with FlopCounterMode(display=False) as fcm, torch.no_grad():
        model(x)
    assert fcm.get_total_flops() == 0


def test_stacked_bidirectional_lstm_gru_rnn_and_projection() -> None:
    T, n_in = 5, 3 * 4
    # 2 layers, both directions: layer 2 sees 2H inputs.
    H = 6
    lstm = _Seq(nn.LSTM(n_in, H, num_layers=2, bidirectional=True, batch_first=True))
    assert count_macs(lstm, (3, T, 2, 2)).macs == 2 * T * 4 * H * (n_in + H) + 2 * T * 4 * H * (2 * H + H)
    # GRU has 3 gates, a plain RNN one; time-major input works too.
    assert count_macs(_Seq(nn.GRU(n_in, H), batch_first=False), (3, T, 2, 2)).macs == T * 3 * H * (n_in + H)
    assert count_macs(_Seq(nn.RNN(n_in, H), batch_first=False), (3, T, 2, 2)).macs == T * H * (n_in + H)
    # proj_size P: recurrence on P, plus the P x H projection.
    P = 4
    proj = _Seq(nn.LSTM(n_in, H, proj_size=P, batch_first=True))
    assert count_macs(proj, (3, T, 2, 2)).macs == T * (4 * H * (n_in + P) + P * H)


def test_packed_sequence_lstm_counts_real_steps() -> None:
    class Packed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(4, 5, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seq = x.transpose(1, 2).flatten(2)  # (1, T=6, 4)
            packed = nn.utils.rnn.pack_padded_sequence(seq, torch.tensor([4]), batch_first=True)
            _, (h, _) = self.lstm(packed)
            return h[-1]

    assert count_macs(Packed(), (1, 6, 2, 2)).macs == 4 * 4 * 5 * (4 + 5)


def test_zoo_recurrent_models_and_mode_restored() -> None:
    model = build_model("lstm_e2e", num_classes=5, frame_size=8, hidden_size=16).train()
    res = count_macs(model, (3, 6, 16, 16))
    # 6 steps of an LSTM over 8x8 grey frames, plus the classifier.
    assert res.macs == 6 * 4 * 16 * (64 + 16) + 16 * 5
    assert res.uncounted == []
    assert model.training  # counting ran in eval mode and restored the mode

    cnn = build_model("cnn_lstm", num_classes=5, backbone="tiny", hidden_size=8)
    res = count_macs(cnn, (3, 4, 32, 32))
    lstm_row = next(r for r in res.layers if r["type"] == "LSTM")
    assert lstm_row["macs"] == 4 * 4 * 8 * (cnn.feature_dim + 8)
    assert res.macs > lstm_row["macs"] and res.uncounted == []


def test_input_too_small_is_one_line_error() -> None:
    from vcc.core.errors import VccError

    model = nn.Sequential(nn.Conv3d(3, 4, kernel_size=5))
    with pytest.raises(VccError, match="cannot run"):
        count_macs(model, (3, 2, 2, 2))
    with pytest.raises(VccError, match="C, T, H, W"):
        count_macs(model, (3, 8, 8))


@pytest.mark.slow
def test_every_registered_arch_is_fully_counted() -> None:
    for arch in list_models():
        size = max(get_spec(arch).size // 2, 32) if arch != "lstm_e2e" else 32
        res = count_macs(build_model(arch, num_classes=5), (3, 8, size, size), by_layer=False)
        assert res.macs > 0 and res.uncounted == [], (arch, res.uncounted)
    for backbone in ("resnet18", "mobilenet_v2", "efficientnet_b0", "inception_v3"):
        res = count_macs(build_model("cnn_lstm", num_classes=5, backbone=backbone), (3, 2, 80, 80))
        assert res.uncounted == [] and any(r["type"] == "LSTM" and r["macs"] > 0 for r in res.layers)


# ---------------------------------------------------------------- the command


def test_cli_json_is_the_only_stdout() -> None:
    proc = run_vcc("macs", "r3d_tiny", "--by-layer", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # the whole of stdout is one JSON document
    assert list(doc) == ["model", "input", "macs", "params", "layers", "uncounted", "not_macs"]
    assert doc["model"] == "r3d_tiny" and doc["input"] == [3, 8, 32, 32]  # the arch's defaults
    assert sum(r["macs"] for r in doc["layers"]) == doc["macs"] > 0
    assert all(set(r) == {"name", "type", "macs", "params"} for r in doc["layers"])
    assert doc["uncounted"] == []
    assert {"aten::add", "aten::max_pool3d"} <= set(doc["not_macs"])  # what the table's note lists, in JSON too
    assert proc.stderr == ""  # fvcore's and the jit tracer's warnings are silenced


def test_cli_options_and_formats() -> None:
    res = runner.invoke(app, ["macs", "r3d_tiny", "--frames", "4", "--size", "16", "--num-classes", "7", "-f", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    expected = count_macs(build_model("r3d_tiny", num_classes=7), (3, 4, 16, 16), by_layer=False)
    assert doc["input"] == [3, 4, 16, 16] and doc["layers"] == []
    assert (doc["macs"], doc["params"]) == (expected.macs, expected.params)

    res = runner.invoke(app, ["macs", "r3d_tiny", "--by-layer", "-f", "csv"])
    assert res.exit_code == 0, res.output
    rows = list(csv.reader(io.StringIO(res.stdout)))
    header = rows[0]
    assert "GMACs" in header and "MACs" in header and not any("FLOP" in h.upper() for h in header)
    assert int(rows[1][header.index("MACs")]) == count_macs(build_model("r3d_tiny", num_classes=400), (3, 8, 32, 32)).macs
    assert ["layer", "type", "MACs", "% of MACs", "params"] in rows

    res = runner.invoke(app, ["macs", "r3d_tiny", "-f", "markdown"])
    assert res.exit_code == 0
    assert res.stdout.startswith("**MACs of r3d_tiny") and "| GMACs |" in res.stdout

    res = runner.invoke(app, ["macs", "r3d_tiny"])
    assert res.exit_code == 0 and "GMACs" in res.stdout and "multiply-accumulates" in res.stdout


def test_cli_bad_input() -> None:
    res = runner.invoke(app, ["macs", "no_such_arch"])
    assert res.exit_code == 2
    assert res.stderr.count("\n") == 1 and "known archs:" in res.stderr and "r3d_tiny" in res.stderr
    assert res.stdout == ""

    proc = run_vcc("macs", "/nonexistent/model.safetensors")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: model file not found: /nonexistent/model.safetensors"

    res = runner.invoke(app, ["macs", "r3d_tiny", "--frames", "0"])
    assert res.exit_code == 2


def test_cli_model_artefact_and_run_name(ws) -> None:
    from vcc.core.artefact import ModelMeta, input_spec, save_model

    model = build_model("r3d_tiny", num_classes=3)
    meta = ModelMeta(arch="r3d_tiny", num_classes=3, classes=["a", "b", "c"], input=input_spec(6, 24))
    path = ws.run_dir("tiny-run", create=True) / "model.safetensors"
    save_model(path, model, meta)
    expected = count_macs(model, (3, 6, 24, 24))

    for spec in (str(path), "tiny-run"):
        res = runner.invoke(app, ["macs", spec, "-f", "json"])
        assert res.exit_code == 0, res.output
        doc = json.loads(res.stdout)
        assert doc["model"] == spec and doc["input"] == [3, 6, 24, 24]  # the artefact's input spec
        assert (doc["macs"], doc["params"]) == (expected.macs, expected.params)
        assert "exits" not in doc

    res = runner.invoke(app, ["macs", "tiny-run", "--num-classes", "5"])
    assert res.exit_code == 2 and "--num-classes" in res.stderr

    bad = ws.root / "not_vcc.safetensors"
    bad.write_bytes(b"garbage")
    res = runner.invoke(app, ["macs", str(bad)])
    assert res.exit_code == 1 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1


def test_cli_multi_exit_model_lists_exit_macs(ws) -> None:
    exits = pytest.importorskip("vcc.core.exits")
    from vcc.core.artefact import ModelMeta, input_spec, save_model

    base = build_model("r3d_tiny", num_classes=3)
    meta = ModelMeta(arch="r3d_tiny", num_classes=3, input=input_spec(8, 32))
    model, meta = exits.attach_exits(base, meta, "auto")
    path = ws.root / "multi.safetensors"
    save_model(path, model, meta)

    res = runner.invoke(app, ["macs", str(path), "-f", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    rows = doc["exits"]
    assert len(rows) == len(meta.wrappers[-1]["options"]["stages"]) + 1
    cum = [r["macs"] for r in rows]
    assert cum == sorted(cum) and cum[0] < cum[-2] < doc["macs"] <= cum[-1]
    res = runner.invoke(app, ["macs", str(path)])
    assert "Cumulative MACs per exit" in res.stdout


def test_cli_import_does_not_load_torch() -> None:
    code = "import sys, vcc.cli; print(sorted(m for m in ('torch', 'fvcore', 'torchvision') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    proc = run_vcc("macs", "--help")
    assert proc.returncode == 0 and "MACs" in proc.stdout and "FLOPs" in proc.stdout  # "not FLOPs"
