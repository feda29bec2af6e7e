"""`port`: turn a masked or gated model into a dense, physically smaller one.

Dispatch on the model's wrappers: ``"vib"`` -> :func:`vcc.core.compress.vib.port_vib`;
``"masks"`` (element-wise magnitude masks) -> bake the masks into the weights, then remove,
through the same DepGraph surgery as structured pruning, every coupled channel group whose
filters are all zero *and* whose removal leaves the outputs unchanged (a zero filter followed by
BN is a constant channel, removable only when a ReLU clamps that constant to zero). A model with
no wrappers has nothing to remove and ports to an equal copy.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vcc.core.compress.prune import clone
from vcc.core.errors import VccError, first_line

TOLERANCE = 1e-4


def max_abs_diff(a: nn.Module, b: nn.Module, meta: Any, batch: int = 1, seed: int = 0) -> float:
    """Largest |a(x) - b(x)| over a random batch at the model's input spec (eval mode, fp32)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *meta.input_shape, generator=g)
    with torch.no_grad():
        ya, yb = a.eval()(x), b.eval()(x)
    if isinstance(ya, (list, tuple)):
        return max(float((p - q).abs().max()) for p, q in zip(ya, yb, strict=False))
    return float((ya - yb).abs().max())


def _zeroed_norm(bn: nn.Module, i: int) -> bool:
    """Whether batch norm `bn` outputs exactly 0 on channel `i` whatever its input (weight and bias 0)."""
    return bool(bn.affine) and float(bn.weight.detach()[i]) == 0.0 and float(bn.bias.detach()[i]) == 0.0


def _zero_channels(model: nn.Module, group: Any) -> list[int]:
    """Root channels of `group` that every producer leaves at zero (candidates; removal is then
    verified on outputs). Either every coupled conv's filter (and bias) is zero and each batch norm
    maps zero to a value <= 0 (a following ReLU zeroes it), or every batch norm on the channel has
    weight and bias 0 and so outputs 0 whatever its conv computes (a folded VIB gate)."""
    mods = dict(model.named_modules())
    dead = []
    for j, ch in enumerate(group.channels):
        norms = [(mods[bn], idxs[j]) for bn, idxs in group.norms.items() if idxs[j] >= 0]
        if norms and all(_zeroed_norm(m, i) for m, i in norms):
            if group.members:
                dead.append(ch)
            continue
        ok = bool(group.members)
        for conv, idxs in group.members.items():
            i = idxs[j]
            m = mods[conv]
            if i < 0:
                continue
            if bool(m.weight[i].detach().abs().max() > 0) or (m.bias is not None and float(m.bias.detach()[i].abs()) > 0):
                ok = False
                break
        for m, i in norms if ok else ():
            if m.running_mean is None:
                continue
            # a zero input leaves BN's shift: removable only if it is <= 0 (a following ReLU zeroes it)
            scale = m.weight[i] if m.weight is not None else 1.0
            shift = (m.bias[i] if m.bias is not None else 0.0) - scale * m.running_mean[i] / torch.sqrt(m.running_var[i] + m.eps)
            if float(shift.detach() if isinstance(shift, torch.Tensor) else shift) > 0:
                ok = False
        if ok:
            dead.append(ch)
    if len(dead) >= group.size:
        dead = dead[1:]  # keep one (all-zero) channel so shapes stay valid
    return dead


def remove_dead_channels(model: nn.Module, meta: Any, tol: float = 1e-6) -> tuple[nn.Module, dict[str, int]]:
    """A CPU copy of `model` without the dead channels (see :func:`_zero_channels`) whose removal is
    exact: outputs within `tol`. Used by the port of masked and of VIB-gated CNNs alike."""
    from vcc.core.compress.prune import Surgeon, example_input

    # the probe finds the candidates, then is pruned itself by the first attempt (its tracing is reused)
    probe = Surgeon(clone(model).cpu().eval(), example_input(meta))
    candidates = {gi: ch for gi, g in enumerate(probe.groups) if (ch := _zero_channels(probe.model, g))}
    if not candidates:
        probe.finish()
        return probe.model, {}

    def attempt(plan: dict[int, list[int]], s: Surgeon | None = None) -> nn.Module | None:
        s = s or Surgeon(clone(model).cpu().eval(), example_input(meta))
        s.prune(plan)
        return s.model if max_abs_diff(model, s.model, meta) <= tol else None

    result = attempt(candidates, probe)
    if result is not None:
        return result, {probe.groups[gi].root: len(ch) for gi, ch in candidates.items()}
    accepted: dict[int, list[int]] = {}
    for gi, ch in candidates.items():
        if attempt({**accepted, gi: ch}) is not None:
            accepted[gi] = ch
    if not accepted:
        return clone(model), {}
    result = attempt(accepted)
    if result is None:  # should not happen: every accepted part was exact
        return clone(model), {}
    return result, {probe.groups[gi].root: len(ch) for gi, ch in accepted.items()}


def port_model(model: nn.Module, meta: Any) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(dense_model, dense_meta, info) for a masked (``"masks"``) or gated (``"vib"``) model.

    info: kind, changed, removed ({root layer: channels}), max_abs_diff, note. Raises VccError
    when the dense model's outputs differ from the masked model's by more than 1e-4 (fp32).
    """
    names = [w.get("name") for w in meta.wrappers]
    if "vib" in names:
        from vcc.core.compress.vib import port_vib

        model = model.cpu().float().eval()
        dense, dense_meta, info = port_vib(model, meta)
        diff = max_abs_diff(model, dense, meta)
        if diff > TOLERANCE:
            raise VccError(f"ported model differs from the gated model by {diff:.3g} (> {TOLERANCE:g}); nothing written")
        return dense, dense_meta, {"kind": "vib", "changed": True, **info, "max_abs_diff": diff}
    model = model.cpu().float().eval()
    if "masks" not in names:
        dense = clone(model)
        return dense, meta.child(), {
            "kind": "none",
            "changed": False,
            "removed": {},
            "max_abs_diff": max_abs_diff(model, dense, meta),
            "note": "nothing to remove: the model has no masks or gates (already dense)",
        }
    from vcc.core.compress.magnitude import bake, sparsity_of

    sparsity = sparsity_of(model)
    baked = bake(clone(model))
    dense, removed = remove_dead_channels(baked, meta)
    diff = max_abs_diff(model, dense, meta)
    if diff > TOLERANCE:
        raise VccError(f"ported model differs from the masked model by {diff:.3g} (> {TOLERANCE:g}); nothing written")
    dense_meta = meta.child(wrappers=[w for w in meta.wrappers if w.get("name") != "masks"])
    n = sum(removed.values())
    note = (
        f"baked masks ({sparsity['masked_fraction']:.1%} of masked weights are zero) and removed {n} channels"
        if n else f"baked masks ({sparsity['masked_fraction']:.1%} zeros); no whole channel could be removed exactly"
    )
    return dense, dense_meta, {
        "kind": "masks",
        "changed": True,
        "removed": removed,
        "max_abs_diff": diff,
        "masked_fraction": sparsity["masked_fraction"],
        "note": note,
    }


def export_onnx(model: nn.Module, meta: Any, path: str | Path) -> dict[str, Any]:
    """Export to ONNX (legacy TorchScript exporter), reload and run onnx.checker; atomic."""
    try:
        import onnx
    except ImportError as exc:  # an optional extra
        raise VccError("ONNX export needs the 'onnx' package: pip install 'vcc[onnx]'") from exc
    from vcc.core.workspace import atomic_path

    path = Path(path)
    x = torch.randn(1, *meta.input_shape)
    model = model.cpu().eval()
    with atomic_path(path) as tmp:
        try:
            with warnings.catch_warnings():  # the exporter's advice to torch developers is not the user's business
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model, (x,), str(tmp), dynamo=False, input_names=["clip"], output_names=["logits"],
                    dynamic_axes={"clip": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                )
            proto = onnx.load(str(tmp))
            onnx.checker.check_model(proto)
        except VccError:
            raise
        except Exception as exc:
            raise VccError(f"ONNX export failed: {first_line(exc, 300)}") from exc
    return {"path": str(path), "bytes": path.stat().st_size, "opset": 17, "checked": True,
            "nodes": len(proto.graph.node)}
