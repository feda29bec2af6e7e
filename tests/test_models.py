"""The model zoo: every arch builds, runs on a small clip, round-trips through an artefact;
torchvision parity, published parameter counts, and the structure other modules rely on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from vcc.core.artefact import ModelMeta, input_spec, load_model, save_model
from vcc.core.errors import UsageError
from vcc.core.macs import count_params
from vcc.core.models import build_model, get_spec, list_models
from vcc.core.models.registry import arch_options

ARCHS = list_models()
# Big enough that forward + round trip belong in the slow run; they still build in the default run.
HEAVY = {"resnet3d_34", "resnet3d_50", "resnet3d_101", "ir_csn_101", "ip_csn_101", "ir_csn_152", "ip_csn_152"}
# Same code as a smaller sibling that runs by default (ir/ip_csn_26): forward + round trip only in the slow run.
SLOW_FORWARD = HEAVY | {"ir_csn_50", "ip_csn_50"}
# Small clip (frames, size) and options per arch for the forward / round-trip test.
SMALL = {"lstm_e2e": (8, 32), "s3d": (8, 32), "c3d": (8, 32)}
SMALL_OPTIONS = {"c3d": {"fc_dim": 256}, "cnn_lstm": {"backbone": "tiny"}}
SEQUENCE_FAMILIES = {"cnn_lstm", "lstm_e2e"}


def _meta(arch: str, n: int, options: dict | None = None, frames: int = 8, size: int = 32) -> ModelMeta:
    return ModelMeta(arch=arch, num_classes=n, options=dict(options or {}), classes=[f"c{i}" for i in range(n)], input=input_spec(frames, size))


def test_zoo_lists_the_issue_archs() -> None:
    expected = {"r3d_18", "mc3_18", "r2plus1d_18", "s3d", "mobilenetv2_3d", "c3d", "r3d_tiny", "cnn_lstm", "lstm_e2e"}
    expected |= {f"resnet3d_{d}" for d in (10, 18, 34, 50, 101)}
    expected |= {f"{k}_csn_{d}" for k in ("ir", "ip") for d in (26, 50, 101)}
    assert expected <= set(ARCHS)
    for arch in ARCHS:
        spec = get_spec(arch)
        assert spec.description, arch
        assert spec.frames >= 8 and spec.size >= 32, arch


@pytest.mark.parametrize(
    "arch",
    [pytest.param(a, marks=pytest.mark.slow) if a in SLOW_FORWARD else a for a in ARCHS],
)
def test_forward_stages_and_round_trip(arch: str, tmp_path: Path) -> None:
    frames, size = SMALL.get(arch, (8, 32))
    options = SMALL_OPTIONS.get(arch, {})
    torch.manual_seed(0)
    model = build_model(arch, 3, **options).eval()
    x = torch.randn(1, 3, frames, size, size)

    seen: list[tuple[str, tuple[int, ...]]] = []
    if get_spec(arch).family not in SEQUENCE_FAMILIES:
        stages = model.stages()
        modules = dict(model.named_modules())
        assert len(stages) >= 2 and all(s in modules for s in stages), stages
        for s in stages:
            modules[s].register_forward_hook(lambda _m, _i, out, s=s: seen.append((s, tuple(out.shape))))
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 3) and y.dtype == torch.float32 and torch.isfinite(y).all()
    if seen:
        # Stage outputs arrive in the listed order, once each, as (N, C, T, H, W) feature maps.
        assert [s for s, _ in seen] == model.stages()
        assert all(len(shape) == 5 and shape[0] == 1 for _, shape in seen)

    path = save_model(tmp_path / "m.safetensors", model, _meta(arch, 3, options, frames, size))
    loaded, meta = load_model(path)
    assert meta.arch == arch and meta.options == options
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert torch.equal(loaded(x), y)


@pytest.mark.parametrize("arch", sorted(HEAVY))
def test_heavy_archs_build(arch: str) -> None:
    model = build_model(arch, 5)
    modules = dict(model.named_modules())
    assert all(s in modules for s in model.stages())
    assert model.fc.out_features == 5


# Published parameter counts (torchvision's model docs; Köpüklü et al. Table for Kinetics-600;
# C3D with UCF101's 101 classes), counted on the meta device (no memory, no init cost).
PUBLISHED = [
    ("r3d_18", {}, 400, 33_371_472),
    ("mc3_18", {}, 400, 11_695_440),
    ("r2plus1d_18", {}, 400, 31_505_325),
    ("s3d", {}, 400, 8_320_048),
    ("mobilenetv2_3d", {}, 600, 3.12e6),
    ("c3d", {}, 101, 78.41e6),
    ("ir_csn_152", {}, 400, 29.7e6),
    ("ip_csn_152", {}, 400, 33.0e6),
]


@pytest.mark.parametrize(("arch", "options", "classes", "params"), PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_published_parameter_counts(arch: str, options: dict, classes: int, params: float) -> None:
    with torch.device("meta"):
        model = build_model(arch, classes, **options)
    n = count_params(model)
    if isinstance(params, int):
        assert n == params
    else:
        assert abs(n - params) / params < 0.005, n


@pytest.mark.parametrize("arch", ["r3d_18", "mc3_18", "r2plus1d_18"])
def test_torchvision_resnets_match_torchvision(arch: str) -> None:
    """Same state-dict keys and shapes, so torchvision weights load; same outputs with them."""
    import torchvision

    torch.manual_seed(0)
    ref = getattr(torchvision.models.video, arch)(weights=None, num_classes=4).eval()
    ours = build_model(arch, 4).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-6)


def test_s3d_matches_torchvision_and_keeps_num_classes() -> None:
    import torchvision

    ours = build_model("s3d", 7).eval()
    ref = torchvision.models.video.s3d(weights=None, num_classes=7)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    head = ours.classifier[-1]
    assert isinstance(head, nn.Conv3d) and head.out_channels == 7
    with torch.no_grad():
        assert ours(torch.randn(1, 3, 8, 32, 32)).shape == (1, 7)
    # At its natural 16x224x224 the feature map is 2x7x7, where the pool is torchvision's exactly.
    with torch.device("meta"):
        meta_model = build_model("s3d", 7)
        feats = meta_model.features(torch.empty(1, 3, 16, 224, 224))
    assert tuple(feats.shape) == (1, 1024, 2, 7, 7)
    assert ours.avgpool.kernel_size == ref.avgpool.kernel_size == (2, 7, 7)


def test_torchvision_conv3d_subclasses_are_present() -> None:
    """Counters that dispatch on exact module type miss these: pin that they are there."""
    from torchvision.models.video.resnet import Conv2Plus1D, Conv3DNoTemporal, Conv3DSimple

    with torch.device("meta"):
        r3d, mc3, r21d = (build_model(a, 4) for a in ("r3d_18", "mc3_18", "r2plus1d_18"))
    assert sum(isinstance(m, Conv3DSimple) for m in r3d.modules()) == 16
    assert sum(isinstance(m, Conv3DNoTemporal) for m in mc3.modules()) == 12
    assert sum(isinstance(m, Conv2Plus1D) for m in r21d.modules()) == 16
    for model in (r3d, mc3):
        exact = sum(type(m) is nn.Conv3d for m in model.modules())
        assert exact < sum(isinstance(m, nn.Conv3d) for m in model.modules())


def test_c3d_keeps_the_published_shapes_at_16x112() -> None:
    with torch.device("meta"):
        model = build_model("c3d", 101)
        seen: dict[str, tuple[int, ...]] = {}
        for name in ("pool5", "avgpool"):
            getattr(model, name).register_forward_hook(lambda _m, _i, out, n=name: seen.__setitem__(n, tuple(out.shape)))
        model(torch.empty(1, 3, 16, 112, 112))
    assert seen == {"pool5": (1, 512, 1, 4, 4), "avgpool": (1, 512, 1, 4, 4)}
    assert model.fc6.in_features == 8192


def test_csn_middle_convs_are_channel_separated() -> None:
    with torch.device("meta"):
        ir, ip = build_model("ir_csn_26", 4), build_model("ip_csn_26", 4)
    ir_mid = ir.layer2[0].conv2[0]
    assert isinstance(ir_mid, nn.Conv3d) and ir_mid.groups == ir_mid.in_channels == 128 and ir_mid.kernel_size == (3, 3, 3)
    ip_mid = ip.layer2[0].conv2[0]
    assert ip_mid[0].kernel_size == (1, 1, 1) and ip_mid[0].groups == 1
    assert ip_mid[2].groups == ip_mid[2].in_channels == 128 and ip_mid[2].stride == (2, 2, 2)
    assert [len(getattr(ir, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    assert ir.fc.in_features == 2048


def test_mobilenetv2_width_mult() -> None:
    with torch.device("meta"):
        full, half = build_model("mobilenetv2_3d", 10), build_model("mobilenetv2_3d", 10, width_mult=0.5)
    assert full.features[0][0].out_channels == 32 and half.features[0][0].out_channels == 16
    assert half.features[17].conv[-2].out_channels == 160
    assert count_params(half) < count_params(full)
    model = build_model("mobilenetv2_3d", 10, width_mult=0.25).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 8, 32, 32)).shape == (1, 10)


# ---------------------------------------------------------------- sequence models (VIB contract)


def _check_sequence_contract(model: nn.Module, x: torch.Tensor, classes: int) -> torch.Tensor:
    assert isinstance(model.feature_dim, int)
    assert type(model.lstm) is nn.LSTM and model.lstm.batch_first
    assert model.lstm.input_size == model.feature_dim
    assert isinstance(model.fc, nn.Linear) and model.fc.in_features == model.lstm.hidden_size and model.fc.out_features == classes
    seq = model.features(x)
    n, _, t = x.shape[:3]
    assert seq.shape == (n, t, model.feature_dim)
    logits = model.head(seq)
    assert logits.shape == (n, classes)
    assert torch.equal(model(x), logits)
    # head = fc on the LSTM's last time step
    out, _ = model.lstm(seq)
    assert torch.equal(logits, model.fc(out[:, -1]))
    return seq


@pytest.mark.parametrize(
    ("backbone", "size", "dim"),
    [("tiny", 32, 512), ("resnet18", 32, 512), ("mobilenet_v2", 32, 1280), ("efficientnet_b0", 32, 1280), ("inception_v3", 75, 2048)],
)
def test_cnn_lstm_backbones(backbone: str, size: int, dim: int) -> None:
    model = build_model("cnn_lstm", 6, backbone=backbone, hidden_size=16).eval()
    assert model.feature_dim == dim
    with torch.no_grad():
        _check_sequence_contract(model, torch.randn(1, 3, 2, size, size), 6)
    if backbone == "inception_v3":
        with pytest.raises(UsageError, match="at least 75x75"):
            model.features(torch.randn(1, 3, 2, 64, 64))


def test_cnn_lstm_defaults_are_cpu_sized() -> None:
    model = build_model("cnn_lstm", 10)
    assert model.backbone_name == "resnet18" and model.lstm.hidden_size == 128 and model.lstm.num_layers == 1
    assert count_params(model) < 12e6


def test_cnn_lstm_frozen_backbone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("cnn_lstm", 4, backbone="tiny", hidden_size=8, freeze_backbone=True)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.lstm.parameters()) and model.fc.weight.requires_grad
    model.train()
    assert model.training and model.lstm.training and not model.backbone.training
    bn = next(m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    x = torch.randn(2, 3, 4, 32, 32)
    model(x).sum().backward()
    assert torch.equal(bn.running_mean, before)  # eval-mode BN: statistics untouched
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.fc.weight.grad is not None
    path = save_model(tmp_path / "f.safetensors", model, _meta("cnn_lstm", 4, {"backbone": "tiny", "hidden_size": 8, "freeze_backbone": True}))
    loaded, _ = load_model(path)
    loaded.train()
    assert not any(p.requires_grad for p in loaded.backbone.parameters()) and not loaded.backbone.training


def test_lstm_e2e_flattens_small_grey_frames() -> None:
    model = build_model("lstm_e2e", 5, hidden_size=12).eval()
    assert model.feature_dim == 16 * 16
    x = torch.rand(2, 3, 4, 32, 32)
    with torch.no_grad():
        seq = _check_sequence_contract(model, x, 5)
    grey = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]  # (N, T, 32, 32)
    expect = grey.reshape(2, 4, 16, 2, 16, 2).mean(dim=(3, 5)).reshape(2, 4, 256)  # 2x2 area average
    torch.testing.assert_close(seq, expect)
    colour = build_model("lstm_e2e", 5, grayscale=False, frame_size=8)
    assert colour.feature_dim == 3 * 8 * 8 and colour.features(x).shape == (2, 4, 192)


# ---------------------------------------------------------------- bad input


def test_unknown_arch_lists_known_archs() -> None:
    with pytest.raises(UsageError) as err:
        build_model("resnet3d_7", 4)
    msg = str(err.value)
    assert "unknown arch 'resnet3d_7'" in msg and "r3d_18" in msg and "cnn_lstm" in msg and "\n" not in msg
    assert err.value.exit_code == 2


@pytest.mark.parametrize(
    ("arch", "options", "needle"),
    [
        ("cnn_lstm", {"backbone": "vgg16"}, "unknown cnn_lstm backbone 'vgg16'"),
        ("r3d_18", {"width": 2}, "arch 'r3d_18' has no option width; its options (defaults): "),
        ("r3d_tiny", {"foo": 1, "bar": 2}, "arch 'r3d_tiny' has no option bar, foo; its options (defaults): shortcut='B', base_width=16"),
        ("s3d", {"dropout": 1.5}, "dropout must be in [0, 1)"),
        ("mobilenetv2_3d", {"width_mult": 0}, "width_mult must be > 0"),
    ],
)
def test_bad_options_are_usage_errors(arch: str, options: dict, needle: str) -> None:
    with pytest.raises(UsageError, match=None) as err, torch.device("meta"):
        build_model(arch, 4, **options)
    assert needle in str(err.value)


@pytest.mark.parametrize("arch", list_models())
def test_every_arch_lists_its_options(arch: str) -> None:
    """An unknown -o KEY names the arch's real options: every builder's signature says them."""
    opts = arch_options(arch)
    assert opts is not None and "num_classes" not in opts
    with torch.device("meta"):
        build_model(arch, 3, **{k: v for k, v in opts.items() if v is not None})  # the listed defaults are accepted


def test_string_options_take_the_builders_types() -> None:
    """Options typed on a command line arrive as strings; "false" must not become True."""
    with torch.device("meta"):
        model = build_model("cnn_lstm", 3, backbone="tiny", hidden_size="24", freeze_backbone="false", dropout="0.25")
        r3d = build_model("resnet3d_18", 3, base_width="8", shortcut="B")
    assert model.lstm.hidden_size == 24 and model.freeze_backbone is False and model.dropout.p == 0.25
    assert r3d.layer1[0].conv1.out_channels == 8 and r3d.fc.in_features == 64
    with pytest.raises(UsageError, match="freeze_backbone='maybe' is not a bool"):
        build_model("cnn_lstm", 3, freeze_backbone="maybe")
    with pytest.raises(UsageError, match="shortcut must be 'A' or 'B'"):
        build_model("r3d_tiny", 3, shortcut="C")


def test_cnn_lstm_motion_feeds_feature_differences(tmp_path) -> None:
    """motion=true: T-1 LSTM steps of [f_t, f_t - f_(t-1)]; a still clip has zero differences."""
    torch.manual_seed(0)
    model = build_model("cnn_lstm", 4, backbone="tiny", hidden_size=8, motion="true").eval()
    assert model.feature_dim == 1024 and model.lstm.input_size == 1024
    still = torch.rand(1, 3, 1, 32, 32).repeat(1, 1, 5, 1, 1)
    seq = model.features(still)
    assert seq.shape == (1, 4, 1024)
    assert torch.equal(seq[..., 512:], torch.zeros_like(seq[..., 512:]))
    moving = torch.rand(1, 3, 5, 32, 32)
    assert model.features(moving)[..., 512:].abs().sum() > 0
    meta = ModelMeta(arch="cnn_lstm", num_classes=4, options={"backbone": "tiny", "hidden_size": 8, "motion": True}, input=input_spec(5, 32))
    path = save_model(tmp_path / "m.safetensors", model, meta)
    loaded, _ = load_model(path)
    assert torch.equal(model(moving), loaded(moving))


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in SLOW_FORWARD | SEQUENCE_FAMILIES])
def test_space_to_depth_stem_is_the_same_function(arch: str) -> None:
    """fit() runs the RGB stem space-to-depth on CUDA: outputs and every gradient must be unchanged (fp64)."""
    from vcc.core.training import space_to_depth_stem

    torch.manual_seed(0)
    # Odd size: the stem's input needs a pad column of its own. s3d at 8 frames collapses time to one
    # step and its batch norms amplify rounding ~1e10, so it gets 16.
    frames, size = {"s3d": (16, 32), "c3d": (8, 32)}.get(arch, (8, 33))
    model = build_model(arch, num_classes=3, **SMALL_OPTIONS.get(arch, {})).double().train()
    x = torch.randn(2, 3, frames, size, size, dtype=torch.float64)

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(1)  # dropout
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    ref, ref_grads = run()
    undo = space_to_depth_stem(model)
    stem = next(m for m in model.modules() if isinstance(m, nn.Conv3d) and m.in_channels == 3)
    if arch in {"c3d"}:  # stride-1 stem: nothing to do
        assert undo is None
        return
    assert undo is not None and "forward" in vars(stem)
    out, grads = run()
    assert torch.allclose(out, ref, atol=1e-10, rtol=1e-9)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads, strict=True):
        assert (g - r).norm().item() <= 1e-8 * r.norm().item() + 1e-12  # floor: gradients that are 0 up to rounding
    undo()
    assert "forward" not in vars(stem)
    assert set(model.state_dict()) == set(build_model(arch, num_classes=3, **SMALL_OPTIONS.get(arch, {})).state_dict())


def test_channels_last_convs_skips_layers_with_a_size_one_axis() -> None:
    """fit() stores conv weights channels_last_3d on CUDA, except where an activation axis has size 1.

    At 8x32x32 r3d_tiny's layer3 ends 1 frame deep and layer4 is 1x1x1: a channels_last weight there
    made inductor's compiled backward assert strides cuDNN did not produce (H100, `vcc train --compile`).
    """
    from vcc.core.training import channels_last_convs

    torch.manual_seed(0)
    model = build_model("r3d_tiny", num_classes=3).train()
    x = torch.randn(2, 3, 8, 32, 32)
    ref = model.eval()(x)
    model.train()
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm3d))
    stats = bn.running_mean.clone()
    n = channels_last_convs(model, (3, 8, 32, 32))
    assert model.training and torch.equal(bn.running_mean, stats)  # shapes found in eval mode, nothing updated
    cl = {name for name, m in model.named_modules() if isinstance(m, nn.Conv3d) and m.weight[0, 0].numel() > 1
          and m.weight.is_contiguous(memory_format=torch.channels_last_3d)}  # 1x1x1 kernels are both layouts at once
    assert cl == {"conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.conv2"}
    assert n == len(cl) + 1  # and layer2's 1x1x1 shortcut; layer3 and layer4 touch 1-deep or 1x1x1 activations
    assert torch.allclose(model.eval()(x), ref, atol=1e-5)


def test_probe_forward_leaves_the_model_as_it_was() -> None:
    """Hooks are removed and training mode restored, also when the forward fails."""
    from vcc.core.probe import probe_forward

    model = build_model("r3d_tiny", num_classes=3).train()
    widths: list[int] = []
    out = probe_forward(model, torch.randn(1, 3, 8, 32, 32), [(model.layer1, lambda _m, _i, o: widths.append(o.shape[1]))])
    assert out.shape == (1, 3) and widths == [16] and model.training
    with pytest.raises(RuntimeError):
        probe_forward(model, torch.randn(1, 5, 8, 32, 32), [(model.layer1, lambda *_: widths.append(0))])
    assert model.training and not model.layer1._forward_hooks and widths == [16]


def test_check_input_refuses_only_inputs_a_model_cannot_take() -> None:
    """The meta-device check passes every zoo arch at its design input and refuses a clip its pools empty."""
    from vcc.core.errors import UsageError
    from vcc.core.models import check_input

    check_input(build_model("s3d", 3), 16, 112, "s3d")
    check_input(build_model("r3d_tiny", 3), 8, 32, "r3d_tiny")
    with pytest.raises(UsageError, match=r"s3d cannot take 4-frame 16x16 clips \(.*\); use larger"):
        check_input(build_model("s3d", 3), 4, 16, "s3d")


@pytest.mark.parametrize("arch", list_models())
def test_check_input_passes_every_arch_at_its_design_input(arch: str) -> None:
    """No zoo arch is refused at the input it was designed for (and the check stays on meta: fast)."""
    from vcc.core.models import check_input, get_spec

    spec = get_spec(arch)
    with torch.device("meta"):
        model = build_model(arch, 5)
    check_input(model, spec.frames, spec.size, arch)
