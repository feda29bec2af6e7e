"""Element-wise magnitude pruning with masks that survive finetuning (the ``"masks"`` wrapper).

Masks are ``torch.nn.utils.prune`` masks: each masked layer keeps ``weight_orig`` (trained) and
the buffer ``weight_mask``; a forward pre-hook sets ``weight = weight_orig * weight_mask`` on
every forward pass, so masked weights stay zero however the optimiser moves ``weight_orig``
(Distiller's mask-on-forward). The wrapper is recorded as
``{"name": "masks", "options": {"layers": [...]}}`` and re-applied when the artefact is loaded.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as tprune

from vcc.core.errors import UsageError, VccError
from vcc.core.models.registry import register_wrapper

WRAPPER = "masks"


@register_wrapper(WRAPPER)
def masks(model: nn.Module, layers: list[str] | None = None) -> nn.Module:
    """Attach all-ones masks to `layers` (loaded masks then overwrite them)."""
    mods = dict(model.named_modules())
    for name in layers or []:
        m = mods.get(name)
        if m is None or not isinstance(getattr(m, "weight", None), torch.Tensor):
            raise UsageError(f"masks wrapper: model has no weighted layer {name!r}")
        if not tprune.is_pruned(m) or not hasattr(m, "weight_mask"):
            tprune.custom_from_mask(m, "weight", torch.ones_like(m.weight))
    return model


def masked_layers(model: nn.Module) -> list[str]:
    """Names of layers carrying a weight mask."""
    return [n for n, m in model.named_modules() if hasattr(m, "weight_mask")]


def candidate_layers(model: nn.Module, meta: Any, ignore: list[str] | None = None) -> list[str]:
    """Conv and linear layers to mask: all but the classifier(s) and `ignore` patterns."""
    from vcc.core.compress.prune import Surgeon, clone, example_input, ignored_layers

    s = Surgeon(bake(clone(model).cpu()), example_input(meta))
    s.finish()
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    skip = set(s.classifiers) | ignored_layers(layers, ignore)
    return [n for n in layers if n not in skip]


def read_sparsity_csv(path: str | Path) -> dict[str, float]:
    """A per-layer sparsity CSV: rows ``layer,sparsity`` (a header row is optional)."""
    path = Path(path)
    if not path.is_file():
        raise VccError(f"sparsity CSV not found: {path}")
    out: dict[str, float] = {}
    with open(path, newline="") as fh:
        for i, row in enumerate(csv.reader(fh)):
            if not row or row[0].strip().startswith("#"):
                continue
            if len(row) < 2:
                raise UsageError(f"{path}:{i + 1}: expected 'layer,sparsity'")
            try:
                value = float(row[1])
            except ValueError:
                if i == 0:
                    continue  # header
                raise UsageError(f"{path}:{i + 1}: sparsity {row[1]!r} is not a number") from None
            if not 0.0 <= value < 1.0:
                raise UsageError(f"{path}:{i + 1}: sparsity must be in [0, 1), got {value}")
            out[row[0].strip()] = value
    if not out:
        raise UsageError(f"{path}: no 'layer,sparsity' rows")
    return out


def apply_magnitude(model: nn.Module, meta: Any, sparsity: float | dict[str, float], *,
                    ignore: list[str] | None = None, layers: list[str] | None = None) -> tuple[nn.Module, Any, dict[str, float]]:
    """Mask the smallest-magnitude weights of each layer (in place): returns (model, meta, achieved).

    `sparsity` is one fraction for every candidate layer, or a dict layer -> fraction. Existing
    masks are kept (a weight once masked stays masked), so repeated calls follow a schedule.
    `layers` (default: :func:`candidate_layers`) are the maskable layers.
    """
    layers = layers if layers is not None else candidate_layers(model, meta, ignore)
    if isinstance(sparsity, dict):
        unknown = sorted(set(sparsity) - set(layers))
        if unknown:
            raise UsageError(f"sparsity given for unknown or unmaskable layers: {', '.join(unknown[:5])} (maskable: {', '.join(layers[:8])}...)")
        targets = dict(sparsity)
    else:
        if not 0.0 < sparsity < 1.0:
            raise UsageError(f"--sparsity must be in (0, 1), got {sparsity}")
        targets = {n: float(sparsity) for n in layers}
    mods = dict(model.named_modules())
    achieved: dict[str, float] = {}
    for name, s in targets.items():
        m = mods[name]
        if not hasattr(m, "weight_mask"):
            tprune.custom_from_mask(m, "weight", torch.ones_like(m.weight))
        w = (m.weight_orig.detach() * m.weight_mask).abs().flatten()
        k = int(round(s * w.numel()))
        mask = m.weight_mask.clone()
        if k > 0:
            thr_idx = torch.argsort(w, stable=True)[:k]
            flat = mask.flatten()
            flat[thr_idx] = 0
            mask = flat.view_as(mask)
        m.weight_mask.copy_(mask)
        with torch.no_grad():
            m.weight = m.weight_orig * m.weight_mask  # refresh until the next forward
        achieved[name] = float((mask == 0).float().mean())
    names = masked_layers(model)
    wrappers = [w for w in meta.wrappers if w.get("name") != WRAPPER] + [{"name": WRAPPER, "options": {"layers": names}}]
    return model, meta.child(wrappers=wrappers), achieved


def sparsity_of(model: nn.Module) -> dict[str, Any]:
    """Zeros among masked weights, per layer and overall, and the count of non-zero parameters."""
    per = {}
    zeros = total = 0
    for n, m in model.named_modules():
        if hasattr(m, "weight_mask"):
            z = int((m.weight_mask == 0).sum())
            per[n] = z / max(1, m.weight_mask.numel())
            zeros += z
            total += m.weight_mask.numel()
    params = sum(p.numel() for n, p in model.named_parameters())
    return {"layers": per, "masked_fraction": zeros / max(1, total), "nonzero_params": int(params - zeros)}


def bake(model: nn.Module) -> nn.Module:
    """Make masks permanent (weight = weight_orig * mask as a plain parameter); in place."""
    mods = dict(model.named_modules())
    for n in masked_layers(model):
        tprune.remove(mods[n], "weight")
    return model
