"""Structured (channel) pruning of video CNNs on Torch-Pruning's DepGraph.

The surgery never hand-codes an arch: a :class:`Surgeon` traces the model with DepGraph, finds
the classifier(s) from the graph's outputs (their outputs are never pruned), splits every
prunable output channel into *coupled channel groups* (channels that must go together because
of residual adds, depthwise convs, BN, concats), and removes whole groups' channels.

Hara et al.'s parameter-free shortcut A (``ShortcutA``: subsample, then zero-pad
``pad_channels``) is traced through a stand-in whose zero padding is an explicit parameter
concatenated to the input, so DepGraph sees which output channels of the residual add come
from the block input and which from padding; after pruning, ``pad_channels`` is set to what is
left of the padding and the original module is put back (outputs are unchanged).
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vcc.core.errors import UsageError, VccError, first_line
from vcc.core.progress import ProgressFn

METHODS = ("taylor", "l1", "l2", "oracle")


# ---------------------------------------------------------------- shortcut A stand-in


class _TracedShortcutA(nn.Module):
    """ShortcutA with its zero padding as a parameter, so DepGraph can map padded channels."""

    def __init__(self, orig: nn.Module) -> None:
        super().__init__()
        self.orig = orig
        self.stride = int(orig.stride)
        self.pad = nn.Parameter(torch.zeros(1, int(orig.pad_channels), 1, 1, 1))
        self.cat_grad_fn: Any = None
        self.in_channels_seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            # a 1-wide average pool is exactly x[:, :, ::s, ::s, ::s], but an op DepGraph treats
            # as element-wise (a strided slice would be mistaken for a channel slice)
            x = nn.functional.avg_pool3d(x, kernel_size=1, stride=self.stride)
        self.in_channels_seen = x.shape[1]
        if self.pad.shape[1] == 0:
            return x
        n, _, t, h, w = x.shape
        out = torch.cat([x, x.new_zeros(n, self.pad.shape[1], t, h, w) + self.pad], dim=1)
        self.cat_grad_fn = out.grad_fn
        return out

    def restore(self) -> nn.Module:
        self.orig.pad_channels = int(self.pad.shape[1])
        return self.orig


def _swap_shortcuts(model: nn.Module) -> list[_TracedShortcutA]:
    from vcc.core.models.resnet3d import ShortcutA

    swapped = []
    for mod in list(model.modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, ShortcutA):
                traced = _TracedShortcutA(child)
                setattr(mod, cname, traced)
                swapped.append(traced)
    return swapped


def _restore_shortcuts(model: nn.Module) -> None:
    for mod in list(model.modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, _TracedShortcutA):
                setattr(mod, cname, child.restore())


# ---------------------------------------------------------------- groups


@dataclass
class ChannelGroup:
    """Output channels that must be removed together.

    ``root`` is the conv the group was traced from; ``channels`` are the root's *original*
    output-channel indices; ``members[conv][j]`` is the output channel of `conv` coupled with
    ``channels[j]`` (convs only; BN, adds and padding follow automatically).
    """

    root: str
    channels: list[int]
    members: dict[str, list[int]] = field(default_factory=dict)
    inputs: dict[str, list[int]] = field(default_factory=dict)  # layer -> input channels lost per root channel
    norms: dict[str, list[int]] = field(default_factory=dict)  # batch norms: channel per root channel

    @property
    def size(self) -> int:
        return len(self.channels)


def _is_conv(m: Any) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd)


def _is_param_layer(m: Any) -> bool:
    return isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))


class Surgeon:
    """DepGraph surgery on one model (modified in place). Build, inspect ``groups``, ``prune``."""

    def __init__(self, model: nn.Module, example: torch.Tensor, ignore: list[str] | None = None) -> None:
        import torch_pruning as tp

        self.tp = tp
        self.model = model
        self.shortcuts = _swap_shortcuts(model)
        self.names = {m: n for n, m in model.named_modules()}
        self.modules = dict(model.named_modules())
        was_training = model.training
        model.eval()
        # DepGraph's trace is a forward pass: record each layer's output positions on the way
        self._positions: dict[str, int] = {}
        hooks = [m.register_forward_hook(functools.partial(self._record_positions, name=n))
                 for n, m in self.modules.items() if _is_param_layer(m)]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with torch.enable_grad():
                    self.DG = tp.DependencyGraph().build_dependency(
                        model,
                        example_inputs=example,
                        unwrapped_parameters=[(s.pad, 1) for s in self.shortcuts if s.pad.shape[1] > 0],
                        verbose=False,
                    )
        except Exception as exc:
            _restore_shortcuts(model)
            raise VccError(f"the dependency graph cannot trace {type(model).__name__}: {first_line(exc, 300)}") from exc
        finally:
            for h in hooks:
                h.remove()
            model.train(was_training)
        self._fix_shortcut_concats()
        self.classifiers = self._find_classifiers()
        self.ignored = ignored_layers([n for n, m in self.modules.items() if _is_param_layer(m)], ignore)
        self.ignored |= set(self.classifiers)
        # current position of every original output channel, per module
        self._orig_index: dict[str, list[int]] = {}
        for name, m in self.modules.items():
            if _is_param_layer(m):
                self._orig_index[name] = list(range(_out_channels(m)))
        self.groups = self._channel_groups()

    # -- tracing helpers

    def _fix_shortcut_concats(self) -> None:
        """Give the padding concats their true sizes (DepGraph's shape inference guesses)."""
        from torch_pruning.dependency import index_mapping

        by_fn = {s.cat_grad_fn: s for s in self.shortcuts if s.cat_grad_fn is not None}
        for mod, node in self.DG.module2node.items():
            if node.type == self.tp.ops.OPTYPE.CONCAT and node.grad_fn in by_fn:
                s = by_fn[node.grad_fn]
                mod.concat_sizes = [int(s.in_channels_seen), int(s.pad.shape[1])]
        index_mapping.update_index_mapping(self.DG)

    def _find_classifiers(self) -> list[str]:
        """Conv/linear layers whose outputs reach a model output without another such layer."""
        found: list[str] = []
        stack = [n for n in self.DG.module2node.values() if not n.outputs]
        seen = set()
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if _is_param_layer(node.module):
                found.append(self.names[node.module])
                continue
            stack.extend(node.inputs)
        return sorted(set(found))

    def _channel_groups(self) -> list[ChannelGroup]:
        """Partition prunable output channels into coupled groups (channel-level, so a layer whose
        first channels are tied to an earlier stage by shortcut A still has its others pruned)."""
        covered: dict[str, set[int]] = {}
        groups: list[ChannelGroup] = []
        for m in list(self.DG.module2node):
            if not _is_conv(m) and not isinstance(m, nn.Linear):
                continue
            name = self.names.get(m)
            if name is None or name in self.ignored:
                continue
            n_out = _out_channels(m)
            free = sorted(set(range(n_out)) - covered.get(name, set()))
            if not free:
                continue
            group = self.DG.get_pruning_group(m, self._out_fn(m), free)
            members: dict[str, dict[int, int]] = {}
            inputs: dict[str, dict[int, int]] = {}
            norms: dict[str, dict[int, int]] = {}
            blocked = False
            for item in group:
                dep, idxs = item.dep, item.idxs
                tm = dep.target.module
                tname = self.names.get(tm) if isinstance(tm, nn.Module) else None
                if tname is None:
                    continue
                if not self.DG.is_out_channel_pruning_fn(dep.handler):
                    if _is_param_layer(tm) and self.DG.is_in_channel_pruning_fn(dep.handler):
                        imap = inputs.setdefault(tname, {})
                        for r in item.root_idxs:
                            imap[int(r)] = imap.get(int(r), 0) + 1
                    continue
                if isinstance(tm, nn.modules.batchnorm._BatchNorm):
                    nmap = norms.setdefault(tname, {})
                    for i, r in zip(idxs, item.root_idxs, strict=False):
                        nmap[int(r)] = int(i)
                if _is_param_layer(tm):
                    covered.setdefault(tname, set()).update(idxs)
                    if tname in self.ignored:
                        blocked = True
                    if _is_conv(tm) or isinstance(tm, nn.Linear):
                        rmap = members.setdefault(tname, {})
                        for i, r in zip(idxs, item.root_idxs, strict=False):
                            rmap[int(r)] = int(i)
            if blocked:
                continue
            groups.append(
                ChannelGroup(
                    root=name,
                    channels=free,
                    members={k: [v.get(r, -1) for r in free] for k, v in members.items()},
                    inputs={k: [v.get(r, 0) for r in free] for k, v in inputs.items()},
                    norms={k: [v.get(r, -1) for r in free] for k, v in norms.items()},
                )
            )
        return groups

    def _out_fn(self, m: nn.Module):
        return self.DG.get_pruner_of_module(m).prune_out_channels

    # -- MAC estimates (conv/linear MACs from shapes; no surgery needed)

    def _record_positions(self, mod: nn.Module, _i: Any, out: Any, name: str) -> None:
        if isinstance(out, torch.Tensor):
            self._positions[name] = out.numel() // max(1, _out_channels(mod))

    @property
    def positions(self) -> dict[str, int]:
        """Output positions (N*T*H*W, or rows for linear) per conv/linear, recorded by the trace's forward pass."""
        return self._positions

    def prunable_layers(self) -> list[str]:
        """Names of convs whose output channels can be ranked and pruned (not classifiers), in module order."""
        names = set()
        for g in self.groups:
            names.update(k for k in g.members if _is_conv(self.modules[k]))
        return [n for n in self.modules if n in names]

    def estimate_macs(self, removals: dict[int, list[int]]) -> int:
        """Conv + linear MACs (at the traced input) after removing `removals`."""
        out_lost: dict[str, int] = {}
        in_lost: dict[str, int] = {}
        for gi, chans in removals.items():
            g = self.groups[gi]
            sel = set(chans)
            js = [j for j, c in enumerate(g.channels) if c in sel]
            for conv, idxs in g.members.items():
                out_lost[conv] = out_lost.get(conv, 0) + sum(1 for j in js if idxs[j] >= 0)
            for layer, counts in g.inputs.items():
                in_lost[layer] = in_lost.get(layer, 0) + sum(counts[j] for j in js)
        total = 0
        for name, p in self._positions.items():
            m = self.modules[name]
            if _is_conv(m):
                cout, cin, groups = m.out_channels, m.in_channels, m.groups
                kvol = int(torch.tensor(m.kernel_size).prod())
                o = cout - out_lost.get(name, 0)
                if groups == cout == cin and groups > 1:  # depthwise: inputs follow outputs
                    total += p * o * kvol
                else:
                    i = cin - in_lost.get(name, 0)
                    total += p * o * (i // groups if groups > 1 else i) * kvol
            else:
                total += p * (m.out_features - out_lost.get(name, 0)) * (m.in_features - in_lost.get(name, 0))
        return int(total)

    # -- surgery

    def prune(self, removals: dict[int, list[int]]) -> None:
        """Remove, per group index, the given original root channels. Restores shortcut A."""
        try:
            for gi, chans in removals.items():
                if not chans:
                    continue
                g = self.groups[gi]
                root = self.modules[g.root]
                pos = self._orig_index[g.root]
                cur = sorted(pos.index(c) for c in chans)
                if len(cur) >= len(pos):
                    raise VccError(f"refusing to remove every output channel of {g.root}")
                try:
                    group = self.DG.get_pruning_group(root, self._out_fn(root), cur)
                    for item in group:
                        tm = item.dep.target.module
                        if isinstance(tm, nn.Module) and _is_param_layer(tm) and self.DG.is_out_channel_pruning_fn(item.dep.handler):
                            tname = self.names[tm]
                            keep = set(range(len(self._orig_index[tname]))) - set(item.idxs)
                            self._orig_index[tname] = [self._orig_index[tname][i] for i in sorted(keep)]
                    group.prune()
                except VccError:
                    raise
                except Exception as exc:
                    raise VccError(f"cannot prune layer {g.root}: {first_line(exc, 300)}") from exc
        finally:
            self.finish()

    def finish(self) -> None:
        """Put the original shortcut modules back."""
        _restore_shortcuts(self.model)


def _out_channels(m: nn.Module) -> int:
    return int(m.out_channels if _is_conv(m) else m.out_features)


# ---------------------------------------------------------------- helpers on models


def clone(model: nn.Module) -> nn.Module:
    """copy.deepcopy that also works on masked models (their computed `weight` is detached first)."""
    for m in model.modules():
        w = getattr(m, "weight", None) if hasattr(m, "weight_mask") else None
        if isinstance(w, torch.Tensor) and not w.is_leaf:
            m.weight = w.detach()
    return copy.deepcopy(model)


def example_input(meta: Any, batch: int = 1) -> torch.Tensor:
    """A random input of the model's recorded input spec."""
    return torch.randn(batch, *meta.input_shape)


def check_prunable(meta: Any) -> None:
    """Refuse models whose wrappers structured pruning cannot rebuild."""
    names = [w.get("name") for w in meta.wrappers]
    if names:
        hint = {
            "masks": "run `vcc port` first to bake the masks",
            "vib": "run `vcc port` first to make it dense",
            "exits": "prune the backbone before adding early exits",
        }
        raise UsageError(f"cannot channel-prune a model with wrappers {names}: {hint.get(names[0], 'remove them first')}")


def ignored_layers(names: list[str], patterns: list[str] | None) -> set[str]:
    """The layer names matching any --ignore glob, or inside a module it names ('layer4' = 'layer4.*').

    A pattern that matches no layer is a UsageError: a typo would otherwise prune what it meant to keep.
    """
    out: set[str] = set()
    for p in patterns or []:
        hit = {n for n in names if n and (fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(n, p + ".*"))}
        if not hit:
            shown = ", ".join([n for n in names if n][:4])
            raise UsageError(f"--ignore {p!r} matches no layer (names look like {shown}, ...; see `vcc macs MODEL --by-layer`)")
        out |= hit
    return out


def prunable_layers(model: nn.Module, meta: Any, ignore: list[str] | None = None) -> list[str]:
    """Names of convs whose output channels can be ranked and pruned (not classifiers)."""
    s = probe_surgeon(model, meta, ignore)
    s.finish()
    return s.prunable_layers()


def count_macs(model: nn.Module, meta: Any) -> tuple[int, int]:
    """(MACs, params) at the model's input spec, via vcc.core.macs.count_macs."""
    from vcc.core.macs import count_macs as _count

    res = _count(model, input_shape=meta.input_shape, by_layer=False)
    return int(res.macs), int(res.params)


# ---------------------------------------------------------------- planning


def group_scores(groups: list[ChannelGroup], scores: dict[str, torch.Tensor], normalise: bool) -> list[torch.Tensor]:
    """Per group, one score per root channel: the mean over coupled convs of their channel scores.

    With `normalise` (global ranking), each layer's scores are first divided by their mean, so
    that every layer is judged relative to itself: raw L1 norms and L2-normalised Taylor scores
    both shrink with layer width and would otherwise empty the widest layers first.
    """
    out = []
    for g in groups:
        total = torch.zeros(g.size, dtype=torch.float64)
        count = torch.zeros(g.size, dtype=torch.float64)
        for conv, idxs in g.members.items():
            if conv not in scores:
                continue
            s = scores[conv].detach().double().flatten()
            if normalise:
                s = s / (s.mean() + 1e-12)
            for j, i in enumerate(idxs):
                if 0 <= i < s.numel():
                    total[j] += s[i]
                    count[j] += 1
        out.append(torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total)))
    return out


def plan(groups: list[ChannelGroup], gscores: list[torch.Tensor], ratio: float, scope: str,
         cumulative_of: list[int] | None = None, round_to: int = 1) -> dict[int, list[int]]:
    """Which root channels to remove per group to prune `ratio` of the channels.

    `cumulative_of` (per group, the channel count the ratio refers to, e.g. the original one)
    defaults to the current group sizes. Every group keeps at least one channel. With
    `round_to` N > 1, every group keeps a multiple of N channels (rounded up, never more than
    it has): CPU and GPU conv kernels run faster on such widths than on odd ones.
    """
    base = cumulative_of or [g.size for g in groups]
    removals: dict[int, list[int]] = {}
    if scope == "layer":
        for gi, (g, s) in enumerate(zip(groups, gscores, strict=True)):
            keep = max(1, int(round(base[gi] * (1 - ratio))))
            k = max(0, g.size - keep)
            if k:
                order = torch.argsort(s, stable=True)[:k].tolist()
                removals[gi] = [g.channels[j] for j in order]
        return _round_removals(groups, gscores, removals, round_to)
    if scope != "global":
        raise UsageError(f"--scope must be global or layer, not {scope!r}")
    total_base = sum(base)
    current = sum(g.size for g in groups)
    k = current - int(round(total_base * (1 - ratio)))
    if k <= 0:
        return {}
    pool = [(float(s[j]), gi, j) for gi, s in enumerate(gscores) for j in range(len(s))]
    pool.sort(key=lambda t: (t[0], t[1], t[2]))
    left = [g.size for g in groups]
    for _, gi, j in pool:
        if k <= 0:
            break
        if left[gi] <= 1:
            continue
        removals.setdefault(gi, []).append(groups[gi].channels[j])
        left[gi] -= 1
        k -= 1
    return _round_removals(groups, gscores, removals, round_to)


def _round_removals(groups: list[ChannelGroup], gscores: list[torch.Tensor], removals: dict[int, list[int]],
                    round_to: int) -> dict[int, list[int]]:
    """Give back each group's best-scored removed channels until it keeps a multiple of `round_to`."""
    if round_to <= 1:
        return removals
    out: dict[int, list[int]] = {}
    for gi, removed in removals.items():
        g = groups[gi]
        keep = g.size - len(removed)
        want = min(g.size, -(-keep // round_to) * round_to)
        back = want - keep
        if back > 0:
            given = {c for _, c in _best_first(g, gscores[gi], removed)[:back]}
            removed = [c for c in removed if c not in given]
        if removed:
            out[gi] = removed
    return out


def _best_first(g: ChannelGroup, scores: torch.Tensor, channels: list[int]) -> list[tuple[float, int]]:
    """(score, channel) of `channels` (root channels of group `g`), best score first, ties by position."""
    pos = {c: j for j, c in enumerate(g.channels)}
    return sorted(((float(scores[pos[c]]), c) for c in channels), key=lambda t: (-t[0], pos[t[1]]))


# ---------------------------------------------------------------- one-shot pruning


@dataclass
class PruneOutcome:
    """A pruned copy of the model and what was done to it."""

    model: nn.Module
    ratio: float
    removed: dict[str, int]            # root conv -> channels removed
    macs: int
    params: int


def prune_channels(model: nn.Module, meta: Any, scores: dict[str, torch.Tensor], ratio: float, *,
                   scope: str = "global", ignore: list[str] | None = None,
                   ratio_of: dict[str, int] | None = None, round_to: int = 1, probe: Surgeon | None = None) -> PruneOutcome:
    """A copy of `model` with `ratio` of its prunable channels removed (lowest scores first).

    `ratio_of` maps group roots to the channel counts the ratio refers to (iterative pruning
    passes the original model's; default the current ones). `probe` (:func:`probe_surgeon` of
    this very model) saves a trace and is consumed.
    """
    if not 0.0 <= ratio < 1.0:
        raise UsageError(f"--ratio must be in (0, 1), got {ratio}")
    s = probe or probe_surgeon(model, meta, ignore)
    if not s.groups:
        s.finish()
        raise VccError(f"{meta.arch}: no prunable channels found (everything is a classifier or ignored)")
    gscores = group_scores(s.groups, scores, normalise=(scope == "global"))
    base = _ratio_bases(s.groups, ratio_of)
    return _cut(s, meta, plan(s.groups, gscores, ratio, scope, base, round_to), base)


def _ratio_bases(groups: list[ChannelGroup], ratio_of: dict[str, int] | None) -> list[int]:
    """Per group, the channel count a ratio refers to: `ratio_of`'s (the original model's) or its own."""
    return [max(g.size, (ratio_of or {}).get(g.root, g.size)) for g in groups]


def _cut(s: Surgeon, meta: Any, removals: dict[int, list[int]], base: list[int]) -> PruneOutcome:
    """Remove `removals` from Surgeon `s`'s model (in place), check and measure it.

    The outcome's ratio is the share of `base`'s channels gone afterwards (this cut's and earlier ones').
    """
    removed = {s.groups[gi].root: len(ch) for gi, ch in removals.items() if ch}
    left = sum(g.size for g in s.groups) - sum(removed.values())
    s.prune(removals)
    _check_forward(s.model, meta)
    macs, params = count_macs(s.model, meta)
    return PruneOutcome(s.model, round(1 - left / max(1, sum(base)), 6), removed, macs, params)


def _give_back(groups: list[ChannelGroup], gscores: list[torch.Tensor], removals: dict[int, list[int]],
               fits: Callable[[dict[int, list[int]]], bool], round_to: int = 1) -> dict[int, list[int]]:
    """Restore removed channels, best-scored first, while `fits(removals)` still holds.

    Global ranking removes whole channels, and one channel of a wide-input layer (a stem's) can be
    worth 5% of the MACs: the fewest removals that meet a MACs target overshoot it by up to that
    much. Giving back what still fits lands just under the target. Within a group the channels
    cost (all but) the same MACs, so a group's channels go back in score order (`round_to` at a
    time, so it keeps a multiple) and its first one that does not fit ends its turn.
    """
    step = max(1, round_to)
    out = {gi: list(ch) for gi, ch in removals.items()}
    queues: dict[int, list[tuple[float, set[int]]]] = {}  # per group: (best score, chunk), best first
    for gi, removed in out.items():
        best = _best_first(groups[gi], gscores[gi], removed)
        queues[gi] = [(best[i][0], {c for _, c in best[i:i + step]}) for i in range(0, len(best), step)]
    while queues:
        gi = max(queues, key=lambda g: (queues[g][0][0], -g))  # the best next chunk of any group goes first
        chunk = queues[gi].pop(0)[1]
        trial = {**out, gi: [c for c in out[gi] if c not in chunk]}
        if fits({g: ch for g, ch in trial.items() if ch}):
            out = trial
        else:
            queues[gi] = []
        if not queues[gi]:
            del queues[gi]
    return {gi: ch for gi, ch in out.items() if ch}


def _check_forward(model: nn.Module, meta: Any) -> None:
    with torch.no_grad():
        try:
            out = model.eval()(example_input(meta))
        except Exception as exc:
            raise VccError(f"{meta.arch}: pruned model does not run ({first_line(exc, 300)})") from exc
    if tuple(out.shape) != (1, meta.num_classes):
        raise VccError(f"{meta.arch}: pruned model outputs {tuple(out.shape)}, expected (1, {meta.num_classes})")


def _unreachable(meta: Any, target: float, least: float, round_to: int) -> VccError:
    floor = "one channel" if round_to <= 1 else f"{round_to} channels (--round-to {round_to})"
    return VccError(
        f"MACs target {target:g} is unreachable for {meta.arch}: even keeping {floor} per group leaves "
        f"{least:.3f} of the MACs (the rest is in layers that cannot be pruned)"
    )


def probe_surgeon(model: nn.Module, meta: Any, ignore: list[str] | None = None) -> Surgeon:
    """A traced Surgeon on a CPU copy of `model`: inspect it, or hand it to :func:`check_macs_target`
    and :func:`prune_to_macs` so one trace serves a whole prune step (its copy keeps the traced
    shortcut stand-ins until it is pruned; the copy is never `model`)."""
    return Surgeon(clone(model).cpu().eval(), example_input(meta), ignore)


def check_macs_target(model: nn.Module, meta: Any, target: float, ignore: list[str] | None = None, round_to: int = 1,
                      *, probe: Surgeon | None = None) -> None:
    """VccError when keeping one channel (or `round_to`) in every prunable group still leaves more than `target` of the MACs.

    Needs no scores or data, so `vcc prune` checks it before evaluating and ranking anything.
    `probe` (from :func:`probe_surgeon` on this model) saves a trace; it is only read.
    """
    cur_macs, _ = count_macs(model, meta)
    s = probe or probe_surgeon(model, meta, ignore)
    other = cur_macs - s.estimate_macs({})
    keep = max(1, round_to)
    least = other + s.estimate_macs({gi: list(g.channels[keep:]) for gi, g in enumerate(s.groups) if g.size > keep})
    if least > target * cur_macs:
        raise _unreachable(meta, target, least / cur_macs, round_to)


def prune_to_macs(model: nn.Module, meta: Any, scores: dict[str, torch.Tensor], target: float, *,
                  scope: str = "global", ignore: list[str] | None = None, base_macs: int | None = None,
                  ratio_of: dict[str, int] | None = None, round_to: int = 1, tol: float = 1e-3,
                  progress: ProgressFn | None = None, probe: Surgeon | None = None) -> PruneOutcome:
    """Prune until MACs <= `target` x `base_macs` (default: the model's own MACs).

    The ratio is found by bisection on a MAC estimate computed from layer shapes (no surgery per
    probe); with global scope the removed channels that still fit are given back, best first
    (:func:`_give_back`), so the result lands just under the goal, not a stem channel's worth
    below it. Then the model is pruned once and measured with count_macs; if the measured MACs
    still miss the goal the ratio is nudged up. `probe` (:func:`probe_surgeon` of this very model,
    not yet pruned) saves a trace; it is consumed (its copy becomes the pruned model).
    """
    if not 0.0 < target < 1.0 + 1e-9:
        raise UsageError(f"--target-macs must be in (0, 1), got {target}")
    cur_macs, cur_params = count_macs(model, meta)
    if base_macs is None:
        base_macs = cur_macs
    goal = target * base_macs
    if cur_macs <= goal:
        return PruneOutcome(clone(model).cpu().eval(), 0.0, {}, cur_macs, cur_params)
    # the probe plans the ratio, then is pruned itself by the first attempt (its tracing is reused)
    probe = probe or probe_surgeon(model, meta, ignore)
    est0 = probe.estimate_macs({})
    other = cur_macs - est0  # MACs outside conv/linear weights (if any), assumed fixed
    gscores = group_scores(probe.groups, scores, normalise=(scope == "global"))
    base = _ratio_bases(probe.groups, ratio_of)

    def est(r: float) -> int:
        return other + probe.estimate_macs(plan(probe.groups, gscores, r, scope, base, round_to))

    hi = 0.999
    least = est(hi)
    if least > goal:
        probe.finish()
        raise _unreachable(meta, target, least / base_macs, round_to)
    lo = 0.0
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if est(mid) <= goal:
            hi = mid
        else:
            lo = mid
    r = hi
    for attempt in range(6):
        s = probe if attempt == 0 else probe_surgeon(model, meta, ignore)
        removals = plan(s.groups, gscores, r, scope, base, round_to)
        if scope == "global":  # per-layer scope keeps its one ratio for every layer
            removals = _give_back(s.groups, gscores, removals, lambda rm, s=s: other + s.estimate_macs(rm) <= goal, round_to)
        out = _cut(s, meta, removals, base)
        if progress:
            progress("target MACs", attempt + 1, None, {"ratio": round(r, 4), "macs": round(out.macs / base_macs, 4)})
        if out.macs <= goal or r >= 0.999:
            break
        r = min(0.999, r + max(tol, (1 - r) * 0.02))
    if out.macs > goal:
        raise VccError(f"MACs target {target:g} is unreachable for {meta.arch}: got {out.macs / base_macs:.3f} at ratio {r:.3f}")
    return out


# ---------------------------------------------------------------- the whole `vcc prune` job


@dataclass
class PruneJob:
    """Options of :func:`prune_model` (see `vcc prune --help`)."""

    method: str = "taylor"
    ratio: float | None = None
    target_macs: float | None = None
    scope: str = "global"
    steps: int = 1
    finetune_epochs: int = 0
    ignore: list[str] = field(default_factory=list)
    ranking: str | None = None
    batches: int = 8
    sparsity: float | None = None
    sparsity_csv: str | None = None
    eval_clips: int = 1
    latency_runs: int = 10
    round_to: int = 1
    train: Any = None  # a TrainConfig for finetuning (epochs is replaced by finetune_epochs)

    def validate(self) -> None:
        m = self.method
        if m == "magnitude":
            if (self.sparsity is None) == (self.sparsity_csv is None):
                raise UsageError("--method magnitude needs exactly one of --sparsity S or --sparsity-csv FILE")
            if self.sparsity is not None and not 0.0 < self.sparsity < 1.0:
                raise UsageError(f"--sparsity must be in (0, 1), got {self.sparsity}")
        else:
            if m not in METHODS:
                raise UsageError(f"--method must be one of {', '.join(METHODS)}, magnitude or vib, not {m!r}")
            if (self.ratio is None) == (self.target_macs is None):
                raise UsageError("give exactly one of --ratio R or --target-macs F")
            if self.ratio is not None and not 0.0 < self.ratio < 1.0:
                raise UsageError(f"--ratio must be in (0, 1), got {self.ratio}")
            if self.target_macs is not None and not 0.0 < self.target_macs < 1.0:
                raise UsageError(f"--target-macs must be in (0, 1), got {self.target_macs}")
        if self.scope not in ("global", "layer"):
            raise UsageError(f"--scope must be global or layer, not {self.scope!r}")
        if self.steps < 1:
            raise UsageError(f"--steps must be >= 1, got {self.steps}")
        if self.finetune_epochs < 0:
            raise UsageError(f"--finetune-epochs must be >= 0, got {self.finetune_epochs}")
        if self.round_to < 1:
            raise UsageError(f"--round-to must be >= 1, got {self.round_to}")


def needs_data(method: str, *, finetune_epochs: int = 0, steps: int = 1, ranked: bool = False) -> bool:
    """Whether pruning reads a dataset: VIB and finetuning train on it, and taylor/oracle rank on
    its activations at every step (a given ranking, `ranked`, serves the first)."""
    from vcc.core.compress.rank import DATA_METHODS

    return method == "vib" or finetune_epochs > 0 or (method in DATA_METHODS and (not ranked or steps > 1))


def summarise(model: nn.Module, meta: Any, data: Any, job: PruneJob, progress: ProgressFn | None = None) -> dict[str, Any]:
    """params, MACs, (with data) accuracy, and non-zero params of a masked model (latency: :func:`prune_model`)."""
    from vcc.core.evaluate import summarise_model

    dev = job.train.device if job.train is not None else "cpu"
    doc = summarise_model(model, meta, data, clips=job.eval_clips, latency_runs=0, device=dev, progress=progress)
    if any(hasattr(m, "weight_mask") for m in model.modules()):
        from vcc.core.compress.magnitude import sparsity_of

        doc["nonzero_params"] = sparsity_of(model)["nonzero_params"]
    return doc


def _finetune(model: nn.Module, meta: Any, data: Any, job: PruneJob, run_dir: Any, step: int,
              progress: ProgressFn | None) -> tuple[nn.Module, Any, list[dict[str, Any]], str | None]:
    """Finetune one step's model: (model, meta, per-epoch history, the split that chose its epoch)."""
    import dataclasses
    import shutil

    from vcc.core.artefact import load_model
    from vcc.core.training import TrainConfig, fit

    base = job.train or TrainConfig(frames=meta.frames, size=meta.size)
    cfg = dataclasses.replace(base, epochs=job.finetune_epochs, command="prune", frames=meta.frames, size=meta.size)
    sub = run_dir / f".finetune-{step}"
    res = fit(model, meta, data, cfg, sub, progress=progress)
    tuned, tuned_meta = load_model(res.model_path)
    hist = [{"step": step, **h} for h in res.history]
    shutil.rmtree(sub, ignore_errors=True)
    return tuned, tuned_meta, hist, res.selected_on


def prune_model(model_path: Any, data: Any, job: PruneJob, run_dir: Any, *, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Load, (rank,) prune in `job.steps` AGP steps with optional finetuning, save `run_dir/model.safetensors`.

    Returns {"before", "after" (summaries), "steps" (per step), "model", "method", ...}.
    Writes only into `run_dir` (give a temporary directory and move it into place on success).
    """
    from pathlib import Path

    from vcc.core.artefact import dataset_ref, load_model, provenance, save_model
    from vcc.core.compress.rank import load_ranking, rank
    from vcc.core.compress.schedule import agp_targets, macs_targets

    job.validate()
    run_dir = Path(run_dir)
    model, meta = load_model(model_path)
    if job.method != "magnitude":
        check_prunable(meta)
    if data is not None:
        from vcc.core.training import check_classes, dataset_info

        data = dataset_info(data)
        check_classes(meta, list(data.classes), data_name=f"dataset {data.name!r}")
    if job.finetune_epochs and data is None:
        raise UsageError("--finetune-epochs needs --data")
    # one DepGraph trace of the loaded model serves step 1's checks, ranking layers and surgery
    probe = probe_surgeon(model, meta, job.ignore) if job.method != "magnitude" else None
    if job.target_macs is not None and probe is not None:
        check_macs_target(model, meta, job.target_macs, job.ignore, job.round_to, probe=probe)  # before any evaluation or ranking
    before = summarise(model, meta, data, job, progress)
    steps_log: list[dict[str, Any]] = []
    history: list[dict[str, Any]] = []
    orig_sizes = None
    ranking_scores = None
    if job.method == "magnitude":
        from vcc.core.compress.magnitude import apply_magnitude, candidate_layers, read_sparsity_csv

        target = read_sparsity_csv(job.sparsity_csv) if job.sparsity_csv else float(job.sparsity)
        mag_layers = candidate_layers(model, meta, job.ignore)
    else:
        if job.steps > 1:  # a single step's ratio refers to the model's own sizes anyway
            orig_sizes = {g.root: g.size for g in probe.groups}
        if job.ranking:
            ranking_scores, rdoc = load_ranking(job.ranking, model)
            if rdoc.get("method") and rdoc["method"] != job.method:
                raise UsageError(f"--ranking {job.ranking} was made with --method {rdoc['method']}, not {job.method}")
    dev = job.train.device if job.train is not None else "cpu"
    for t in range(1, job.steps + 1):
        if job.method == "magnitude":
            frac = agp_targets(1.0, job.steps)[t - 1]
            step_target = {k: v * frac for k, v in target.items()} if isinstance(target, dict) else target * frac
            model, meta, achieved = apply_magnitude(model, meta, step_target, ignore=job.ignore, layers=mag_layers)
            record = {"step": t, "sparsity": step_target if not isinstance(step_target, dict) else None,
                      "masked_fraction": sum(achieved.values()) / max(1, len(achieved))}
        else:
            if ranking_scores is not None and t == 1:
                scores = ranking_scores
            else:
                scores = rank(model, meta, job.method, data=data, batches=job.batches, device=dev,
                              ignore=job.ignore, progress=progress,
                              layers=probe.prunable_layers() if probe is not None else None)
                model.cpu()
            if job.ratio is not None:
                r = agp_targets(job.ratio, job.steps)[t - 1]
                out = prune_channels(model, meta, scores, r, scope=job.scope, ignore=job.ignore, ratio_of=orig_sizes,
                                     round_to=job.round_to, probe=probe)
                record = {"step": t, "ratio": round(r, 4)}
            else:
                f = macs_targets(job.target_macs, job.steps)[t - 1]
                out = prune_to_macs(model, meta, scores, f, scope=job.scope, ignore=job.ignore,
                                    base_macs=before["macs"], ratio_of=orig_sizes, round_to=job.round_to, progress=progress,
                                    probe=probe)
                record = {"step": t, "target_macs": round(f, 4), "ratio": round(out.ratio, 4)}
            probe = None  # pruned (it became out.model): later steps trace their own model
            model = out.model
            record.update({"macs": out.macs, "params": out.params, "removed": out.removed})
        if job.finetune_epochs:
            model, meta, hist, record["selected_on"] = _finetune(model, meta, data, job, run_dir, t, progress)
            history += hist
            if hist:
                record["finetune_val_top1"] = hist[-1].get("val_video_top1", hist[-1].get("val_top1"))
        steps_log.append(record)
        if progress:
            progress("prune steps", t, job.steps, {"macs": record["macs"]} if "macs" in record else {"masked": round(record["masked_fraction"], 3)})
    model = model.cpu().eval()
    after = summarise(model, meta, data, job, progress)
    if job.latency_runs > 0:  # 0: the caller times the models itself (vcc demo, beside its other rows)
        from vcc.core.evaluate import add_paired_latency

        add_paired_latency([(before, *load_model(model_path)), (after, model, meta)], runs=job.latency_runs)  # side by side
    out_meta = meta.child()
    out_meta.provenance = provenance(parent=model_path, metrics={k: v for k, v in after.items() if k != "params"},
                                     dataset=dataset_ref(data) if data is not None else None)
    out_meta.extra = {**meta.extra, "prune": {
        "method": job.method, "ratio": job.ratio, "target_macs": job.target_macs, "scope": job.scope,
        "steps": job.steps, "finetune_epochs": job.finetune_epochs, "ignore": job.ignore,
        "sparsity": job.sparsity, "before": before, "after": after,
    }}
    path = run_dir / "model.safetensors"
    save_model(path, model, out_meta)
    if history:
        import json

        from vcc.core.workspace import atomic_write_text

        atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    return {"model": str(path), "method": job.method, "before": before, "after": after, "steps": steps_log}
