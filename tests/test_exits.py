"""Early exits: the wrapper, fair MACs, the early-stop runtime, progressive KD training."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vcc.core.artefact import ModelMeta, input_spec, load_model, read_doc, save_model
from vcc.core.errors import UsageError
from vcc.core.exits import (
    MultiExit,
    attach_exits,
    average_macs,
    evaluate_early_exit,
    exit_criterion,
    exit_macs,
    is_multi_exit,
    kd_loss,
    teacher_schedule,
    train_exits,
)
from vcc.core.models import build_model


class Toy(nn.Module):
    """Two 1x1x1 convs and a linear: MACs are easy to count by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.s1 = nn.Conv3d(3, 4, 1, bias=False)
        self.s2 = nn.Conv3d(4, 8, 1, bias=False)
        self.fc = nn.Linear(8, 5)

    def stages(self) -> list[str]:
        return ["s1", "s2"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.s2(self.s1(x)).mean((2, 3, 4)))


def _tiny(n: int = 4) -> tuple[MultiExit, ModelMeta]:
    torch.manual_seed(0)
    meta = ModelMeta(arch="r3d_tiny", num_classes=n, classes=[f"c{i}" for i in range(n)], input=input_spec(8, 32))
    model, meta = attach_exits(build_model("r3d_tiny", n), meta)
    return model.eval(), meta


def test_average_macs_charges_every_sample_what_it_ran() -> None:
    # Exits cost 10, 30, 100 cumulative MACs; samples leave at exits 1, 1, 2, 3.
    # Fair: (10 + 10 + 30 + 100) / 4, whatever the predictions were.
    assert average_macs([0, 0, 1, 2], [10, 30, 100]) == pytest.approx(37.5)
    assert average_macs(torch.tensor([2, 2]), [10, 30, 100]) == 100


def test_exit_macs_hand_computed() -> None:
    meta = ModelMeta(arch="toy", num_classes=5, input=input_spec(2, 4))
    model, meta = attach_exits(Toy(), meta)
    rows = exit_macs(model, meta)
    # input (3, 2, 4, 4): 32 positions. s1: 3*4*32 = 384. IC1: linear 4*5 = 20 (pooling is adds).
    # s2: 4*8*32 = 1024, fc: 8*5 = 40. The last exit also pays IC1 it passed: 384+1024+40+20.
    assert rows == [{"exit": 1, "stage": "s1", "macs": 404}, {"exit": 2, "stage": "final", "macs": 1468}]


def test_exit_macs_and_backbone_counts_the_backbone_once() -> None:
    from vcc.core.exits import exit_macs_and_backbone

    model, meta = attach_exits(Toy(), ModelMeta(arch="toy", num_classes=5, input=input_spec(2, 4)))
    rows, backbone = exit_macs_and_backbone(model, meta)
    assert rows == exit_macs(model, meta) and backbone == 384 + 1024 + 40  # the backbone without IC1's 20


def test_exit_macs_r3d_tiny_increase_and_last_is_whole_model() -> None:
    from vcc.core.macs import count_macs

    model, meta = _tiny()
    rows = exit_macs(model, meta)
    assert [r["stage"] for r in rows] == ["layer1", "layer2", "layer3", "final"]
    macs = [r["macs"] for r in rows]
    assert macs == sorted(macs) and len(set(macs)) == 4
    heads = sum(h.fc.in_features * h.fc.out_features for h in model.heads)
    assert macs[-1] == count_macs(model.backbone, (3, 8, 32, 32)).macs + heads


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_r3d_exit_friendly_options_keep_frames_and_spread_macs(shortcut: str) -> None:
    """conv1_s_size=3, t_stride=1: every frame reaches layer4 and the first exit is cheap."""
    torch.manual_seed(0)
    model = build_model("r3d_tiny", 4, conv1_s_size=3, t_stride=1, shortcut=shortcut).eval()
    assert model.conv1.kernel_size == (3, 3, 3)
    seen: dict[str, tuple[int, ...]] = {}
    def record(_m: nn.Module, _i: object, out: torch.Tensor, name: str) -> None:
        seen[name] = tuple(out.shape)

    for n in ("layer1", "layer4"):
        getattr(model, n).register_forward_hook(lambda m, i, o, n=n: record(m, i, o, n))
    with torch.no_grad():
        assert model(torch.randn(2, 3, 8, 32, 32)).shape == (2, 4)
    assert seen == {"layer1": (2, 16, 8, 8, 8), "layer4": (2, 128, 8, 1, 1)}
    meta = ModelMeta(arch="r3d_tiny", num_classes=4, options={"conv1_s_size": 3, "t_stride": 1}, input=input_spec(8, 32))
    rows = exit_macs(*attach_exits(model, meta))
    macs = [r["macs"] for r in rows]
    assert macs == sorted(macs) and len(set(macs)) == 4
    fractions = [m / macs[-1] for m in macs]
    assert fractions[0] < 0.45 and fractions[1] < 0.65  # stock r3d_tiny: 0.87 at exit 1
    default = exit_macs(*_tiny())
    assert default[0]["macs"] / default[-1]["macs"] > 0.8  # r3d_tiny's defaults are unchanged


def test_r3d_option_errors() -> None:
    with pytest.raises(UsageError, match="t_stride"):
        build_model("r3d_tiny", 3, t_stride=3)
    with pytest.raises(UsageError, match="conv1_s_size"):
        build_model("resnet3d_10", 3, conv1_s_size=4)


def test_wrapper_outputs_and_round_trip(tmp_path: Path) -> None:
    model, meta = _tiny()
    assert is_multi_exit(meta) and meta.wrappers[-1]["options"]["stages"] == ["layer1", "layer2", "layer3"]
    x = torch.randn(2, 3, 8, 32, 32)
    outs = model.forward_exits(x)
    assert len(outs) == 4 and all(o.shape == (2, 4) for o in outs)
    assert torch.equal(outs[-1], model(x))  # forward() is the backbone's classifier
    path = save_model(tmp_path / "m.safetensors", model, meta)
    loaded, meta2 = load_model(path)
    assert isinstance(loaded, MultiExit) and is_multi_exit(meta2)
    assert read_doc(path)["wrappers"] == meta.wrappers
    for a, b in zip(outs, loaded.forward_exits(x), strict=True):
        assert torch.equal(a, b)
    # Hooks follow a deep copy (they are objects bound to their owner, not closures).
    clone = copy.deepcopy(loaded)
    assert len(clone.forward_exits(x)) == 4 and loaded._buf == []


def test_explicit_stages_and_errors() -> None:
    meta = ModelMeta(arch="r3d_tiny", num_classes=3, input=input_spec(8, 32))
    model, meta2 = attach_exits(build_model("r3d_tiny", 3), meta, "layer3,layer1")
    assert model.exit_stages == ["layer1", "layer3"]  # sorted by execution order
    assert [h.fc.in_features for h in model.heads] == [16, 64]
    with pytest.raises(UsageError, match="unknown exit stage"):
        attach_exits(build_model("r3d_tiny", 3), meta, "layer9")
    with pytest.raises(UsageError, match=r"after the last stage \(layer4\) would be the final classifier again"):
        attach_exits(build_model("r3d_tiny", 3), meta, "layer4,layer1")
    with pytest.raises(UsageError, match="already has early exits"):
        attach_exits(model, meta2)
    with pytest.raises(UsageError, match="no stages"):
        attach_exits(nn.Sequential(nn.Conv3d(3, 4, 1), nn.Flatten(), nn.LazyLinear(3)), meta)


def test_runtime_really_skips_later_stages() -> None:
    model, _ = _tiny()
    calls = {n: 0 for n in ("layer1", "layer2", "layer3", "layer4", "fc")}
    for n in calls:
        getattr(model.backbone, n).register_forward_pre_hook(lambda *_a, n=n: calls.__setitem__(n, calls[n] + 1))
    x = torch.randn(1, 3, 8, 32, 32)
    logits, k = model.forward_early(x, threshold=0.0)  # any max softmax > 0: leave at exit 1
    assert k == 0 and calls == {"layer1": 1, "layer2": 0, "layer3": 0, "layer4": 0, "fc": 0}
    assert torch.allclose(logits, model.forward_exits(x)[0])
    calls.update(dict.fromkeys(calls, 0))
    logits, k = model.forward_early(x, threshold=1.1)  # nothing exceeds 1: the last exit
    assert k == 3 and all(v == 1 for v in calls.values())
    assert torch.allclose(logits, model(x))
    # Exit at the first exit above the threshold: pick one between exit 2's and exit 1's confidence.
    conf = [F.softmax(o, 1).amax().item() for o in model.forward_exits(x)]
    if conf[1] > conf[0]:
        _, k = model.forward_early(x, threshold=(conf[0] + conf[1]) / 2)
        assert k == 1


def test_teacher_schedule() -> None:
    assert teacher_schedule("progressive", 6, 3) == [0, 0, 1, 1, 2, 2]
    assert teacher_schedule("anti-progressive", 6, 3) == [2, 2, 1, 1, 0, 0]
    assert teacher_schedule("progressive", 4, 3) == [0, 1, 2, 2]  # spare epochs go to the strongest
    assert teacher_schedule("progressive", 5, 2, [1, 4]) == [0, 1, 1, 1, 1]
    assert teacher_schedule("anti-progressive", 5, 2, [1, 4]) == [1, 1, 1, 1, 0]
    assert teacher_schedule("ce", 3, 2) == [-1, -1, -1]
    with pytest.raises(UsageError, match="sum to"):
        teacher_schedule("progressive", 5, 2, [1, 1])
    with pytest.raises(UsageError, match="2 values"):
        teacher_schedule("progressive", 5, 2, [5])
    with pytest.raises(UsageError, match="--kd"):
        teacher_schedule("curriculum", 5, 2)


def test_progressive_criterion_uses_later_exits_then_final() -> None:
    model, meta = _tiny()
    x, y = torch.randn(2, 3, 8, 32, 32), torch.tensor([0, 1])
    outs = model.forward_exits(x)
    schedule = teacher_schedule("progressive", 3, 3)
    crit = exit_criterion("progressive", schedule, temperature=2.0, alpha=0.5)
    for epoch, p in enumerate(schedule):
        loss, _ = crit(model, x, y, epoch)
        want = sum(0.5 * kd_loss(outs[i], outs[min(i + 1 + p, 3)], 2.0) + 0.5 * F.cross_entropy(outs[i], y) for i in range(3)) / 3
        assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    ce_loss, _ = exit_criterion("ce", [-1])(model, x, y, 0)
    assert ce_loss.item() == pytest.approx((sum(F.cross_entropy(o, y) for o in outs[:3]) / 3).item(), rel=1e-5)


def test_train_exits_freezes_backbone_and_saves_one_artefact(tmp_path: Path, tiny_synthetic: Path, tiny_model: Path) -> None:
    from vcc.core.training import TrainConfig

    base, _ = load_model(tiny_model)
    cfg = TrainConfig(epochs=2, batch_size=4, workers=0, device="cpu", lr=0.05, warmup=0, max_batches=2)
    res = train_exits(tiny_model, tiny_synthetic, cfg, tmp_path / "run", kd="progressive", teachers=[tiny_model], kd_epochs=[1, 1])
    model, meta = load_model(res.model_path)
    assert isinstance(model, MultiExit) and is_multi_exit(meta)
    assert meta.extra["exits"]["schedule"] == ["tiny_model", "final"]
    assert meta.provenance["parent_sha256"]
    for k, v in base.state_dict().items():  # frozen: weights and BN statistics untouched
        assert torch.equal(v, model.backbone.state_dict()[k]), k
    fresh, _ = _tiny()
    assert not torch.equal(model.heads[0].fc.weight, fresh.heads[0].fc.weight)
    assert len(res.history) == 2 and len(res.history[-1]["val_exit_top1"]) == 4
    assert [r["kd_teacher"] for r in res.history] == ["tiny_model", "final"]


def test_evaluate_early_exit_thresholds(tiny_synthetic: Path) -> None:
    model, meta = _tiny()
    from vcc.core.data.manifest import load_dataset

    meta.classes = list(load_dataset(tiny_synthetic).classes)
    cum = [r["macs"] for r in exit_macs(model, meta)]
    first = evaluate_early_exit(model, meta, tiny_synthetic, threshold=0.0)
    last = evaluate_early_exit(model, meta, tiny_synthetic, threshold=1.1)
    assert [e["share"] for e in first["exits"]] == [1.0, 0.0, 0.0, 0.0]
    assert [e["share"] for e in last["exits"]] == [0.0, 0.0, 0.0, 1.0]
    assert first["macs"] == cum[0] and last["macs"] == cum[-1] == last["macs_full"]
    assert first["videos"] == last["videos"] > 0 and 0.0 <= first["accuracy"] <= 1.0
    assert first["latency_ms"] > 0 and last["latency_ms"] > 0
    with pytest.raises(UsageError):
        evaluate_early_exit(build_model("r3d_tiny", 4), meta, tiny_synthetic, threshold=0.5)


def test_train_exits_refuses_a_clip_the_backbone_cannot_take(ws, tiny_synthetic: Path) -> None:
    """`vcc train --exits` with --frames/--size that s3d's pools shrink to nothing: one line, exit 2, no run left."""
    from typer.testing import CliRunner

    from vcc.cli import app
    from vcc.core.data.manifest import load_dataset

    classes = list(load_dataset(tiny_synthetic).classes)
    path = ws.root / "s3d.safetensors"
    ws.root.mkdir(parents=True, exist_ok=True)
    save_model(path, build_model("s3d", len(classes)), ModelMeta(arch="s3d", num_classes=len(classes), classes=classes, input=input_spec(16, 112)))
    res = CliRunner().invoke(app, ["-w", str(ws.root), "train", "--init", str(path), "--data", str(tiny_synthetic), "--exits", "auto",
                                   "--kd", "ce", "--epochs", "1", "--frames", "4", "--size", "16", "--name", "never"])
    assert res.exit_code == 2, res.output
    assert "s3d cannot take 4-frame 16x16 clips" in res.output and "Traceback" not in res.output
    assert not (ws.runs_dir / "never").exists()
