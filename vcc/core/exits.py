"""Early exits: internal classifiers (ICs) on any zoo CNN, progressive KD, fair MACs, a real runtime.

Method: Soufleri, Ravikumar, Roy, "Advancing Compressed Video Action Recognition through
Progressive Knowledge Distillation" (arXiv 2407.02713).

* The ``"exits"`` wrapper (:class:`MultiExit`) puts the backbone under ``backbone.`` and one IC
  (global pooling + linear) per chosen stage under ``heads.N``. Forward hooks on the stage modules
  feed the ICs, so any model whose stages are sub-modules run in order works unchanged.
  ``forward(x)`` is the backbone's own output (the last exit); ``forward_exits(x)`` lists all exits.
* :meth:`MultiExit.forward_early` really stops: a hook raises once an exit is confident, so the
  later stages never run (batch 1 in practice).
* Fair MACs: a sample leaving at exit k is charged everything it ran: the backbone up to stage k
  plus the heads of exits 1..k (passed exits included, whether they were right or wrong).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vcc.core.artefact import ModelMeta, load_model
from vcc.core.errors import UsageError, VccError
from vcc.core.models.registry import register_wrapper
from vcc.core.progress import ProgressFn
from vcc.core.workspace import atomic_path, model_stem

WRAPPER = "exits"
KD_MODES = ("ce", "progressive", "anti-progressive")
POOLS = ("avg", "max")


class _Stop(Exception):  # noqa: N818 - control flow, not an error
    """Raised inside a stage hook to abandon the rest of the forward pass."""

    def __init__(self, logits: torch.Tensor, index: int) -> None:
        super().__init__(index)
        self.logits = logits
        self.index = index


def global_pool(x: torch.Tensor, pool: str = "avg") -> torch.Tensor:
    """(N, C, ...) feature maps -> (N, C); (N, L, C) tokens -> (N, C) by pooling over L."""
    if x.dim() == 2:
        return x
    if x.dim() == 3:  # transformer tokens (N, L, C)
        return x.mean(1) if pool == "avg" else x.amax(1)
    flat = x.flatten(2)
    return flat.mean(2) if pool == "avg" else flat.amax(2)


class ExitHead(nn.Module):
    """An internal classifier: global pooling + linear."""

    def __init__(self, in_features: int, num_classes: int, pool: str = "avg") -> None:
        super().__init__()
        self.pool = pool
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(global_pool(x, self.pool))


class _StageHook:
    """Forward hook on a stage module; an object (not a closure) so deepcopy re-targets the copy."""

    def __init__(self, owner: MultiExit, index: int) -> None:
        self.owner = owner
        self.index = index

    def __call__(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        self.owner._on_stage(self.index, output)


def _feature_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise VccError(f"an exit stage returned {type(out).__name__}, not a tensor")


class MultiExit(nn.Module):
    """A backbone plus ICs after some of its stages; the backbone's classifier is the last exit."""

    def __init__(self, backbone: nn.Module, stages: Sequence[str], in_features: Sequence[int], num_classes: int, pool: str = "avg",
                 combine: Sequence[Sequence[float]] | torch.Tensor | None = None) -> None:
        super().__init__()
        if len(stages) != len(in_features):
            raise UsageError("exits: one in_features entry per stage is needed")
        self.backbone = backbone
        self.exit_stages = list(stages)
        self.pool = pool
        self.heads = nn.ModuleList([ExitHead(int(c), num_classes, pool) for c in in_features])
        # the exits' own ensemble weights (WISE, fitted by `vcc wise`): exit k outputs
        # sum_j combine[k, j] * logits_j; None: every exit outputs its own logits
        self.combine: torch.Tensor | None = None if combine is None else combine_matrix(combine, len(stages) + 1)
        self.freeze_backbone = False
        self._mode: str | None = None
        self._buf: list[torch.Tensor] = []
        self._threshold = 1.0
        self._combine: torch.Tensor | None = None
        modules = dict(backbone.named_modules())
        for i, name in enumerate(self.exit_stages):
            if name not in modules or not name:
                raise UsageError(f"exits: the backbone has no module {name!r}")
            modules[name].register_forward_hook(_StageHook(self, i))

    @property
    def num_exits(self) -> int:
        return len(self.heads) + 1

    def stages(self) -> list[str]:
        """The backbone's stages (so tools that look for stages still find them)."""
        fn = getattr(self.backbone, "stages", None)
        return list(fn()) if callable(fn) else list(self.exit_stages)

    def train(self, mode: bool = True) -> MultiExit:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # frozen: BatchNorm statistics must not move either
        return self

    def _on_stage(self, index: int, output: Any) -> None:
        if self._mode is None:
            return
        logits = self.heads[index](_feature_of(output))
        self._buf.append(logits)
        if self._mode == "collect":
            return
        out = _combined(self._buf, self._combine)
        if bool((F.softmax(out.float(), dim=1).amax(1) > self._threshold).all()):
            raise _Stop(out, index)

    def forward(self, x: torch.Tensor, all_exits: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """The backbone's logits; with `all_exits` the list of every exit's (goes through DDP too)."""
        if all_exits:
            return self.forward_exits(x)
        return self.backbone(x)

    def forward_exits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit, in order (ICs first, the backbone's classifier last)."""
        self._mode, self._buf = "collect", []
        try:
            final = self.backbone(x)
            outs = list(self._buf)
        finally:
            self._mode, self._buf = None, []
        if len(outs) != len(self.heads):
            raise VccError(f"exits: expected {len(self.heads)} stage outputs, saw {len(outs)} (a stage ran twice or not at all)")
        return [*outs, final]

    @torch.no_grad()
    def forward_early(self, x: torch.Tensor, threshold: float, combine: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """Run stage by stage; stop at the first exit whose max softmax > threshold (for every sample).

        `combine` (E, E), lower triangular, turns exit k's output into sum_j combine[k, j] * logits_j
        (WISE or constant ensembles); None means the model's own :attr:`combine` (the plain exits
        where it has none). Returns (logits, exit index).
        """
        self._mode, self._buf = "early", []
        self._threshold, self._combine = float(threshold), self.combine if combine is None else combine
        try:
            final = self.backbone(x)
            out = _combined([*self._buf, final], self._combine)
            return out, len(self.heads)
        except _Stop as stop:
            return stop.logits, stop.index
        finally:
            self._mode, self._buf, self._combine = None, [], None


def combine_matrix(weights: Sequence[Sequence[float]] | torch.Tensor, n_exits: int) -> torch.Tensor:
    """Ensemble weights as an (E, E) lower-triangular float32 matrix, from a matrix or from the
    ragged rows artefacts store (row k: the weights of exits 1..k+1). Checked: finite, E rows."""
    if isinstance(weights, torch.Tensor):
        rows = weights.detach().float().cpu().tolist()
    else:
        rows = [list(r) for r in weights]
    if len(rows) != n_exits:
        raise UsageError(f"exits: ensemble weights have {len(rows)} rows for {n_exits} exits")
    out = torch.zeros(n_exits, n_exits)
    for k, row in enumerate(rows):
        vals = [float(v) for v in row]
        if len(vals) < k + 1 or not all(math.isfinite(v) for v in vals):
            raise UsageError(f"exits: ensemble weights of exit {k + 1} must be {k + 1} finite numbers")
        if any(v != 0.0 for v in vals[k + 1:]):
            raise UsageError(f"exits: exit {k + 1}'s ensemble cannot weigh later exits")
        out[k, : k + 1] = torch.tensor(vals[: k + 1])
    return out


def combine_rows(matrix: torch.Tensor) -> list[list[float]]:
    """An (E, E) lower-triangular matrix as the ragged rows an artefact's metadata stores."""
    return [[float(v) for v in matrix[k, : k + 1].tolist()] for k in range(matrix.shape[0])]


def with_combine(meta: ModelMeta, weights: torch.Tensor | None) -> ModelMeta:
    """A copy of a multi-exit model's metadata whose exits carry these ensemble weights (None: none)."""
    wrappers = []
    for w in meta.wrappers:
        if w.get("name") == WRAPPER:
            opts = {k: v for k, v in dict(w.get("options") or {}).items() if k != "combine"}
            if weights is not None:
                opts["combine"] = combine_rows(combine_matrix(weights, len(opts["stages"]) + 1))
            w = {**w, "options": opts}
        wrappers.append(w)
    return meta.child(wrappers=wrappers)


def drop_combine(model: nn.Module, meta: ModelMeta) -> tuple[nn.Module, ModelMeta]:
    """Forget a multi-exit model's ensemble weights (training moves the logits they were fitted
    on; refit with `vcc wise`). Anything else passes through unchanged."""
    if not has_combine(meta):
        return model, meta
    if isinstance(model, MultiExit):
        model.combine = None
    return model, with_combine(meta, None)


def has_combine(meta: ModelMeta) -> bool:
    """Whether a multi-exit artefact carries ensemble weights (a `vcc wise` model)."""
    return is_multi_exit(meta) and exit_options(meta).get("combine") is not None


def _combined(outs: list[torch.Tensor], combine: torch.Tensor | None) -> torch.Tensor:
    k = len(outs) - 1
    if combine is None:
        return outs[k]
    w = combine[k].to(outs[k].device, outs[k].dtype)
    acc = outs[0] * w[0]
    for j in range(1, k + 1):
        acc = acc + outs[j] * w[j]
    return acc


@register_wrapper(WRAPPER)
def exits_wrapper(model: nn.Module, stages: Sequence[str], in_features: Sequence[int], num_classes: int, pool: str = "avg",
                  combine: Sequence[Sequence[float]] | None = None) -> MultiExit:
    """The registered ``"exits"`` wrapper: rebuilds a :class:`MultiExit` from its recorded options
    (`combine`: ensemble weights per exit, recorded by `vcc wise`)."""
    if pool not in POOLS:
        raise UsageError(f"exits: pool must be one of {', '.join(POOLS)}, not {pool!r}")
    return MultiExit(model, stages, in_features, num_classes, pool, combine)


# ---------------------------------------------------------------- attaching


def is_multi_exit(meta: ModelMeta) -> bool:
    """Whether an artefact's metadata carries the ``"exits"`` wrapper."""
    return any(w.get("name") == WRAPPER for w in meta.wrappers)


def exit_options(meta: ModelMeta) -> dict[str, Any]:
    """The options of the ``"exits"`` wrapper (stages, in_features, num_classes, pool)."""
    for w in meta.wrappers:
        if w.get("name") == WRAPPER:
            return dict(w.get("options") or {})
    raise UsageError("this model has no early exits (train some with `vcc train --init MODEL --exits auto`)")


def resolve_stages(model: nn.Module, exits: str | Sequence[str] = "auto") -> list[str]:
    """`auto` (every stage but the last) or a comma list / sequence of stage (module) names."""
    fn = getattr(model, "stages", None)
    known = list(fn()) if callable(fn) else []
    if isinstance(exits, str):
        if exits.strip() == "auto":
            if len(known) < 2:
                raise UsageError(f"{type(model).__name__} lists no stages for early exits; pass --exits MODULE,... explicitly")
            return known[:-1]
        names = [s.strip() for s in exits.split(",") if s.strip()]
    else:
        names = [str(s) for s in exits]
    if not names:
        raise UsageError("no exit stages given")
    modules = dict(model.named_modules())
    bad = [n for n in names if n not in modules or not n]
    if bad:
        hint = f"stages: {', '.join(known)}" if known else "use module names"
        raise UsageError(f"unknown exit stage(s) {', '.join(bad)} ({hint})")
    if len(set(names)) != len(names):
        raise UsageError("exit stages repeat")
    if known and known[-1] in names:  # the final classifier already reads the last stage
        raise UsageError(f"an exit after the last stage ({known[-1]}) would be the final classifier again at the same "
                         f"MACs; choose among {', '.join(known[:-1])}")
    return names


def _probe_input(meta: ModelMeta, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, *meta.input_shape)


def _probe_stages(model: nn.Module, names: Sequence[str], x: torch.Tensor) -> dict[str, tuple[int, int]]:
    """One eval-mode forward: for each named module that ran, (completion order, pooled width)."""
    from vcc.core.probe import probe_forward

    modules = dict(model.named_modules())
    seen: dict[str, tuple[int, int]] = {}

    def hook(_m: nn.Module, _i: Any, out: Any, n: str) -> None:
        if n not in seen:
            seen[n] = (len(seen), int(global_pool(_feature_of(out)).shape[1]))

    probe_forward(model, x, [(modules[n], functools.partial(hook, n=n)) for n in names])
    return seen


def attach_exits(model: nn.Module, meta: ModelMeta, exits: str | Sequence[str] = "auto", pool: str = "avg") -> tuple[MultiExit, ModelMeta]:
    """Wrap a plain model with fresh ICs after the chosen stages; returns (model, meta with wrapper)."""
    if is_multi_exit(meta) or isinstance(model, MultiExit):
        raise UsageError("this model already has early exits")
    if pool not in POOLS:
        raise UsageError(f"pool must be one of {', '.join(POOLS)}, not {pool!r}")
    names = resolve_stages(model, exits)
    device = next(iter(model.parameters())).device
    seen = _probe_stages(model, names, _probe_input(meta).to(device))
    missing = [n for n in names if n not in seen]
    if missing:
        raise UsageError(f"exit stage(s) {', '.join(missing)} never run in forward()")
    names = sorted(names, key=lambda n: seen[n][0])
    options = {"stages": names, "in_features": [seen[n][1] for n in names], "num_classes": int(meta.num_classes), "pool": pool}
    wrapped = exits_wrapper(model, **options)
    new_meta = meta.child(wrappers=[*meta.wrappers, {"name": WRAPPER, "options": options}])
    return wrapped, new_meta


# ---------------------------------------------------------------- MACs


def _leaf_macs(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, dict[str, int]]:
    """Total MACs of one (1, *input_shape) forward and MACs per leaf module name."""
    from vcc.core.macs import count_macs

    res = count_macs(model, tuple(input_shape), by_layer=True)
    return int(res.macs), {str(r["name"]): int(r["macs"]) for r in res.layers}


def head_macs(in_features: int, num_classes: int) -> int:
    """MACs of one IC: its linear layer (the global pooling is additions only)."""
    return int(in_features) * int(num_classes)


def ensemble_macs(cum_macs: Sequence[float], num_classes: int, ensemble: bool) -> list[float]:
    """Cumulative MACs per exit, plus the ensembles' weighted sums (k*C at exit k) when `ensemble`."""
    out, extra = [], 0
    for k, m in enumerate(cum_macs):
        if ensemble:
            extra += (k + 1) * num_classes
        out.append(float(m) + extra)
    return out


def exit_macs(model: nn.Module, meta: ModelMeta, ensemble: bool | None = None) -> list[dict[str, Any]]:
    """Cumulative MACs per exit for one clip: backbone up to the stage + heads 1..k (+ this head).

    The last exit (the backbone's classifier) is charged the whole backbone and every IC head.
    With `ensemble` (default: when the model carries its own weights, a `vcc wise` model) each
    exit also pays the weighted sums of the exits it ran (:func:`ensemble_macs`).
    """
    rows = exit_macs_and_backbone(model, meta)[0]
    if ensemble is None:
        ensemble = getattr(model, "combine", None) is not None
    if not ensemble:
        return rows
    charged = ensemble_macs([r["macs"] for r in rows], int(meta.num_classes), ensemble=True)
    return [{**r, "macs": int(m)} for r, m in zip(rows, charged, strict=True)]


def exit_macs_and_backbone(model: nn.Module, meta: ModelMeta) -> tuple[list[dict[str, Any]], int]:
    """:func:`exit_macs`'s rows and the backbone's own MACs (the model without ICs), counted once."""
    if not isinstance(model, MultiExit):
        raise UsageError("exit_macs needs a multi-exit model")
    backbone = model.backbone
    was_training = backbone.training
    backbone.eval()
    try:
        total, per_leaf = _leaf_macs(backbone, meta.input_shape)
        # Which leaves have finished when each stage finishes.
        modules = dict(backbone.named_modules())
        done: list[str] = []
        at_stage: dict[str, int] = {}
        handles = []
        def leaf_done(_m: nn.Module, _i: Any, _o: Any, n: str) -> None:
            done.append(n)

        def stage_done(_m: nn.Module, _i: Any, _o: Any, n: str) -> None:
            at_stage.setdefault(n, len(done))

        for n, m in modules.items():
            if n in per_leaf:
                handles.append(m.register_forward_hook(functools.partial(leaf_done, n=n)))
        for n in model.exit_stages:
            handles.append(modules[n].register_forward_hook(functools.partial(stage_done, n=n)))
        device = next(iter(backbone.parameters())).device
        try:
            with torch.no_grad():
                backbone(torch.zeros(1, *meta.input_shape, device=device))
        finally:
            for h in handles:
                h.remove()
    finally:
        backbone.train(was_training)
    rows: list[dict[str, Any]] = []
    heads_so_far = 0
    for i, stage in enumerate(model.exit_stages):
        ran = set(done[: at_stage[stage]])
        heads_so_far += head_macs(model.heads[i].fc.in_features, model.heads[i].fc.out_features)
        rows.append({"exit": i + 1, "stage": stage, "macs": int(sum(per_leaf[n] for n in ran) + heads_so_far)})
    rows.append({"exit": len(rows) + 1, "stage": "final", "macs": int(total + heads_so_far)})
    return rows, int(total)


def average_macs(exit_index: torch.Tensor | Sequence[int], cum_macs: Sequence[float]) -> float:
    """Fair average MACs: each sample pays the cumulative MACs of the exit it left at (0-based)."""
    idx = torch.as_tensor(exit_index, dtype=torch.long)
    if idx.numel() == 0:
        return 0.0
    table = torch.as_tensor([float(m) for m in cum_macs], dtype=torch.float64)
    return float(table[idx].mean())


# ---------------------------------------------------------------- training (progressive KD)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD, the same loss as `vcc train --teacher` (teacher detached)."""
    from vcc.core.training import kd_loss as _kd

    return _kd(student, teacher.detach(), temperature)


def teacher_schedule(kd: str, epochs: int, n_teachers: int, kd_epochs: Sequence[int] | None = None) -> list[int]:
    """Which teacher (0 = weakest ... n-1 = strongest) teaches in each epoch.

    progressive: weakest -> strongest, each for a span of epochs (`kd_epochs`, default equal
    spans); anti-progressive: strongest -> weakest with the spans reversed too; ce: no teacher (-1).
    """
    if kd not in KD_MODES:
        raise UsageError(f"--kd must be one of {', '.join(KD_MODES)}, not {kd!r}")
    if kd == "ce":
        return [-1] * epochs
    if kd_epochs:
        spans = [int(e) for e in kd_epochs]
        if len(spans) != n_teachers:
            raise UsageError(f"--kd-epochs needs {n_teachers} values (one per teacher, final classifier included), got {len(spans)}")
        if any(s < 0 for s in spans) or sum(spans) != epochs:
            raise UsageError(f"--kd-epochs must be non-negative and sum to --epochs ({epochs}), got {list(spans)}")
    else:
        base, rest = divmod(epochs, n_teachers)
        spans = [base + (1 if i >= n_teachers - rest else 0) for i in range(n_teachers)]  # extra epochs to the strongest
    order = list(range(n_teachers))
    if kd == "anti-progressive":
        order, spans = order[::-1], spans[::-1]
    out: list[int] = []
    for t, s in zip(order, spans, strict=True):
        out += [t] * s
    return out


def _renormalise(x: torch.Tensor, src: ModelMeta, dst: ModelMeta) -> torch.Tensor:
    if src.mean == dst.mean and src.std == dst.std:
        return x
    shape = (1, -1) + (1,) * (x.dim() - 2)
    sm, ss = torch.tensor(src.mean, device=x.device).view(shape), torch.tensor(src.std, device=x.device).view(shape)
    dm, ds = torch.tensor(dst.mean, device=x.device).view(shape), torch.tensor(dst.std, device=x.device).view(shape)
    return ((x * ss + sm) - dm) / ds


def exit_criterion(
    kd: str,
    schedule: list[int],
    teachers: Sequence[tuple[nn.Module, ModelMeta]] = (),
    student_meta: ModelMeta | None = None,
    temperature: float = 4.0,
    alpha: float = 0.5,
) -> Callable[[nn.Module, torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]:
    """The training loss of the ICs for `fit` (`criterion(model, x, y, epoch) -> (loss, logits)`).

    ce: mean CE of the ICs on labels. progressive / anti-progressive: per IC,
    alpha * KD(teacher of this epoch) + (1 - alpha) * CE. With external `teachers` (weakest
    first) the teacher list is those models then the backbone's classifier; without, teacher
    number p for IC i is exit min(i + 1 + p, last) of the model itself (its nearer, weaker later
    exits first, the final classifier last).
    """

    def criterion(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        outs = model(x, all_exits=True)  # through the call, so DDP / compile wrappers see it
        ics, final = outs[:-1], outs[-1].detach()
        if kd == "ce" or not schedule:
            loss = sum(F.cross_entropy(o, y) for o in ics) / len(ics)
            return loss, ics[-1]
        p = schedule[min(max(int(epoch), 0), len(schedule) - 1)]
        targets: list[torch.Tensor]
        if teachers:
            if p < len(teachers):
                tmodel, tmeta = teachers[p]
                with torch.no_grad():
                    xt = _renormalise(x, student_meta, tmeta) if student_meta is not None else x
                    t = tmodel(xt).detach()
            else:
                t = final
            targets = [t] * len(ics)
        else:
            targets = [outs[min(i + 1 + p, len(outs) - 1)].detach() for i in range(len(ics))]
        loss = sum(alpha * kd_loss(o, t, temperature) + (1 - alpha) * F.cross_entropy(o, y) for o, t in zip(ics, targets, strict=True)) / len(ics)
        return loss, ics[-1]

    return criterion


def collect_exit_logits(model: MultiExit, loader: Any, device: torch.device, meta: ModelMeta, progress: ProgressFn | None = None, task: str = "exit logits") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every exit's logits over a loader: (logits (E, clips, C) float32 CPU, labels, video_idx)."""
    from vcc.core.evaluate import predict

    return predict(model, loader, device, meta, progress=progress, task=task, all_exits=True)


def train_exits(
    init_path: str | Path,
    data: Any,
    cfg: Any,
    run_dir: str | Path,
    *,
    exits: str | Sequence[str] = "auto",
    kd: str = "progressive",
    teachers: Sequence[str | Path] | None = None,
    kd_epochs: Sequence[int] | None = None,
    kd_temperature: float = 4.0,
    progress: ProgressFn | None = None,
) -> Any:
    """Train ICs on the frozen backbone of `init_path`; the result is one multi-exit artefact.

    Teachers (progressive KD) are ordered weakest -> strongest: the given `teachers` then the
    backbone's own classifier; without `teachers`, each IC's later exits then the classifier.
    `kd_epochs` gives each teacher's span (must sum to cfg.epochs; default equal spans).
    Returns `fit`'s FitResult (model.safetensors in `run_dir`).
    """
    from vcc.core.training import fit, resolve_device

    if kd not in KD_MODES:
        raise UsageError(f"--kd must be one of {', '.join(KD_MODES)}, not {kd!r}")
    model, meta = load_model(init_path, device="cpu")
    model, meta = drop_combine(model, meta)
    if is_multi_exit(meta):
        opts = exit_options(meta)
        if exits not in ("auto", None) and resolve_stages(model.backbone, exits) != list(opts["stages"]):
            raise UsageError(f"{init_path} already has exits at {', '.join(opts['stages'])}")
    else:
        model, meta = attach_exits(model, meta, exits)
    from vcc.core.models import check_input

    check_input(model, int(cfg.frames or meta.frames), int(cfg.size or meta.size), meta.arch)
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    model.freeze_backbone = True
    device = resolve_device(getattr(cfg, "device", "cpu"))
    tmodels: list[tuple[nn.Module, ModelMeta]] = []
    for tp in teachers or []:
        tm, tmeta = load_model(tp, device=device)
        if tmeta.num_classes != meta.num_classes:
            raise UsageError(f"teacher {tp} has {tmeta.num_classes} classes, the model {meta.num_classes}")
        if tmeta.classes and meta.classes and list(tmeta.classes) != list(meta.classes):
            raise UsageError(f"teacher {tp} has different classes than the model")
        for q in tm.parameters():
            q.requires_grad_(False)
        tmodels.append((tm.eval(), tmeta))
    n_teachers = len(tmodels) + 1 if tmodels else len(model.heads)
    if kd_epochs and kd != "ce" and sum(int(e) for e in kd_epochs) != int(cfg.epochs):
        cfg = dataclasses.replace(cfg, epochs=sum(int(e) for e in kd_epochs))
    if getattr(cfg, "init", None) is None:
        cfg = dataclasses.replace(cfg, init=str(init_path))
    schedule = teacher_schedule(kd, int(cfg.epochs), n_teachers, kd_epochs if kd != "ce" else None)
    alpha = float(cfg.kd_alpha)
    criterion = exit_criterion(kd, schedule, tmodels, meta, kd_temperature, alpha)
    names = [str(t) for t in teachers or []]
    loaders, val = _exit_loaders(data, cfg)

    def epoch_hook(epoch: int, m: nn.Module) -> dict[str, Any]:
        p = schedule[min(max(int(epoch), 0), len(schedule) - 1)] if schedule else -1
        rec: dict[str, Any] = {"kd_teacher": _teacher_name(p, names, kd)}
        if val is not None:
            dev = next(iter(m.parameters())).device
            logits, labels, vidx = collect_exit_logits(m, val, dev, meta)
            rec["val_exit_top1"] = [round(video_top1(lg, labels, vidx), 6) for lg in logits]
        return rec

    meta.extra = {
        **meta.extra,
        "exits": {
            "kd": kd,
            "teachers": names,
            "kd_temperature": kd_temperature,
            "kd_alpha": alpha,
            "schedule": [_teacher_name(p, names, kd) for p in schedule],
        },
    }
    res = fit(
        model,
        meta,
        loaders,
        cfg,
        Path(run_dir),
        criterion=criterion,
        param_groups=[{"params": [p for p in model.heads.parameters()]}],
        epoch_hook=epoch_hook,
        progress=progress,
    )
    # The result is the ICs after the whole teacher schedule (the last epoch), as in the paper: the
    # loss changes with each teacher, so epochs are not comparable by it. best = model = last.
    for path in (res.model_path, res.best_path):
        with atomic_path(path) as tmp:
            shutil.copyfile(res.last_path, tmp)
    if res.history:
        res.best = dict(res.history[-1])
    res.selected_on = "last"
    return res


def video_top1(logits: torch.Tensor, labels: torch.Tensor, video_idx: torch.Tensor) -> float:
    """Video-level top-1 (clip softmax averaged per video)."""
    from vcc.core.evaluate import video_accuracy

    return float(video_accuracy(logits, labels, video_idx, topk=(1,))["video_top1"])


def _exit_loaders(data: Any, cfg: Any) -> tuple[Any, Any]:
    """fit's Loaders without validation (the frozen classifier's accuracy never changes) + our val loader."""
    from vcc.core.training import Loaders, _make_loaders

    loaders = _make_loaders(data, cfg, distributed=False, pin=False)
    return Loaders(loaders.train, None, loaders.classes, dataset=loaders.dataset), loaders.val


def _teacher_name(p: int, teachers: list[str], kd: str) -> str:
    if kd == "ce" or p < 0:
        return "labels"
    if teachers:
        return model_stem(teachers[p]) if p < len(teachers) else "final"
    return f"exit+{p + 1}"


# ---------------------------------------------------------------- runtime evaluation


def evaluate_early_exit(
    model: nn.Module,
    meta: ModelMeta,
    data: Any,
    *,
    threshold: float,
    split: str = "test",
    clips: int = 1,
    device: str | torch.device = "cpu",
    progress: ProgressFn | None = None,
    combine: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Run the early-exit runtime one clip at a time (batch 1) and measure what it saves.

    Returns accuracy (video top-1, clip probabilities averaged), clip_accuracy, latency_ms
    (median per clip) and latency_mean_ms, macs (fair average per clip) and macs_full, exits
    (per exit: stage, cumulative macs, share of clips), threshold, clips, videos.
    """
    from vcc.core.data.loader import make_loader
    from vcc.core.data.transforms import normalize

    if not isinstance(model, MultiExit):
        raise UsageError("--threshold needs a multi-exit model (train one with `vcc train --init MODEL --exits auto`)")
    if not (math.isfinite(threshold) and threshold >= 0):
        raise UsageError(f"threshold must be >= 0, got {threshold}")
    from vcc.core.training import dataset_info, resolve_device

    dev = resolve_device(device)
    info = dataset_info(data)
    model = model.to(dev).eval()
    if combine is None:
        combine = model.combine  # a `vcc wise` model's own ensemble weights, if any
    table = exit_macs(model, meta, ensemble=combine is not None)  # the ensembles' weighted sums are work too
    if dev.type == "cpu":  # timed in the form `vcc eval` times plain models in (vcc.core.inference)
        from vcc.core.inference import fold_batchnorm, select_cpu_kernels

        model = fold_batchnorm(model)
        select_cpu_kernels(model, _probe_input(meta))
    cum = [r["macs"] for r in table]
    loader = make_loader(info, split, train=False, frames=meta.frames, size=meta.size, batch_size=1, clips=clips)
    n_total = len(loader.dataset) if hasattr(loader, "dataset") else None
    probs: dict[int, torch.Tensor] = {}
    labels: dict[int, int] = {}
    exit_idx: list[int] = []
    times: list[float] = []
    clip_correct = 0
    cuda = dev.type == "cuda"
    from vcc.core.evaluate import latency_context
    from vcc.core.sysinfo import CpuContention

    with CpuContention() as contention:  # timed on a busy machine? (noted, not hidden)
        for n, (x, y, vid) in enumerate(loader):
            x = normalize(x.to(dev), meta.mean, meta.std)
            if cuda:
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            logits, k = model.forward_early(x, threshold, combine)
            if cuda:
                torch.cuda.synchronize(dev)
            times.append((time.perf_counter() - t0) * 1000.0)
            exit_idx.append(k)
            p = F.softmax(logits.float(), 1)[0].cpu()
            v = int(vid[0])
            probs[v] = probs.get(v, 0) + p
            labels[v] = int(y[0])
            clip_correct += int(int(p.argmax()) == int(y[0]))
            if progress:
                progress("early exit", n + 1, n_total, {"exit": k + 1})
    if not exit_idx:
        raise VccError(f"split {split!r} has no videos")
    correct = sum(int(int(probs[v].argmax()) == labels[v]) for v in probs)
    counts = torch.bincount(torch.tensor(exit_idx), minlength=len(cum)).tolist()
    times_t = torch.tensor(times)
    return {
        "threshold": float(threshold),
        "accuracy": correct / len(probs),
        "clip_accuracy": clip_correct / len(exit_idx),
        "latency_ms": float(times_t.median()),
        "latency_mean_ms": float(times_t.mean()),
        **latency_context(dev, contention.others),
        "macs": average_macs(exit_idx, cum),
        "macs_full": int(cum[-1]),
        "ensemble": combine is not None,
        "videos": len(probs),
        "clips": len(exit_idx),
        "exits": [{**row, "macs": m, "share": c / len(exit_idx)} for row, m, c in zip(table, cum, counts, strict=True)],
    }
