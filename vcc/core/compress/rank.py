"""Channel importance rankings: Taylor (Molchanov 2017), AdapNet++'s oracle, L1/L2 filter norms.

A ranking holds one score per output channel of every prunable conv (classifiers excluded).
Saved as a ``vcc-ranking`` artefact: tensors keyed by conv name, a JSON doc with the method,
the model's sha256 and per-layer channel counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vcc.core.errors import ArtefactError, UsageError, VccError
from vcc.core.progress import ProgressFn

RANKING_FORMAT = "vcc-ranking"
DATA_METHODS = ("taylor", "oracle")
WEIGHT_METHODS = ("l1", "l2")


def weight_scores(model: nn.Module, layers: list[str], p: int) -> dict[str, torch.Tensor]:
    """L1 or L2 norm of every output filter of each conv in `layers` (Li et al. 2017)."""
    mods = dict(model.named_modules())
    return {n: mods[n].weight.detach().float().flatten(1).norm(p=p, dim=1).cpu() for n in layers}


def gradient_scores(model: nn.Module, meta: Any, data: Any, layers: list[str], method: str, *, batches: int = 8,
                    batch_size: int = 4, device: str = "cpu", seed: int = 0,
                    progress: ProgressFn | None = None) -> dict[str, torch.Tensor]:
    """First-order Taylor scores from activations x gradients of the conv outputs over training batches.

    taylor: per batch, |mean over (batch, time, space) of act*grad| per channel, averaged over
    batches, then L2-normalised per layer. oracle: the signed sum over batches of
    mean(act*grad), clipped at 0, divided by the layer maximum.
    """
    from vcc.core.data.loader import make_loader
    from vcc.core.training import check_classes, dataset_info, prepare_input, resolve_device

    if method not in DATA_METHODS:
        raise UsageError(f"method {method!r} does not use data")
    if batches < 1:
        raise UsageError(f"--batches must be >= 1, got {batches}")
    info = dataset_info(data)
    check_classes(meta, list(info.classes), data_name=f"dataset {info.name!r}")
    split = "train" if info.split("train") else "test"
    loader = make_loader(info, split, train=True, frames=meta.frames, size=meta.size, batch_size=batch_size, seed=seed)
    dev = resolve_device(device)
    model = model.to(dev)
    was_training = model.training
    model.eval()  # BN statistics untouched; gradients still flow
    mods = dict(model.named_modules())
    acts: dict[str, torch.Tensor] = {}
    sums: dict[str, torch.Tensor] = {n: torch.zeros(mods[n].out_channels, dtype=torch.float64) for n in layers}

    def hook(name: str):
        def fn(_m: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor:
            out.retain_grad()
            acts[name] = out
            return out.clone()  # a later in-place op (ReLU) must not change the kept activation

        return fn

    handles = [mods[n].register_forward_hook(hook(n)) for n in layers]
    done = 0
    try:
        while done < batches:
            for x, y, _ in loader:
                if done >= batches:
                    break
                x = prepare_input(x, dev, meta.mean, meta.std)
                y = y.to(dev)
                model.zero_grad(set_to_none=True)
                acts.clear()
                out = model(x)
                if isinstance(out, (list, tuple)):
                    out = out[-1]
                loss = nn.functional.cross_entropy(out, y)
                loss.backward()
                for n in layers:
                    a = acts.get(n)
                    if a is None or a.grad is None:
                        continue
                    dims = [d for d in range(a.dim()) if d != 1]
                    per_ch = (a.detach() * a.grad).mean(dim=dims).double().cpu()
                    sums[n] += per_ch.abs() if method == "taylor" else per_ch
                done += 1
                if progress:
                    progress("rank", done, batches, {"loss": float(loss.detach())})
            if done == 0:
                raise VccError("no batches to rank with")
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    out_scores: dict[str, torch.Tensor] = {}
    for n, s in sums.items():
        s = s / max(done, 1)
        if method == "taylor":
            s = s / (s.norm() + 1e-12)
        else:
            s = s.clamp(min=0)
            s = s / (s.max() + 1e-12) if s.max() > 0 else s
        out_scores[n] = s.float()
    return out_scores


def rank(model: nn.Module, meta: Any, method: str, *, data: Any = None, batches: int = 8, batch_size: int = 4,
         device: str = "cpu", ignore: list[str] | None = None, progress: ProgressFn | None = None,
         layers: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Scores per output channel of every prunable conv of `model` (a dict conv name -> 1-D tensor).

    `layers` (a Surgeon's ``prunable_layers()`` of this model) skips tracing the model again.
    """
    from vcc.core.compress.prune import prunable_layers

    method = method.lower()
    if method not in DATA_METHODS + WEIGHT_METHODS:
        raise UsageError(f"--method must be one of taylor, l1, l2, oracle, not {method!r}")
    if layers is None:
        layers = prunable_layers(model, meta, ignore)
    if method in WEIGHT_METHODS:
        return weight_scores(model, layers, 1 if method == "l1" else 2)
    if data is None:
        raise UsageError(f"--method {method} needs --data (it ranks with activations x gradients)")
    return gradient_scores(model, meta, data, layers, method, batches=batches, batch_size=batch_size,
                           device=device, progress=progress)


def layer_table(scores: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Per layer: channels, min, median, max score."""
    rows = []
    for name, s in scores.items():
        s = s.float()
        rows.append({
            "layer": name,
            "channels": int(s.numel()),
            "min": float(s.min()) if s.numel() else 0.0,
            "median": float(s.median()) if s.numel() else 0.0,
            "max": float(s.max()) if s.numel() else 0.0,
        })
    return rows


def save_ranking(path: str | Path, scores: dict[str, torch.Tensor], *, method: str, model_path: str | Path | None,
                 meta: Any, batches: int | None) -> Path:
    """Write a ``vcc-ranking`` artefact."""
    from vcc.core.artefact import sha256_file

    doc = {
        "format": RANKING_FORMAT,
        "method": method,
        "arch": meta.arch,
        "model_sha256": sha256_file(model_path) if model_path else None,
        "batches": batches,
        "layers": {k: int(v.numel()) for k, v in scores.items()},
    }
    return Path(_save(path, scores, doc))


def _save(path: str | Path, scores: dict[str, torch.Tensor], doc: dict[str, Any]) -> Path:
    from vcc.core.artefact import save_tensors

    return save_tensors(path, {k: v.float().contiguous() for k, v in scores.items()}, doc)


def load_ranking(path: str | Path, model: nn.Module | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a ranking; with `model`, check every scored layer exists with that many output channels."""
    from vcc.core.artefact import load_tensors

    tensors, doc = load_tensors(path, expect_format=RANKING_FORMAT)
    if model is not None:
        mods = dict(model.named_modules())
        for name, s in tensors.items():
            m = mods.get(name)
            if m is None or not hasattr(m, "out_channels"):
                raise ArtefactError(f"{path}: ranking scores layer {name!r}, which the model does not have")
            if int(m.out_channels) != s.numel():
                raise ArtefactError(f"{path}: ranking has {s.numel()} scores for {name}, the model has {m.out_channels} channels")
    return tensors, doc
