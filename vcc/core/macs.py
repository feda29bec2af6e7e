"""Counting MACs (multiply-accumulates) and parameters of a model, total and per layer.

Built on fvcore's ``FlopCountAnalysis``, which traces the model with ``torch.jit`` and counts
one fused multiply-add as one "flop", i.e. one MAC. What we change:

* **Added handles** for MAC-bearing ops fvcore skips: ``aten::lstm``/``gru``/``rnn_tanh``/
  ``rnn_relu`` (fvcore and PyTorch's ``FlopCounterMode`` both give 0 for them on CPU),
  ``aten::baddbmm``/``addbmm``/``mv``/``addmv``, ``aten::convolution``/``conv{1,2,3}d``/
  ``conv_transpose{1,2,3}d`` (when a trace keeps them undecomposed) and
  ``aten::scaled_dot_product_attention``.
  A recurrent layer counts, per time step and sequence, one MAC per element of each of its
  weight matrices: an LSTM layer with input I and hidden H over T steps counts
  ``T * 4H * (I + H)`` MACs (GRU ``3H``, plain RNN ``H``; ``proj_size`` adds its ``P x H``
  projection). No elementwise work is added: gate nonlinearities, bias additions and the
  cell-state products are not MACs.
* **Removed** fvcore's estimates for normalisation, upsampling and pooling (``batch_norm`` counts
  2 per element there): they are elementwise, BatchNorm folds into the preceding convolution at
  inference, and published figures (torchvision's) count convolutions and matrix products only.
  Such ops are reported as *ignored*, not as uncounted.
* Conv3d subclasses (torchvision's ``Conv3DSimple``, ``Conv2Plus1D``, ``Conv3DNoTemporal``) are
  counted like any conv, because the count is per traced ``aten`` op, not per module type.

Anything the trace hits that is neither counted nor known to be MAC-free is listed in
``MacsResult.uncounted``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vcc.core.errors import VccError, first_line

# Ops that do no multiply-accumulate work (elementwise, pooling, normalisation, data movement,
# randomness). fvcore already ignores shape/copy ops; this list covers the rest the zoo hits.
_MAC_FREE = {
    # arithmetic / activations (elementwise)
    "abs", "add", "addcmul", "addcdiv", "clamp", "clamp_min", "clamp_max", "div", "elu", "erf",
    "exp", "gelu", "glu", "hardsigmoid", "hardswish", "hardtanh", "leaky_relu", "lerp", "log",
    "log1p", "log_sigmoid", "log_softmax", "logsumexp", "maximum", "minimum", "mish", "mul",
    "neg", "pow", "prelu", "reciprocal", "relu", "relu6", "rsqrt", "rsub", "selu", "sigmoid",
    "sign", "silu", "softmax", "softplus", "sqrt", "square", "sub", "tanh", "where",
    # comparisons, reductions, indexing
    "all", "amax", "amin", "any", "argmax", "argmin", "cumsum", "eq", "ge", "gt", "le", "lt",
    "mean", "ne", "norm", "frobenius_norm", "linalg_vector_norm", "std", "sum", "topk", "sort",
    "var", "index_select", "embedding", "masked_fill", "masked_select", "repeat", "flip",
    "roll", "expand_as", "view_as", "reshape_as", "clone", "fill", "zero", "new_ones",
    "ones_like", "empty_like", "rand", "rand_like", "randn", "randn_like", "normal",
    "bernoulli", "uniform", "dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout",
    "unsafe_chunk", "unsafe_split", "tensor_split", "pad", "reflection_pad1d", "reflection_pad2d",
    "reflection_pad3d", "replication_pad1d", "replication_pad2d", "replication_pad3d",
    "_pack_padded_sequence", "_pad_packed_sequence", "linspace", "scalar_tensor", "numel",
    "_shape_as_tensor", "lift_fresh", "alias", "_unsafe_view", "movedim", "swapaxes", "unfold",
    "pixel_shuffle", "channel_shuffle", "mT", "adjoint", "as_strided", "resolve_conj",
    "resolve_neg", "broadcast_tensors", "meshgrid", "cat", "concat", "stack", "hstack",
    # pooling and normalisation (elementwise; BatchNorm folds into the conv at inference)
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d",
    "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "batch_norm", "group_norm", "layer_norm",
    "instance_norm", "local_response_norm", "rms_norm", "upsample_nearest1d",
    "upsample_nearest2d", "upsample_nearest3d", "upsample_linear1d", "upsample_bilinear2d",
    "upsample_trilinear3d", "upsample_bicubic2d", "grid_sampler", "interpolate",
}
@dataclass
class MacsResult:
    """MACs and parameters of one forward pass at batch size 1.

    `layers`: one dict(name, type, macs, params) per module that owns MACs or parameters itself
    (its own ops and parameters, children excluded; they sum to the totals), in module order.
    `uncounted`: ops that may carry MACs but have no handle (their MACs are missing from `macs`).
    `ignored`: ops seen that do no multiply-accumulates (elementwise, pooling, normalisation).
    """

    macs: int
    params: int
    layers: list[dict[str, Any]] = field(default_factory=list)
    uncounted: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- handles


def _shape(value: Any) -> list[int] | None:
    if value.isCompleteTensor():
        return list(value.type().sizes())
    return None


def _list_items(value: Any) -> list[Any]:
    """The elements of a traced `Tensor[]` argument (a prim::ListConstruct)."""
    node = value.node()
    if node.kind() == "prim::ListConstruct":
        return list(node.inputs())
    return []


def _rnn_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """MACs of aten::lstm / gru / rnn_tanh / rnn_relu (both `.input` and packed `.data` forms).

    Every weight matrix (w_ih, w_hh, and w_hr with proj_size) is applied once per time step
    and sequence: MACs = steps * sum(rows * cols). For an LSTM: T * 4H * (I + H) per layer and
    direction. Biases and gate arithmetic are elementwise and not counted.
    """
    node = outputs[0].node()
    packed = ".data(" in node.schema()
    # The parameter list is the last Tensor[] argument (an LSTM's hx is a Tensor[] too).
    lists = [v for v in inputs if str(v.type()) == "List[Tensor]"]
    if not lists:
        return 0
    weights = [_shape(w) for w in _list_items(lists[-1])]
    per_step = sum(s[0] * s[1] for s in weights if s is not None and len(s) == 2)
    x = _shape(inputs[0])
    if x is None:
        return 0
    if packed or len(x) == 2:
        steps = x[0]  # packed data: sum of batch sizes; unbatched input: T
    else:
        steps = x[0] * x[1]  # (T, N, I) or (N, T, I)
    return int(steps * per_step)


def _conv_macs(x: list[int], w: list[int], out: list[int], transposed: bool) -> int:
    spatial = (x if transposed else out)[2:]
    return int(x[0] * math.prod(w) * math.prod(spatial))


def _conv_handle(transposed_arg: int | None, transposed: bool = False):
    def handle(inputs: list[Any], outputs: list[Any]) -> int:
        x, w, out = _shape(inputs[0]), _shape(inputs[1]), _shape(outputs[0])
        if x is None or w is None or out is None:
            return 0
        t = bool(inputs[transposed_arg].toIValue()) if transposed_arg is not None else transposed
        if len(x) == len(w) - 1:  # unbatched conv input
            x, out = [1, *x], [1, *out]
        return _conv_macs(x, w, out, t)

    return handle


def _bmm_like(first: int):
    """baddbmm(self, b1, b2) / addbmm: MACs = B * n * m * p for (B,n,m) @ (B,m,p)."""

    def handle(inputs: list[Any], outputs: list[Any]) -> int:
        a, b = _shape(inputs[first]), _shape(inputs[first + 1])
        if a is None or b is None:
            return 0
        return int(math.prod(a) * b[-1])

    return handle


def _mv_like(first: int):
    def handle(inputs: list[Any], outputs: list[Any]) -> int:
        a = _shape(inputs[first])
        return int(math.prod(a)) if a is not None else 0

    return handle


def _sdpa(inputs: list[Any], outputs: list[Any]) -> int:
    """scaled_dot_product_attention: QK^T (L*S*E) plus AV (L*S*Ev) per batch/head."""
    q, k, v = (_shape(t) for t in inputs[:3])
    if q is None or k is None or v is None:
        return 0
    batch = math.prod(q[:-2])
    return int(batch * q[-2] * k[-2] * (q[-1] + v[-1]))


_EXTRA_HANDLES = {
    "aten::lstm": _rnn_macs,
    "aten::gru": _rnn_macs,
    "aten::rnn_tanh": _rnn_macs,
    "aten::rnn_relu": _rnn_macs,
    "aten::baddbmm": _bmm_like(1),
    "aten::addbmm": _bmm_like(1),
    "aten::mv": _mv_like(0),
    "aten::addmv": _mv_like(1),
    "aten::convolution": _conv_handle(6),
    "aten::conv1d": _conv_handle(None),
    "aten::conv2d": _conv_handle(None),
    "aten::conv3d": _conv_handle(None),
    "aten::conv_transpose1d": _conv_handle(None, True),
    "aten::conv_transpose2d": _conv_handle(None, True),
    "aten::conv_transpose3d": _conv_handle(None, True),
    "aten::scaled_dot_product_attention": _sdpa,
}


def _is_mac_free(op: str) -> bool:
    """Whether `op` (an aten op, possibly in-place `op_`) does no multiply-accumulates."""
    if not op.startswith("aten::"):
        return False
    name = op[len("aten::") :].rstrip("_")
    return name in _MAC_FREE or name.lstrip("_") in _MAC_FREE


# ---------------------------------------------------------------- counting


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence fvcore's logging and the warnings jit tracing emits."""
    loggers = [logging.getLogger(n) for n in ("fvcore", "fvcore.nn.jit_analysis", "iopath")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def flop_count_analysis(model: nn.Module, inputs: tuple[torch.Tensor, ...]):
    """An fvcore FlopCountAnalysis with vcc's MAC handles (see the module docstring)."""
    with _quiet():
        from fvcore.nn import FlopCountAnalysis
        from fvcore.nn import jit_handles as jh

    fa = FlopCountAnalysis(model, inputs)
    fa.unsupported_ops_warnings(False)
    fa.uncalled_modules_warnings(False)
    fa.tracer_warnings("none")
    # Keep fvcore's matrix-product handles; drop its elementwise estimates (norms, pooling,
    # upsampling), which then show up as ignored ops.
    fa.clear_op_handles()
    fa.set_op_handle(
        **{
            "aten::addmm": jh.addmm_flop_jit,
            "aten::bmm": jh.bmm_flop_jit,
            "aten::_convolution": jh.conv_flop_jit,
            "aten::einsum": jh.einsum_flop_jit,
            "aten::matmul": jh.matmul_flop_jit,
            "aten::mm": jh.matmul_flop_jit,
            "aten::linear": jh.linear_flop_jit,
            **_EXTRA_HANDLES,
        }
    )
    return fa


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared ones once)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_shape: Sequence[int] = (3, 16, 112, 112), by_layer: bool = True) -> MacsResult:
    """MACs and parameters of `model` for one clip of `input_shape` = (C, T, H, W), batch 1.

    Runs one traced forward pass in eval mode (the model's train/eval state is restored).
    Raises VccError when the model cannot run at that input size.
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 4 or min(shape) < 1:
        raise VccError(f"input shape must be 4 positive ints (C, T, H, W), got {list(input_shape)}")
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None else torch.float32
    x = torch.zeros((1, *shape), device=device, dtype=dtype)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    fa = flop_count_analysis(model, (x,))
    try:
        with _quiet(), torch.no_grad():
            total = int(fa.total())
            unsupported = fa.unsupported_ops()
            per_module = fa.by_module() if by_layer else None
    except (RuntimeError, ValueError, IndexError) as exc:
        raise VccError(f"cannot run {type(model).__name__} on input {list(shape)}: {first_line(exc, 200)}") from exc
    finally:
        for m, training in modes.items():
            m.train(training)
    ignored = sorted(op for op in unsupported if _is_mac_free(op))
    uncounted = sorted(op for op in unsupported if not _is_mac_free(op))
    layers = _layers(model, per_module) if per_module is not None else []
    return MacsResult(macs=total, params=count_params(model), layers=layers, uncounted=uncounted, ignored=ignored)


def _layers(model: nn.Module, per_module: dict[str, int]) -> list[dict[str, Any]]:
    """Per-module own MACs (total minus direct children) and own parameters."""
    own = {name: int(v) for name, v in per_module.items()}
    for name, v in per_module.items():
        if name:
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            if parent in own:
                own[parent] -= int(v)
    seen: set[int] = set()
    rows = []
    for name, mod in model.named_modules():
        params = 0
        for p in mod.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                params += p.numel()
        macs = own.get(name, 0)
        if macs or params:
            rows.append({"name": name, "type": type(mod).__name__, "macs": macs, "params": params})
    return rows


# ---------------------------------------------------------------- what `vcc macs` counts


@dataclass
class MacsTarget:
    """A model to count: built from an arch name, or loaded from an artefact (then `meta`)."""

    label: str
    model: nn.Module
    frames: int
    size: int
    channels: int = 3
    meta: Any = None  # vcc.core.artefact.ModelMeta for an artefact


def resolve_target(spec: str, ws: Any, num_classes: int | None = None) -> MacsTarget:
    """An arch name (built with `num_classes`, default 400) or a model (path or run name).

    A path-like spec (ends in .safetensors or contains a path separator, or exists) is a model;
    else a registered arch; else a run in workspace `ws`. A name that is none of these raises
    UsageError listing the known archs; a missing file raises VccError.
    """
    import os
    from pathlib import Path

    from vcc.core.errors import UsageError
    from vcc.core.models import build_model, get_spec, list_models

    path_like = spec.endswith(".safetensors") or os.sep in spec or "/" in spec or Path(spec).exists()
    archs = list_models()
    if not path_like and spec in archs:
        arch = get_spec(spec)
        model = build_model(spec, num_classes=400 if num_classes is None else num_classes)
        return MacsTarget(label=spec, model=model, frames=arch.frames, size=arch.size)
    is_run = not path_like and ws is not None and spec.partition(":")[0] in ws.runs()
    if not path_like and not is_run:
        raise UsageError(f"{spec!r} is neither a known arch nor a run in the workspace; known archs: {', '.join(archs)}")
    if num_classes is not None:
        raise UsageError("--num-classes applies to an arch name only; a model has its own classes")
    from vcc.core.artefact import load_model

    path = ws.resolve_model(spec) if ws is not None else Path(spec)
    model, meta = load_model(path)
    return MacsTarget(label=spec, model=model, frames=meta.frames, size=meta.size, channels=meta.channels, meta=meta)


def exit_macs_for(target: MacsTarget, frames: int, size: int) -> list[dict[str, Any]] | None:
    """Cumulative MACs per exit of a multi-exit model at (frames, size), via vcc.core.exits.

    None when the model has no exits.
    """
    if target.meta is None:
        return None
    from vcc.core.exits import exit_macs, is_multi_exit

    if not is_multi_exit(target.meta):
        return None
    meta = target.meta.child(input={**target.meta.input, "frames": int(frames), "size": int(size)})
    return exit_macs(target.model, meta)  # a WISE model's rows charge its weighted sums
