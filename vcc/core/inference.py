"""The form a model is timed in: eval mode, BatchNorm folded, each CPU conv on its faster kernel.

PyTorch picks a CPU kernel for each 3D convolution by a fixed rule. At batch 1 it sends convs with
few channels x frames x rows (N·C·D·H <= 20480) and kernels of at most 3 on a side to its own
vol2col + GEMM (`slow_conv3d`), the rest to oneDNN. Channel pruning shrinks C, so pruned layers
cross that line: in r3d_18 at 16x112², pruning to half the MACs moved layer2's convs from oneDNN
to vol2col and made them 3-5x slower, so half the MACs bought 1.17x instead of 1.7x
(bench/RESULTS.md). An inference runtime (oneDNN graph, TensorRT, cuDNN's benchmark mode) picks
kernels by measuring; :func:`select_cpu_kernels` does the same for the two PyTorch offers, and
for a third: oneDNN with the weight reordered once into its blocked layout (what inductor's
freezing and other inference runtimes do), instead of on every call as `mkldnn_convolution`
does with a plain weight; on small convs that reorder costs more than the arithmetic. Narrow
convs can also fold output frames into their channels (:class:`TimeFoldedConv3d`), and small
models are also timed frozen by TorchScript (:func:`frozen_trace`), which drops the Python
between ops.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
MARGIN = 0.9  # another kernel replaces the default one only when it takes < 90% of its time
SCRIPT_MS = 50.0  # models slower than this per call are not traced: Python's per-op cost is lost in their time
_CHOICES: dict[tuple, str] = {}  # per process: (shapes, conv options, threads) -> "default" or a kernel_candidates name


class OneDNNConv3d(nn.Conv3d):
    """A Conv3d that runs oneDNN's kernel for float32 CPU inputs whatever PyTorch's heuristic says.

    The same function as nn.Conv3d (same parameters and state dict); other devices and dtypes,
    and torch.compile, take the default path.
    """

    def _default_path(self, x: torch.Tensor) -> bool:
        """Other devices and dtypes, and torch.compile (inductor picks its own kernels), run nn.Conv3d's forward."""
        return x.device.type != "cpu" or x.dtype != torch.float32 or torch.compiler.is_compiling()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._default_path(x):
            return super().forward(x)
        return torch.ops.aten.mkldnn_convolution(x, self.weight, self.bias, list(self.padding), list(self.stride),
                                                 list(self.dilation), self.groups)

    @classmethod
    def like(cls, conv: nn.Conv3d, **attrs: Any) -> OneDNNConv3d:
        """One of this class sharing `conv`'s parameters (`attrs`: a subclass's own settings)."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, bias=conv.bias is not None, device="meta")
        new.weight = conv.weight
        new.bias = conv.bias
        for k, v in attrs.items():
            setattr(new, k, v)
        return new

    def _settings(self) -> dict[str, Any]:
        """The attributes besides the parameters that a copy keeps (caches are rebuilt, not copied)."""
        return {}

    def __deepcopy__(self, memo: dict) -> OneDNNConv3d:  # caches (packed or folded weights) are not copied
        new = type(self).like(self, **self._settings())
        new.weight = copy.deepcopy(self.weight, memo)
        new.bias = copy.deepcopy(self.bias, memo)
        new.train(self.training)
        return new

    @staticmethod
    def _autograd(x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether a call needs a backward (training, or a gradient asked for), which cached weights do not have."""
        return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


class PackedOneDNNConv3d(OneDNNConv3d):
    """A OneDNNConv3d whose weight is reordered once into oneDNN's blocked layout (for one input shape).

    The packed copy is rebuilt when the weight changes; with autograd on (training, or a gradient
    asked for), other devices and dtypes, and under torch.compile it takes the default path.
    The state dict is nn.Conv3d's.
    """

    def _pack(self, x: torch.Tensor) -> torch.Tensor:
        key = (self.weight._version, id(self.weight), tuple(x.shape))
        if getattr(self, "_packed_key", None) != key:
            with torch.no_grad():
                self._packed = torch._C._nn.mkldnn_reorder_conv3d_weight(
                    self.weight.detach().to_mkldnn(), list(self.padding), list(self.stride), list(self.dilation),
                    self.groups, list(x.shape))
            self._packed_key = key
        return self._packed

    def _default_path(self, x: torch.Tensor) -> bool:  # and with autograd on: the packed op has no backward
        return super()._default_path(x) or self._autograd(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._default_path(x):
            return nn.Conv3d.forward(self, x)
        return torch.ops.mkldnn._convolution_pointwise(x.contiguous(), self._pack(x), self.bias, list(self.padding),
                                                       list(self.stride), list(self.dilation), self.groups, "none", [], "")


class TimeFoldedConv3d(OneDNNConv3d):
    """A Conv3d that computes `fold` consecutive output frames as `fold`x the output channels of one conv.

    CPU conv kernels vectorise over output channels in blocks (oneDNN on AVX-512: 16 float32
    lanes), so a conv with 9 output channels costs what one with 16 does, and pruning a narrow
    conv (r3d's 16-channel stem) buys no time. Folding time into channels fills the lanes: output
    frame f·t + j comes from output channel block j of a conv with temporal stride f·s and a
    kernel f-1 strides deeper (zeros outside each block's own taps; (kt + (f-1)·s) / kt of the
    MACs), run on 1/f of the frames. It pays only for narrow convs, so
    :func:`select_cpu_kernels` keeps it where it times faster. The same function as nn.Conv3d,
    same state dict; shapes it does not divide, autograd, other devices and dtypes and
    torch.compile take the default path.
    """

    fold: int = 2

    @classmethod
    def fits(cls, conv: nn.Conv3d, x: torch.Tensor, fold: int) -> bool:
        """Whether `conv` on `x` can be folded `fold`-fold: one group, no temporal dilation, output frames divisible by `fold`."""
        if conv.groups != 1 or conv.dilation[0] != 1 or isinstance(conv.padding, str) or x.dim() != 5:
            return False
        frames = (x.shape[2] + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        return frames > 0 and frames % fold == 0

    def _folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = self.bias
        key = (self.weight._version, id(self.weight), None if bias is None else (bias._version, id(bias)))
        if getattr(self, "_folded_key", None) != key:
            f, s = self.fold, self.stride[0]
            w = self.weight.detach()
            out, inp, kt = w.shape[:3]
            wf = w.new_zeros(f, out, inp, kt + (f - 1) * s, *w.shape[3:])
            for j in range(f):
                wf[j, :, :, j * s:j * s + kt] = w
            self._folded_w = wf.reshape(f * out, inp, kt + (f - 1) * s, *w.shape[3:])
            self._folded_b = None if bias is None else bias.detach().repeat(f)
            self._folded_key = key
        return self._folded_w, self._folded_b

    def _default_path(self, x: torch.Tensor) -> bool:
        return super()._default_path(x) or self._autograd(x, self.weight) or not self.fits(self, x, self.fold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._default_path(x):
            return nn.Conv3d.forward(self, x)
        w, b = self._folded()
        f = self.fold
        y = torch.nn.functional.conv3d(x, w, b, (f * self.stride[0], *self.stride[1:]), self.padding, self.dilation)
        n, _, t, h, wd = y.shape
        return y.view(n, f, self.out_channels, t, h, wd).permute(0, 2, 3, 1, 4, 5).reshape(n, self.out_channels, t * f, h, wd)

    @classmethod
    def like(cls, conv: nn.Conv3d, fold: int = 2) -> TimeFoldedConv3d:
        """A TimeFoldedConv3d of `fold` frames sharing `conv`'s parameters."""
        return super().like(conv, fold=fold)

    def _settings(self) -> dict[str, Any]:
        return {"fold": self.fold}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fold={self.fold}"


FOLDS = (2, 4)  # time-fold factors tried for convs whose folded width stays narrow
FOLD_WIDTH = 16  # ... to at most this many output channels (one AVX-512 block of float32: wider folds lost when timed)


_KERNELS: dict[str, tuple[type[OneDNNConv3d], dict[str, Any]]] = {  # name -> (class, settings)
    "onednn": (OneDNNConv3d, {}), "packed": (PackedOneDNNConv3d, {}),
    **{f"fold{f}": (TimeFoldedConv3d, {"fold": f}) for f in FOLDS},
}


def kernel_candidates(conv: nn.Conv3d, x: torch.Tensor) -> dict[str, nn.Module]:
    """The alternative kernels for `conv` on `x`, by name, each sharing its parameters: oneDNN,
    oneDNN on a packed weight, and time-folded by each of FOLDS where it fits and stays narrow."""
    return {kind: _make(kind, conv) for kind, (cls, opts) in _KERNELS.items()
            if cls is not TimeFoldedConv3d
            or (opts["fold"] * conv.out_channels <= FOLD_WIDTH and TimeFoldedConv3d.fits(conv, x, opts["fold"]))}


def _make(kind: str, conv: nn.Conv3d) -> nn.Module:
    """The kernel called `kind` (a name from :func:`kernel_candidates`) for `conv`."""
    cls, opts = _KERNELS[kind]
    return cls.like(conv, **opts)


class _LeafTracer(fx.Tracer):
    """torch.fx tracer that keeps every conv and BatchNorm a module call, subclasses included
    (torchvision's r3d/mc3 convs are nn.Conv3d subclasses, which fx would otherwise trace into)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _CONVS + _NORMS) or super().is_leaf_module(m, qualname)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of eval-mode `model` with each BatchNorm that directly follows a conv folded into the conv.

    Models that torch.fx traces are folded on their graph (any conv -> BatchNorm edge whose conv
    has no other user); the rest (data-dependent control flow: s3d, multi-exit models) only where
    the pair sits side by side in an nn.Sequential, the BatchNorm becoming an Identity.
    """
    model = copy.deepcopy(model).eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _LeafTracer().trace(model)
    except Exception:  # noqa: BLE001 - fx raises several types for untraceable code
        _fold_sequential(model)
        return model
    gm = fx.GraphModule(model, graph)
    mods = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(mods.get(node.target), _NORMS) or len(node.args) != 1:
            continue
        prev = node.args[0]
        if not (isinstance(prev, fx.Node) and prev.op == "call_module" and len(prev.users) == 1
                and _foldable(mods.get(prev.target), mods[node.target])):
            continue
        _set_module(gm, prev.target, _fuse(mods[prev.target], mods[node.target]))
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm


def _plain(conv: Any) -> bool:
    """A conv whose weight is its own parameter (not one a hook recomputes, as pruning masks do)."""
    return isinstance(conv.weight, nn.Parameter) and not conv._forward_pre_hooks


def _foldable(conv: Any, bn: nn.Module) -> bool:
    return (isinstance(conv, _CONVS) and _plain(conv) and isinstance(bn, _NORMS) and bn.track_running_stats
            and bn.running_mean is not None and bn.num_features == conv.out_channels)


def _fuse(conv: nn.Module, bn: nn.Module) -> nn.Module:
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    return fuse_conv_bn_eval(conv, bn)


def _fold_sequential(model: nn.Module) -> None:
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        keys = list(seq._modules)
        for a, b in zip(keys, keys[1:], strict=False):
            if _foldable(seq._modules[a], seq._modules[b]):
                seq._modules[a] = _fuse(seq._modules[a], seq._modules[b])
                seq._modules[b] = nn.Identity()


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def sync(device: torch.device) -> None:
    """Wait for `device`'s queued work (CUDA); nothing to wait for on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, *, warmup: int = 3, runs: int = 10, min_s: float = 0.0, most: int = 2000) -> float:
    """Median wall time in ms of `fn(x)` under inference mode after `warmup` calls (synchronised on CUDA).

    `fn` is any callable: a module, a compiled module, an ONNX Runtime session wrapper. At least
    `runs` calls are timed, and more (up to `most`) until they add up to `min_s` seconds, so that
    something of microseconds is not judged on a few noisy samples.
    """
    times: list[float] = []
    with torch.inference_mode():
        i = 0
        while i < warmup + runs or (sum(times) < min_s * 1000.0 and len(times) < most):
            sync(x.device)
            t0 = time.perf_counter()
            fn(x)
            sync(x.device)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000.0)
            i += 1
    return float(statistics.median(times))


def _conv_ms(conv: nn.Module, x: torch.Tensor, runs: int) -> float:
    """One conv's median time: a warm-up call (oneDNN builds its primitive on the first), then at
    least `runs` calls, more (up to 25) while they fit in 10 ms."""
    return median_ms(conv, x, warmup=1, runs=runs, min_s=0.01, most=25)


def select_cpu_kernels(model: nn.Module, example: torch.Tensor, runs: int = 3) -> int:
    """Swap (in place) each float32 CPU Conv3d of `model` for a :class:`OneDNNConv3d`, a
    :class:`PackedOneDNNConv3d` or a :class:`TimeFoldedConv3d` where that kernel is faster than PyTorch's choice.

    Each conv is timed with PyTorch's kernel and each of :func:`kernel_candidates` on its own input from one forward of `example` (the
    choice is for that shape; any other shape still computes the same function). Choices are
    remembered per process by shapes, options and thread count. Returns the number of convs swapped.
    """
    if example.device.type != "cpu" or example.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return 0
    from vcc.core.probe import probe_forward

    inputs: dict[str, torch.Tensor] = {}
    convs = {n: m for n, m in model.named_modules()  # plain Conv3d semantics (subclasses that only add structure too)
             if isinstance(m, nn.Conv3d) and type(m).forward is nn.Conv3d.forward and _plain(m)
             and m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)}

    def hook(name: str):
        def record(_m: nn.Module, args: tuple, _out: Any) -> None:  # returns None: a forward hook's value replaces the output
            inputs.setdefault(name, args[0].detach())

        return record

    probe_forward(model, example, [(m, hook(n)) for n, m in convs.items()])
    swapped = 0
    with torch.inference_mode():
        for name, conv in convs.items():
            x = inputs.get(name)
            if x is None or x.dtype != torch.float32:
                continue
            key = _choice_key(conv, x)
            if key not in _CHOICES:
                times = {"default": _conv_ms(conv, x, runs)}  # PyTorch's own choice
                for kind, alt in kernel_candidates(conv, x).items():
                    try:
                        times[kind] = _conv_ms(alt, x, runs) / MARGIN
                    except (RuntimeError, NotImplementedError, AttributeError):  # a build without this oneDNN op
                        pass
                _CHOICES[key] = min(times, key=times.__getitem__)
            if _CHOICES[key] != "default":
                _set_module(model, name, _make(_CHOICES[key], conv))
                swapped += 1
    return swapped


def fastest(candidates: list[Callable[[torch.Tensor], Any]], example: torch.Tensor, rounds: int = 15, budget_s: float = 0.5) -> Any:
    """The candidate that runs `example` fastest. Rounds (at least 3, up to `rounds` while they fit
    in `budget_s`) run each candidate in turn; for calls under 10 ms, one untimed call to warm
    its caches, then three timed back to back (as repeated forwards run) whose median counts.
    A candidate's time is the median over rounds. Earlier candidates win ties: list the
    plainest first."""
    times: list[list[float]] = [[] for _ in candidates]
    with torch.inference_mode():
        first = []
        for fn in candidates:
            t0 = time.perf_counter()
            fn(example)
            first.append(time.perf_counter() - t0)
        block = 3 if max(first) < 0.01 else 1  # a slow model's cache state does not matter
        start = time.perf_counter()
        while len(times[0]) < 3 or (len(times[0]) < rounds and time.perf_counter() - start < budget_s):
            for i, fn in enumerate(candidates):
                if block > 1:
                    fn(example)
                calls = []
                for _ in range(block):
                    t0 = time.perf_counter()
                    fn(example)
                    calls.append(time.perf_counter() - t0)
                times[i].append(statistics.median(calls))
    medians = [statistics.median(t) for t in times]
    return candidates[min(range(len(candidates)), key=lambda i: (medians[i], i))]


def _choice_key(conv: nn.Conv3d, x: torch.Tensor) -> tuple:
    return (tuple(x.shape), tuple(x.stride()), tuple(conv.weight.shape), conv.bias is not None, conv.stride,
            conv.padding, conv.dilation, torch.get_num_threads())


def frozen_trace(model: nn.Module, example: torch.Tensor) -> nn.Module | None:
    """`model` traced on `example` and frozen by TorchScript (parameters folded in as constants, no
    Python between ops), warmed up; None where it cannot be traced or frozen.

    The trace records the ops `example` runs: only for a fixed input shape and models without
    data-dependent control flow, which :func:`inference_form` checks by comparing outputs.
    TorchScript is in maintenance mode (a FutureWarning, silenced here); where a PyTorch build no
    longer has it this returns None and the eager form is timed.
    """
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.freeze(torch.jit.trace(model, example, check_trace=False, strict=False).eval())
        with torch.inference_mode():
            for _ in range(3):  # the profiling executor specialises over the first calls
                traced(example)
    except Exception:  # noqa: BLE001 - anything TorchScript cannot take is timed in eager mode
        return None
    return traced


def inference_form(model: nn.Module, example: torch.Tensor, *, kernels: bool = True, script: bool = True) -> nn.Module:
    """`model` as an inference runtime runs it: eval mode, BatchNorm folded, CPU conv kernels chosen
    by timing, and frozen by TorchScript where that runs faster.

    Folding (:func:`fold_batchnorm`) removes a fixed per-layer cost that pruning cannot shrink,
    as ONNX Runtime, TensorRT or a frozen TorchScript module would. With `kernels`,
    :func:`select_cpu_kernels` picks each CPU conv's faster kernel at `example`'s shape. With
    `script`, models under SCRIPT_MS a call are also traced and frozen (:func:`frozen_trace`: what
    a libtorch deployment runs, no Python between ops; at batch 1 on small clips Python's per-op
    cost is a sixth of the time). Of these forms the one that runs the whole model fastest
    (:func:`fastest`) is kept. The result computes what
    `model` does (checked to 1e-4 on `example`; a form that differs falls back to `model`
    itself); `model` is never changed.
    """
    model.eval()
    try:
        form = fold_batchnorm(model)
    except RuntimeError:  # a model that cannot be copied (a mask's weight computed with autograd): time it as it is
        return model
    forms: list[nn.Module] = [form]
    if kernels:
        swapped = copy.deepcopy(form)
        if select_cpu_kernels(swapped, example):  # each conv was timed alone: the whole model decides below
            forms.append(swapped)
    if script and median_ms(form, example, warmup=1, runs=1) < SCRIPT_MS:  # packed oneDNN weights do not trace (None)
        forms += [t for t in (frozen_trace(f, example) for f in list(forms)) if t is not None]
    with torch.inference_mode():
        ref = _tensors(model(example))
    forms = [f for f in forms if _same(f, ref, example)]
    if not forms:
        return model
    return fastest(forms, example) if len(forms) > 1 else forms[0]


def _same(fn: Callable[[torch.Tensor], Any], ref: list[torch.Tensor], x: torch.Tensor) -> bool:
    """Whether `fn` gives outputs `ref` on `x` (to 1e-4)."""
    with torch.inference_mode():
        got = _tensors(fn(x))
    return len(ref) == len(got) > 0 and all(g.shape == r.shape and torch.allclose(g, r, atol=1e-4, rtol=1e-4) for g, r in zip(got, ref, strict=True))


def _tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a model output: a tensor, or a list/tuple of them (a multi-exit model's)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []
