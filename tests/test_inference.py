"""vcc.core.inference: the form models are timed in (BatchNorm folded, CPU conv kernels chosen by timing)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn

from tests.test_models import SLOW_FORWARD, SMALL_OPTIONS
from vcc.core import inference
from vcc.core.inference import (
    OneDNNConv3d,
    PackedOneDNNConv3d,
    TimeFoldedConv3d,
    fold_batchnorm,
    frozen_trace,
    inference_form,
    kernel_candidates,
    select_cpu_kernels,
)
from vcc.core.models import build_model, list_models

_BN = nn.modules.batchnorm._BatchNorm


def _with_stats(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so that a wrong fold shows in the outputs."""
    for m in model.modules():
        if isinstance(m, _BN):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("arch", [a for a in list_models() if a not in SLOW_FORWARD])
def test_inference_form_folds_every_batchnorm_and_computes_the_same(arch: str) -> None:
    # torchvision's r3d/mc3 convs are nn.Conv3d subclasses and s3d does not trace: both kept
    # their BatchNorms under torch.fx's own fuse(), so their latency included unfolded norms
    torch.manual_seed(0)
    model = _with_stats(build_model(arch, 3, **SMALL_OPTIONS.get(arch, {})))
    bns = sum(isinstance(m, _BN) for m in model.modules())
    x = torch.randn(1, 3, 8, 32, 32)
    form = inference_form(model, x, script=False)  # modules to look into (a frozen trace has none)
    assert form is not model
    assert not any(isinstance(m, _BN) for m in form.modules()), arch
    with torch.no_grad():
        assert torch.allclose(form(x), model(x), atol=1e-4, rtol=1e-4)
    assert sum(isinstance(m, _BN) for m in model.modules()) == bns  # the original is untouched
    traced = frozen_trace(fold_batchnorm(model), x)  # every arch traces and freezes to the same function
    assert isinstance(traced, torch.jit.ScriptModule), arch
    with torch.no_grad():
        assert torch.allclose(traced(x), model(x), atol=1e-4, rtol=1e-4)


def test_fold_batchnorm_in_sequentials_of_an_untraceable_model() -> None:
    class Branchy(nn.Module):  # data-dependent control flow: torch.fx cannot trace it
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU())
            self.bn = nn.BatchNorm3d(4)  # not after a conv in a Sequential: stays

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.body(x)
            return self.bn(y) if y.sum() > 0 else y

    torch.manual_seed(0)
    model = _with_stats(Branchy())
    folded = fold_batchnorm(model)
    assert isinstance(folded.body[1], nn.Identity) and isinstance(folded.bn, nn.BatchNorm3d)
    x = torch.randn(1, 3, 4, 8, 8)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)


@pytest.mark.parametrize(("stride", "padding", "dilation", "bias"), [(1, 1, 1, True), (2, 0, 1, False), ((1, 2, 2), (1, 3, 3), 1, True),
                                                                      (1, 2, 2, False)])
@pytest.mark.parametrize("kernel", [OneDNNConv3d, PackedOneDNNConv3d])
def test_onednn_conv3d_is_the_same_function(stride, padding, dilation, bias, kernel) -> None:
    torch.manual_seed(0)
    conv = nn.Conv3d(5, 7, 3, stride=stride, padding=padding, dilation=dilation, bias=bias).eval()
    fast = kernel.like(conv)
    assert fast.state_dict().keys() == conv.state_dict().keys()
    x = torch.randn(1, 5, 6, 11, 11)
    with torch.no_grad():
        assert torch.allclose(fast(x), conv(x), atol=1e-5)
        assert torch.allclose(fast(x[:, :, :4]), conv(x[:, :, :4]), atol=1e-5)  # another input shape
        fast64 = kernel.like(conv.double())  # other dtypes take the default path
        assert torch.allclose(fast64(x.double()), conv(x.double()))


def test_packed_conv3d_follows_its_weight_and_autograd() -> None:
    torch.manual_seed(0)
    conv = nn.Conv3d(4, 6, 3, padding=1)
    packed = PackedOneDNNConv3d.like(conv)
    x = torch.randn(1, 4, 3, 6, 6)
    with torch.inference_mode():
        first = packed(x)
    with torch.no_grad():
        conv.weight.mul_(2.0)  # shared parameter changed in place: the packed copy is rebuilt
    with torch.inference_mode():
        assert torch.allclose(packed(x), conv(x), atol=1e-5) and not torch.allclose(packed(x), first, atol=1e-3)
    packed(x).sum().backward()  # with autograd it takes the default path, so gradients flow
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    twin = copy.deepcopy(packed)  # its oneDNN cache is not copied, its parameters are
    with torch.inference_mode():
        assert torch.allclose(twin(x), conv(x), atol=1e-5)
    assert twin.weight is not conv.weight


@pytest.mark.parametrize(("kernel", "stride", "padding", "frames"), [((3, 7, 7), (1, 2, 2), (1, 3, 3), 8), (3, 1, 1, 6), (3, 2, 1, 8),
                                                                   ((1, 3, 3), 1, (0, 1, 1), 4), ((3, 1, 1), (2, 1, 1), (1, 0, 0), 7)])
@pytest.mark.parametrize("fold", [2, 4])
def test_time_folded_conv3d_is_the_same_function(kernel, stride, padding, frames, fold) -> None:
    torch.manual_seed(0)
    conv = nn.Conv3d(3, 5, kernel, stride=stride, padding=padding).eval()
    x = torch.randn(1, 3, frames, 12, 12)
    folded = TimeFoldedConv3d.like(conv, fold)
    assert folded.state_dict().keys() == conv.state_dict().keys()
    with torch.inference_mode():
        ref = conv(x)
        assert TimeFoldedConv3d.fits(conv, x, fold) == (ref.shape[2] % fold == 0)
        assert folded(x).shape == ref.shape and torch.allclose(folded(x), ref, atol=1e-5)  # folded, or the default path
        if TimeFoldedConv3d.fits(conv, x, fold):  # it really ran the folded conv: its cache was built
            assert folded._folded_w.shape[0] == fold * 5
        assert torch.allclose(folded(x[:1, :, :5]), conv(x[:1, :, :5]), atol=1e-5)  # a shape it may not divide


def test_time_folded_conv3d_follows_its_weight_autograd_and_copies() -> None:
    torch.manual_seed(0)
    conv = nn.Conv3d(3, 4, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False)
    folded = TimeFoldedConv3d.like(conv, 2)
    x = torch.randn(1, 3, 4, 16, 16)
    with torch.inference_mode():
        first = folded(x)
    with torch.no_grad():
        conv.weight.mul_(-1.0)  # changed in place: the folded copy is rebuilt
    with torch.inference_mode():
        assert torch.allclose(folded(x), conv(x), atol=1e-5) and torch.allclose(folded(x), -first, atol=1e-5)
    folded(x).sum().backward()  # autograd takes the default path
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    twin = copy.deepcopy(folded)
    assert twin.fold == 2 and twin.weight is not conv.weight and not hasattr(twin, "_folded_w")
    with torch.inference_mode():
        assert torch.allclose(twin(x), conv(x), atol=1e-5)
    assert "fold=2" in repr(folded)


def test_kernel_candidates_fold_only_narrow_convs_that_divide() -> None:
    x = torch.randn(1, 3, 8, 16, 16)
    stem = nn.Conv3d(3, 4, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3))
    assert set(kernel_candidates(stem, x)) == {"onednn", "packed", "fold2", "fold4"}
    assert set(kernel_candidates(nn.Conv3d(3, 8, 3, padding=1), x)) == {"onednn", "packed", "fold2"}  # 4 x 8 is too wide
    assert set(kernel_candidates(nn.Conv3d(3, 16, 3, padding=1), x)) == {"onednn", "packed"}
    assert "fold2" not in kernel_candidates(nn.Conv3d(3, 4, 3, padding=1), x[:, :, :7])  # 7 frames out: no 2-fold
    assert not TimeFoldedConv3d.fits(nn.Conv3d(4, 4, 3, padding=1, groups=2), x, 2)
    assert not TimeFoldedConv3d.fits(nn.Conv3d(3, 4, 3, padding=2, dilation=2), x, 2)


def test_select_cpu_kernels_swaps_what_it_chose_and_keeps_outputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 4, 8, 8)
    with torch.no_grad():
        ref = model(x)
    key0 = inference._choice_key(model[0], x)
    inference._CHOICES[key0] = "onednn"  # a remembered choice is not timed again
    try:
        n = select_cpu_kernels(model, x)
        assert type(model[0]) is OneDNNConv3d and n == 1 + isinstance(model[2], OneDNNConv3d)
        assert inference._CHOICES[inference._choice_key(model[2], model[1](model[0](x)))] in ("default", "onednn", "packed")
        assert inference._choice_key(model[2], model[1](model[0](x))) in inference._CHOICES  # the other one was timed
        with torch.no_grad():
            assert torch.allclose(model(x), ref, atol=1e-5)
    finally:
        inference._CHOICES.pop(key0, None)
    assert select_cpu_kernels(nn.Conv3d(3, 4, 3).double(), x.double()) == 0  # float32 CPU only


def test_inference_form_of_a_masked_model_keeps_its_masks() -> None:
    # magnitude pruning's masks recompute `weight` in a pre-hook: such convs are left as they are
    from torch.nn.utils import prune as torch_prune

    torch.manual_seed(0)
    model = _with_stats(build_model("r3d_tiny", 3))
    for m in model.modules():
        if isinstance(m, nn.Conv3d):
            torch_prune.l1_unstructured(m, "weight", amount=0.5)
    x = torch.randn(1, 3, 8, 32, 32)
    assert inference_form(model, x) is model  # its `weight`s are autograd results: no copy, timed as it is
    with torch.no_grad():
        model(x)  # recomputed without autograd, as a loaded artefact's are: now it copies
    form = inference_form(model, x, script=False)
    assert form is not model and not any(isinstance(m, OneDNNConv3d) for m in form.modules())
    with torch.no_grad():
        assert torch.allclose(form(x), model(x), atol=1e-4, rtol=1e-4)


def test_onednn_conv3d_compiles() -> None:
    # the compiled graph takes the default path (fake tensors cannot run oneDNN's op)
    torch.manual_seed(0)
    model = nn.Sequential(OneDNNConv3d.like(nn.Conv3d(3, 4, 3, padding=1)), nn.ReLU(),
                          PackedOneDNNConv3d.like(nn.Conv3d(4, 4, 3, padding=1))).eval()
    x = torch.randn(1, 3, 4, 8, 8)
    compiled = torch.compile(model, backend="eager")
    with torch.inference_mode():
        assert torch.allclose(compiled(x), model(x), atol=1e-5)


class _Sleepy(nn.Module):
    """The same function as its inner module, 5 ms slower."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        time.sleep(0.005)
        return self.inner(x)


def test_fastest_picks_the_quickest_and_ties_go_first() -> None:
    conv = nn.Conv3d(3, 4, 3, padding=1).eval()
    x = torch.randn(1, 3, 4, 8, 8)
    slow, also_slow = _Sleepy(conv), _Sleepy(conv)
    assert inference.fastest([slow, conv, also_slow], x) is conv
    assert inference.fastest([conv, slow], x) is conv
    assert inference.fastest([conv, conv], x) is conv
    assert inference.fastest([slow], x) is slow


def test_frozen_trace_where_torchscript_can_and_none_where_it_cannot() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 4, 8, 8)
    traced = frozen_trace(model, x)
    assert isinstance(traced, torch.jit.ScriptModule) and list(traced.parameters()) == []  # frozen: constants
    with torch.inference_mode():
        assert torch.allclose(traced(x), model(x), atol=1e-5)
    packed = nn.Sequential(PackedOneDNNConv3d.like(nn.Conv3d(3, 4, 3, padding=1)), nn.ReLU()).eval()
    assert frozen_trace(packed, x) is None  # oneDNN's packed weight cannot be a TorchScript constant


def test_inference_form_may_be_a_frozen_trace_that_computes_the_same() -> None:
    torch.manual_seed(0)
    model = _with_stats(build_model("r3d_tiny", 3))
    x = torch.randn(1, 3, 8, 32, 32)
    form = inference_form(model, x)  # whichever form timed fastest: all compute the same
    with torch.inference_mode():
        assert torch.allclose(form(x), model(x), atol=1e-4, rtol=1e-4)
    assert isinstance(inference_form(model, x, kernels=False, script=False), fx.GraphModule)
