"""VIB gates, the kept-unit rule, the dense port and artefact round trips (issue 6)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vcc.core.artefact import ModelMeta, input_spec, load_model, save_model
from vcc.core.compress import vib
from vcc.core.models import build_model, get_spec, list_models

ARCHS = {
    "cnn_lstm": {"backbone": "tiny", "hidden_size": 16},
    "lstm_e2e": {"frame_size": 8, "hidden_size": 12, "num_layers": 2},
    "r3d_tiny": {},
}
# CNNs whose channel coupling differs (shortcut A's zero padding, depthwise convs): the port must
# stay exact on every one (it runs the same DepGraph surgery as `vcc prune`)
CNN_PORTS = {"resnet3d_10": {"shortcut": "A", "base_width": 8}, "mobilenetv2_3d": {"width_mult": 0.25}}
SLOW_PORT_OPTS = {"c3d": {"fc_dim": 64}, "resnet3d_18": {"base_width": 8}, "resnet3d_34": {"base_width": 8},
                  "resnet3d_50": {"base_width": 8}, "resnet3d_101": {"base_width": 8}}


def _cnn_ports() -> list:
    """Every CNN of the zoo: the two above in the default run, the rest under -m slow."""
    out = []
    for name in list_models():
        if get_spec(name).family in ("cnn_lstm", "lstm_e2e") or name == "r3d_tiny":
            continue
        opts = CNN_PORTS.get(name, SLOW_PORT_OPTS.get(name, {}))
        out.append(pytest.param(name, opts, id=name, marks=[] if name in CNN_PORTS else [pytest.mark.slow]))
    return out


def _gated(arch: str, seed: int = 0, randomise: bool = True, opts: dict | None = None) -> tuple[nn.Module, ModelMeta]:
    """A gated model whose gates keep some units and drop others, with non-trivial BN statistics."""
    torch.manual_seed(seed)
    opts = ARCHS[arch] if opts is None else opts
    model = build_model(arch, num_classes=4, **opts)
    meta = ModelMeta(arch=arch, num_classes=4, options=opts, classes=list("abcd"), input=input_spec(8, 32),
                     wrappers=[{"name": "vib", "options": {"threshold": 0.0}}])
    model = vib.vib_wrapper(model, threshold=0.0)
    if randomise:
        with torch.no_grad():
            for gate in vib.gates(model).values():
                gate.mu.uniform_(-1.5, 1.5)
                gate.logD.uniform_(-4.0, 1.0)
            for mod in model.modules():
                if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                    mod.running_mean.uniform_(-0.5, 0.5)
                    mod.running_var.uniform_(0.5, 2.0)
                    mod.weight.uniform_(0.5, 1.5)
                    mod.bias.uniform_(-0.5, 0.5)
    return model.eval(), meta


def test_kl_formula_and_log_alpha_threshold() -> None:
    gate = vib.VIBGate(5, threshold=0.0)
    mu = torch.tensor([1.0, 0.5, -0.2, 1e-3, 2.0], dtype=torch.float64)
    logd = torch.tensor([-9.0, -2.0, -3.0, -2.0, 1.0], dtype=torch.float64)
    with torch.no_grad():
        gate.mu.copy_(mu)
        gate.logD.copy_(logd)
    expected = 0.5 * sum(math.log(1 + m**2 / math.exp(d)) for m, d in zip(mu.tolist(), logd.tolist(), strict=True))
    assert float(gate.kld().detach()) == pytest.approx(expected, rel=1e-5)
    log_alpha = logd - torch.log(mu**2)
    assert torch.allclose(gate.log_alpha().double(), log_alpha, atol=1e-5)
    assert gate.kept().tolist() == (log_alpha < 0).tolist() == [True, True, False, False, True]
    gate.threshold = -3.0  # a stricter threshold drops units 1 and 4
    assert gate.kept().tolist() == (log_alpha < -3.0).tolist() == [True, False, False, False, False]
    # eval gate: mu * mask when eval_scale, else the 0/1 mask
    gate.threshold = 0.0
    gate.eval()
    assert torch.allclose(gate(3), (mu * (log_alpha < 0)).float())
    gate.eval_scale = False
    assert gate(3).tolist() == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_kl_term_uses_kml_per_layer_and_kl_factor() -> None:
    model, _ = _gated("lstm_e2e", randomise=False)
    vib.set_gates(model, kml=2.0, kml_layer={"lstm.input": 0.5, "lstm.l1.*": 0.0})
    gs = vib.gates(model)
    assert gs["lstm.input"].kml == 0.5 and gs["lstm.l0.f"].kml == 2.0 and gs["lstm.l1.o"].kml == 0.0
    expected = sum(g.kml * float(g.kld().detach()) for g in gs.values())
    assert float(vib.kl_term(model, kl_factor=1e-3).detach()) == pytest.approx(1e-3 * expected, rel=1e-5)
    # initial gates: mu ~ 1, logD ~ -9, so every unit is kept and KL ~ 0.5 * 9 per unit
    assert float(gs["lstm.l0.i"].kld().detach()) == pytest.approx(0.5 * 9.0 * 12, rel=0.02)
    assert all(k == t for k, t in vib.kept_units(model).values())


@pytest.mark.parametrize("arch", ["lstm_e2e", "r3d_tiny"])
def test_fresh_noise_every_training_forward(arch: str) -> None:
    model, _ = _gated(arch, randomise=False)
    with torch.no_grad():
        for gate in vib.gates(model).values():
            gate.logD.fill_(-2.0)  # sigma ~ 0.37: visible noise, all units still kept
    x = torch.randn(2, 3, 8, 32, 32)
    model.train()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert (a - b).abs().max() > 1e-3  # a new sample each forward
    model.eval()
    with torch.no_grad():
        c, d = model(x), model(x)
    assert torch.equal(c, d)
    # noise differs per sample within a batch, too
    gate = next(iter(vib.gates(model).values()))
    gate.train()
    z = gate(4)
    assert z.shape == (4, gate.n) and not torch.allclose(z[0], z[1])


def test_hidden_unit_survives_iff_i_g_o_survive() -> None:
    torch.manual_seed(0)
    model = vib.vib_wrapper(build_model("lstm_e2e", num_classes=3, frame_size=4, hidden_size=5))
    g = model.lstm
    off = {"i": 0, "g": 1, "o": 2, "f": 3}  # unit 4 keeps everything
    with torch.no_grad():
        for block, unit in off.items():
            g.gates[f"l0_{block}"].logD[unit] = 5.0  # log alpha ~ 5 > 0: pruned
    assert g.kept_hidden(0).tolist() == [False, False, False, True, True]
    assert vib.kept_units(model)["lstm.l0.hidden"] == [2, 5]
    model.eval()
    with torch.no_grad():
        out, (h, c) = g(torch.randn(2, 6, 16))
    assert torch.all(out[..., :3] == 0) and torch.all(out[..., 3:].abs() > 0)
    # pruned f: no memory, c_t = i_t * g_t; the port reproduces it with f == 0 exactly
    dense, _, info = vib.port_vib(model, ModelMeta(arch="lstm_e2e", num_classes=3, options={"frame_size": 4, "hidden_size": 5}, input=input_spec(6, 4)))
    assert info["lstm_hidden_after"] == [2] and info["forget_gates_off"] == 1
    x = torch.randn(2, 3, 6, 4, 4)
    with torch.no_grad():
        assert (dense(x) - model(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", list(ARCHS))
def test_port_matches_gated_model_and_round_trips(arch: str, tmp_path) -> None:
    model, meta = _gated(arch)
    x = torch.randn(3, 3, 8, 32, 32)
    with torch.no_grad():
        ref = model(x)
    kept = vib.kept_units(model)
    assert any(k < t for k, t in kept.values()) and all(k > 0 for k, _ in kept.values())

    dense, dmeta, info = vib.port_vib(model, meta)
    assert "vib" not in [w["name"] for w in dmeta.wrappers]
    with torch.no_grad():
        out = dense(x)
    assert (out - ref).abs().max() <= 1e-4
    assert info["params_after"] < info["params_before"]
    assert not any(isinstance(m, vib.VIBGate) for m in dense.modules())
    if arch == "r3d_tiny":
        chans = {name: after for name, _, after, _ in info["channels"]}
        assert chans["layer4.0.conv1"] == kept["layer4.0.conv1"][0]  # a conv outside residual coupling
        assert dense.layer4[0].conv1.out_channels < 128
    else:
        lstm = dense.lstm.lstm if isinstance(dense.lstm, vib.IndexedLSTM) else dense.lstm
        assert type(lstm) is nn.LSTM  # a standard (cuDNN-capable) LSTM, not the Python loop
        assert isinstance(dense.lstm, vib.IndexedLSTM)
        assert dense.lstm.index.tolist() == torch.nonzero(vib.gates(model)["lstm.input"].kept()).flatten().tolist()
        assert lstm.input_size == kept["lstm.input"][0]
        assert lstm.hidden_size == max(kept[f"lstm.l{k}.hidden"][0] for k in range(lstm.num_layers))
        assert info["lstm_params_after"] < info["lstm_params_before"]
        opts = ARCHS[arch]
        assert info["lstm_params_before"] == vib.lstm_param_count(model.feature_dim, opts["hidden_size"], opts.get("num_layers", 1))

    # gated and dense artefacts both rebuild from their metadata with identical outputs
    save_model(tmp_path / "gated.safetensors", model, meta)
    save_model(tmp_path / "dense.safetensors", dense, dmeta)
    g2, _ = load_model(tmp_path / "gated.safetensors")
    d2, m2 = load_model(tmp_path / "dense.safetensors")
    assert vib.gated(g2) and not vib.gated(d2)
    with torch.no_grad():
        assert torch.equal(g2(x), ref)
        assert torch.equal(d2(x), out)
    assert sum(p.numel() for p in d2.parameters()) == info["params_after"]


@pytest.mark.parametrize(("arch", "opts"), _cnn_ports())
def test_cnn_port_is_exact_across_channel_couplings(arch: str, opts: dict) -> None:
    x = torch.randn(2, 3, 8, 32, 32)
    for seed in range(2):
        model, meta = _gated(arch, seed=seed, opts=opts)
        with torch.no_grad():
            ref = model(x)
        dense, _, info = vib.port_vib(model, meta)
        with torch.no_grad():
            assert (dense(x) - ref).abs().max() <= 1e-4, (arch, seed)
        removed = sum(b - a for _, b, a, _ in info["channels"])
        assert removed > 0 and info["params_after"] < info["params_before"]
        # nothing a gate kept is removed: each conv keeps at least its kept channels
        assert all(a >= k for _, _, a, k in info["channels"] if k is not None)


def test_paper_lstm_count() -> None:
    # 4H(H+L) + 8H per layer
    assert vib.lstm_param_count(2048, 256) == 4 * 256 * (256 + 2048) + 8 * 256
    assert vib.lstm_param_count(10, 4, num_layers=2) == (4 * 4 * 14 + 32) + (4 * 4 * 8 + 32)


def test_wrapper_refuses_double_gating_and_bad_models() -> None:
    from vcc.core.errors import UsageError

    model, _ = _gated("lstm_e2e", randomise=False)
    with pytest.raises(UsageError):
        vib.vib_wrapper(model)
    with pytest.raises(UsageError):
        vib.vib_wrapper(nn.Sequential(nn.Flatten(), nn.Linear(3, 2)))
    with pytest.raises(UsageError):
        vib.port_vib(build_model("r3d_tiny", num_classes=2), ModelMeta(arch="r3d_tiny", num_classes=2))


# ---------------------------------------------------------------- training and the CLI (tiny_synthetic)


@pytest.fixture(scope="module")
def tiny_lstm_model(session_ws, tiny_synthetic):
    """An untrained cnn_lstm (tiny backbone) artefact for tiny_synthetic: VIB from scratch."""
    from vcc.core.data.manifest import load_dataset

    info = load_dataset(tiny_synthetic)
    torch.manual_seed(0)
    opts = {"backbone": "tiny", "hidden_size": 16}
    model = build_model("cnn_lstm", num_classes=len(info.classes), **opts)
    meta = ModelMeta(arch="cnn_lstm", num_classes=len(info.classes), options=opts, classes=list(info.classes), input=input_spec(8, 32))
    path = session_ws.root / "tiny_cnn_lstm.safetensors"
    save_model(path, model, meta)
    return path


def _cfg(**kw):
    from vcc.core.training import TrainConfig

    base = {"frames": 8, "size": 32, "epochs": 1, "batch_size": 6, "workers": 0, "device": "cpu", "optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4}
    return TrainConfig(**{**base, **kw})


def test_prune_vib_trains_gates_then_finetune_freezes_them(tiny_lstm_model, tiny_synthetic, tmp_path) -> None:
    res = vib.prune_vib(tiny_lstm_model, tiny_synthetic, _cfg(), tmp_path / "vib", kml=1.0, ib_lr=0.2, kl_factor=1.0,
                        mask_threshold=0.0, kml_layer={"lstm.l0.*": 2.0}, finetune=False, freeze_backbone=True, progress=None)
    for key in ("model", "kept", "table", "columns", "lstm_params_before", "lstm_params_after", "compression", "history"):
        assert key in res
    assert res["lstm_params_before"] == vib.lstm_param_count(512, 16) and len(res["history"]) == 1
    assert set(res["kept"]) >= {"lstm.input", "lstm.l0.i", "lstm.l0.f", "lstm.l0.g", "lstm.l0.o", "lstm.l0.hidden"}
    assert res["columns"] == ["layer", "kept", "total", "kept %"] and len(res["table"]) == len(res["kept"])
    model, meta = load_model(res["model"])
    assert vib.gated(model) and meta.options["freeze_backbone"] is True
    opts = [w for w in meta.wrappers if w["name"] == "vib"][0]["options"]
    assert opts["kml_layer"] == {"lstm.l0.*": 2.0} and opts["hard"] is True
    gs = vib.gates(model)
    assert gs["lstm.l0.i"].kml == 2.0 and gs["lstm.input"].kml == 1.0
    # the KL term (with its own gate lr) pushed every gate towards pruning: log alpha rose from ~ -9
    assert all(float(g.log_alpha().mean()) > -8.9 for g in gs.values())
    # the frozen backbone did not move
    init, _ = load_model(tiny_lstm_model)
    assert all(torch.equal(a, b) for a, b in zip(init.backbone.state_dict().values(), model.backbone.state_dict().values(), strict=True))

    ft = vib.prune_vib(res["model"], tiny_synthetic, _cfg(), tmp_path / "ft", kml=1.0, ib_lr=0.2, kl_factor=1.0,
                       mask_threshold=0.0, kml_layer={}, finetune=True, progress=None)
    m2, _ = load_model(ft["model"])
    for name, g in vib.gates(m2).items():  # masks frozen: gate parameters untouched
        assert torch.equal(g.mu, gs[name].mu) and torch.equal(g.logD, gs[name].logD)
    assert not torch.equal(m2.fc.weight, model.fc.weight)  # the weights trained
    assert ft["kept"] == res["kept"]


def test_prune_vib_bad_input(tiny_lstm_model, tiny_model, tiny_synthetic, tmp_path) -> None:
    from vcc.core.errors import UsageError

    with pytest.raises(UsageError, match="kml-layer"):
        vib.prune_vib(tiny_lstm_model, tiny_synthetic, _cfg(), tmp_path / "a", kml_layer={"nope.*": 1.0}, progress=None)
    with pytest.raises(UsageError, match="finetune"):
        vib.prune_vib(tiny_lstm_model, tiny_synthetic, _cfg(), tmp_path / "b", finetune=True, progress=None)
    with pytest.raises(UsageError, match="backbone"):
        vib.prune_vib(tiny_model, tiny_synthetic, _cfg(), tmp_path / "c", freeze_backbone=True, progress=None)


def test_cli_prune_vib_then_port(tiny_lstm_model, tiny_synthetic, tmp_path) -> None:
    import json

    from tests.conftest import run_vcc

    ws = str(tmp_path / "ws")
    proc = run_vcc("-w", ws, "prune", str(tiny_lstm_model), "--method", "vib", "--data", str(tiny_synthetic), "--epochs", "1",
                   "--kml", "1", "--kml-layer", "lstm.input=0.5", "--workers", "0", "--name", "v", "--format", "json", check=True)
    doc = json.loads(proc.stdout)
    assert doc["run"] == "v" and doc["method"] == "vib" and doc["lstm_params_before"] == vib.lstm_param_count(512, 16)
    assert doc["kept"]["lstm.l0.hidden"][1] == 16 and len(doc["history"]) == 1
    model, meta = load_model(doc["model"])
    assert vib.gated(model) and vib.gates(model)["lstm.input"].kml == 0.5
    proc = run_vcc("-w", ws, "port", "v", "--name", "d", "--format", "json", check=True)
    port = json.loads(proc.stdout)
    assert port["kind"] == "vib" and port["max_abs_diff"] <= 1e-4
    # prune's before -> after table: the original model -> its dense port, the same figures `vcc port` gives
    assert doc["before"]["macs"] >= doc["after"]["macs"] == port["after"]["macs"]
    assert doc["after"]["params"] == port["after"]["params"] and 0 <= doc["after"]["video_top1"] <= 1
    dense, dmeta = load_model(port["model"])
    assert not vib.gated(dense) and "vib" not in [w["name"] for w in dmeta.wrappers]
    # the CSV (no titles) says which "after" it is, and what each compression figure measures
    csv_text = run_vcc("-w", ws, "prune", str(tiny_lstm_model), "--method", "vib", "--data", str(tiny_synthetic), "--epochs", "1",
                       "--workers", "0", "--name", "v2", "--format", "csv", check=True).stdout
    assert csv_text.splitlines()[0] == "metric,before,after (dense port),after (dense port)/before"
    assert "compression x (the whole model: dense port params)," in csv_text and "\nmodel_compression," not in csv_text


def test_cli_prune_vib_bad_layer_name(tiny_lstm_model, tiny_synthetic, tmp_path) -> None:
    from typer.testing import CliRunner

    from vcc.cli import app

    ws = tmp_path / "ws"
    res = CliRunner().invoke(app, ["-w", str(ws), "prune", str(tiny_lstm_model), "--method", "vib", "--data", str(tiny_synthetic),
                                   "--kml-layer", "bogus=1", "--name", "bad"])
    text = res.output + (getattr(res, "stderr", "") or "")
    assert res.exit_code == 2 and "--kml-layer: no gated layer matches bogus" in text and "Traceback" not in text
    assert not (ws / "runs" / "bad").exists()


def test_prune_vib_on_3d_cnn_channels(tiny_model, tiny_synthetic, tmp_path) -> None:
    res = vib.prune_vib(tiny_model, tiny_synthetic, _cfg(max_batches=2), tmp_path / "r3d", kl_factor=1.0, ib_lr=0.5, progress=None)
    assert "layer1.0.conv1" in res["kept"] and "fc" not in res["kept"]
    assert res["channels_before"] == sum(t for _, t in res["kept"].values())
    model, meta = load_model(res["model"])
    assert vib.gated(model)
    # one gate per output channel of every conv
    assert {n: g.n for n, g in vib.gates(model).items()}["layer4.0.conv2"] == 128
    dense, _, info = vib.port_vib(model, meta)
    x = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        assert (dense(x) - model(x)).abs().max() <= 1e-4


def test_vib_warnings_name_nothing_pruned_and_emptied_layers() -> None:
    from vcc.core.compress.vib import vib_warnings

    common = {"finetune": False, "kml": 1.0, "kl_factor": 2e-3, "kml_layer": {}, "epochs": 2}
    assert vib_warnings({"lstm.l0.hidden": (100, 128)}, **common) == []
    (w,) = vib_warnings({"lstm.l0.input": (64, 64), "lstm.l0.hidden": (128, 128)}, **common)
    assert w.startswith("VIB pruned nothing in 2 epochs")
    (w,) = vib_warnings({"lstm.l0.input": (10, 64), "lstm.l0.hidden": (0, 128)}, **common)
    assert "every unit of lstm.l0.hidden" in w and "--kml-layer lstm.l0.hidden=K" in w
    (w,) = vib_warnings({"lstm.l0.hidden": (128, 128)}, **{**common, "kml": 0.0})
    assert w.startswith("--kml 0")
    assert vib_warnings({"lstm.l0.hidden": (0, 128)}, **{**common, "finetune": True}) == []
