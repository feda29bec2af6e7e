"""Variational information bottleneck (VIB) compression and its dense port.

Methods: Srivastava et al., "A variational information bottleneck based method to compress
sequential networks for human action recognition" (WACV 2021, VIB-LSTM), and Dai et al. 2018
(VIBNet) for convolution channels.

Every unit gets a gate z ~ N(mu, sigma^2), sigma^2 = exp(logD), that multiplies it. Training draws a
fresh noise sample at every forward; the KL term per gated layer is 0.5 * sum log(1 + mu^2/sigma^2).
A unit is kept iff log alpha = logD - log mu^2 < threshold. At eval time the gates are the hard mask:

* LSTM gate activations (i, f, g, o): multiplied by the 0/1 mask (a scale on a sigmoid output
  could not be folded into a standard LSTM);
* LSTM input features and conv channels (after BN): multiplied by mu * mask, a linear scale that
  :func:`port_vib` folds into the following weights.

A hidden LSTM unit survives iff its i, g and o gates survive (otherwise its output is exactly 0).

Wrapper ``"vib"`` (recorded in artefacts): gates an LSTM model (``model.lstm`` becomes a
:class:`GatedLSTM`, a Python-loop LSTM over the same weight tensors) or, for CNNs, every conv's
output channels through forward hooks on the BN after it. Wrapper ``"vib_select"`` is the dense
form's input-feature selection (:class:`IndexedLSTM`: an index gather in front of a standard
``nn.LSTM``).
"""

from __future__ import annotations

import copy
import fnmatch
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vcc.core.errors import UsageError, VccError
from vcc.core.models.registry import register_wrapper
from vcc.core.progress import ProgressFn

INIT_MU = 1.0
INIT_LOGD = -9.0
F_GATE_OFF_BIAS = -1.0e4  # sigmoid(-1e4) == 0 exactly in fp32/fp16/bf16: a pruned forget gate
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# ---------------------------------------------------------------- the gate


class VIBGate(nn.Module):
    """One VIB gate vector: parameters ``mu`` and ``logD`` for ``n`` units.

    ``forward(batch)`` returns the multiplier: in training a fresh sample mu + sigma * eps of shape
    (batch, n); in eval (or when ``hard``) the deterministic hard gate of shape (n,): the 0/1 mask,
    times mu when ``eval_scale``.
    """

    def __init__(self, n: int, *, threshold: float = 0.0, kml: float = 1.0, eval_scale: bool = True, hard: bool = False) -> None:
        super().__init__()
        self.n = int(n)
        self.mu = nn.Parameter(torch.empty(self.n).normal_(INIT_MU, 0.01))
        self.logD = nn.Parameter(torch.empty(self.n).normal_(INIT_LOGD, 0.01))
        self.threshold = float(threshold)
        self.kml = float(kml)
        self.eval_scale = bool(eval_scale)
        self.hard = False
        self.set_hard(hard)

    def set_hard(self, hard: bool) -> None:
        """Hard gates: eval-style masks also in training, and mu/logD frozen."""
        self.hard = bool(hard)
        self.mu.requires_grad_(not hard)
        self.logD.requires_grad_(not hard)

    def log_alpha(self) -> torch.Tensor:
        """log alpha = logD - log mu^2 (a unit is kept iff below the threshold)."""
        return self.logD - 2.0 * torch.log(self.mu.abs().clamp_min(1e-20))

    def mask(self) -> torch.Tensor:
        """The hard 0/1 mask (float, no gradient)."""
        return self.kept().to(self.mu.dtype)

    def kept(self) -> torch.Tensor:
        """Bool tensor of kept units."""
        return (self.log_alpha() < self.threshold).detach()

    def kld(self) -> torch.Tensor:
        """0.5 * sum log(1 + mu^2 / sigma^2), computed stably as softplus(-log alpha)."""
        return 0.5 * F.softplus(-self.log_alpha()).sum()

    def hard_gate(self) -> torch.Tensor:
        """The eval-time gate, shape (n,)."""
        m = self.mask()
        return self.mu * m if self.eval_scale else m

    def forward(self, batch: int) -> torch.Tensor:
        if self.training and not self.hard:
            eps = torch.randn(batch, self.n, device=self.mu.device, dtype=self.mu.dtype)
            return self.mu + eps * torch.exp(0.5 * self.logD)
        return self.hard_gate()

    def extra_repr(self) -> str:
        return f"n={self.n}, threshold={self.threshold}, kml={self.kml}, eval_scale={self.eval_scale}, hard={self.hard}"


def _bcast(z: torch.Tensor, like: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
    """Reshape a gate (n,) or (N, n) to broadcast over `like` along `channel_dim`."""
    shape = [1] * like.dim()
    shape[channel_dim] = z.shape[-1]
    if z.dim() == 2:
        shape[0] = z.shape[0]
    return z.reshape(shape).to(like.dtype)


# ---------------------------------------------------------------- LSTM gating


class GatedLSTM(nn.Module):
    """A Python-loop LSTM over an ``nn.LSTM``'s own weight tensors, with VIB gates.

    Gates: ``gates["input"]`` on the features entering layer 0 (eval: mu * mask) and
    ``gates["l{k}_{i|f|g|o}"]`` on each layer's gate activations (eval: 0/1 mask).
    Returns ``(output, (h_n, c_n))`` like ``nn.LSTM(batch_first=True)``.
    """

    def __init__(self, lstm: nn.LSTM, *, threshold: float = 0.0, hard: bool = False) -> None:
        super().__init__()
        if not lstm.batch_first or lstm.bidirectional or lstm.proj_size:
            raise UsageError("VIB gates support only batch_first, unidirectional LSTMs without projections")
        self.lstm = lstm
        self.gates = nn.ModuleDict()
        self.gates["input"] = VIBGate(lstm.input_size, threshold=threshold, eval_scale=True, hard=hard)
        for k in range(lstm.num_layers):
            for b in "ifgo":
                self.gates[f"l{k}_{b}"] = VIBGate(lstm.hidden_size, threshold=threshold, eval_scale=False, hard=hard)

    def forward(self, x: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None):
        lstm = self.lstm
        n, t, _ = x.shape
        H = lstm.hidden_size
        x = x * _bcast(self.gates["input"](n), x, channel_dim=2)
        h_n, c_n = [], []
        for k in range(lstm.num_layers):
            w_ih = getattr(lstm, f"weight_ih_l{k}")
            w_hh = getattr(lstm, f"weight_hh_l{k}")
            xw = x @ w_ih.t()
            if lstm.bias:
                xw = xw + getattr(lstm, f"bias_ih_l{k}") + getattr(lstm, f"bias_hh_l{k}")
            zi, zf, zg, zo = (self.gates[f"l{k}_{b}"](n).to(x.dtype) for b in "ifgo")
            if hx is None:
                h = x.new_zeros(n, H)
                c = x.new_zeros(n, H)
            else:
                h, c = hx[0][k], hx[1][k]
            outs = []
            for s in range(t):
                g_all = xw[:, s] + h @ w_hh.t()
                gi, gf, gg, go = g_all.chunk(4, dim=1)
                i = torch.sigmoid(gi) * zi
                f = torch.sigmoid(gf) * zf
                g = torch.tanh(gg) * zg
                o = torch.sigmoid(go) * zo
                c = f * c + i * g
                h = o * torch.tanh(c)
                outs.append(h)
            x = torch.stack(outs, dim=1)
            if lstm.dropout and self.training and k < lstm.num_layers - 1:
                x = F.dropout(x, lstm.dropout, training=True)
            h_n.append(h)
            c_n.append(c)
        return x, (torch.stack(h_n), torch.stack(c_n))

    def layer_names(self, prefix: str) -> dict[str, str]:
        """Gate key -> public layer name (``lstm.input``, ``lstm.l0.i``, ...)."""
        return {key: f"{prefix}.{key.replace('_', '.')}" for key in self.gates}

    def kept_hidden(self, k: int) -> torch.Tensor:
        """Bool (H,): hidden units of layer k that survive (their i, g and o gates all survive)."""
        return self.gates[f"l{k}_i"].kept() & self.gates[f"l{k}_g"].kept() & self.gates[f"l{k}_o"].kept()


class IndexedLSTM(nn.Module):
    """A fixed input-feature gather (buffer ``index``) in front of a standard ``nn.LSTM``."""

    def __init__(self, lstm: nn.LSTM, index: torch.Tensor | None = None) -> None:
        super().__init__()
        self.lstm = lstm
        if index is None:
            index = torch.arange(lstm.input_size)
        self.register_buffer("index", index.to(torch.long).clone())

    def forward(self, x: torch.Tensor, hx: Any = None):
        return self.lstm(x.index_select(-1, self.index), hx)


def is_lstm_model(model: nn.Module) -> bool:
    """A zoo sequence model (cnn_lstm, lstm_e2e): has ``lstm`` and a linear ``fc``."""
    return isinstance(getattr(model, "lstm", None), (nn.LSTM, GatedLSTM, IndexedLSTM)) and isinstance(getattr(model, "fc", None), nn.Linear)


# ---------------------------------------------------------------- CNN channel gating


class ChannelGates(nn.Module):
    """Holds one :class:`VIBGate` per gated conv (keys: module names with '.' -> '__')."""

    def __init__(self) -> None:
        super().__init__()
        self.gates = nn.ModuleDict()
        self.targets: dict[str, str] = {}  # gate key -> name of the module whose output it gates
        self.convs: dict[str, str] = {}  # gate key -> name of the conv whose channels it gates


class _GateHook:
    """Forward hook multiplying a module's output channels by its gate (deep-copies correctly)."""

    def __init__(self, gate: VIBGate) -> None:
        self.gate = gate

    def __call__(self, module: nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:
        return out * _bcast(self.gate(out.shape[0]), out, channel_dim=1)


def _conv_targets(model: nn.Module, exclude: list[str]) -> list[tuple[str, str]]:
    """(conv name, module to gate) for every conv: its following BN if it has one, else the conv.

    The last conv is skipped when it is the classifier (out_channels == num_classes at the end).
    """
    mods = list(model.named_modules())
    out: list[tuple[str, str]] = []
    for idx, (name, mod) in enumerate(mods):
        if not isinstance(mod, _CONV) or any(fnmatch.fnmatch(name, p) for p in exclude):
            continue
        target = name
        for nxt_name, nxt in mods[idx + 1 :]:
            if isinstance(nxt, _CONV) or isinstance(nxt, nn.Linear):
                break
            if isinstance(nxt, _BN):
                if nxt.num_features == mod.out_channels:
                    target = nxt_name
                break
        out.append((name, target))
    # a conv classifier (s3d) must keep its classes
    if out and not any(isinstance(m, nn.Linear) for _, m in mods):
        out = out[:-1]
    return out


# ---------------------------------------------------------------- the wrapper


def gates(model: nn.Module) -> dict[str, VIBGate]:
    """Public layer name -> gate of a gated model (empty if none)."""
    out: dict[str, VIBGate] = {}
    if isinstance(getattr(model, "lstm", None), GatedLSTM):
        for key, name in model.lstm.layer_names("lstm").items():
            out[name] = model.lstm.gates[key]
    cg = getattr(model, "vib_gates", None)
    if isinstance(cg, ChannelGates):
        for key, gate in cg.gates.items():
            out[cg.convs[key]] = gate
    return out


def layer_kml(name: str, kml: float, kml_layer: dict[str, float] | None) -> float:
    """The kml of a layer: an exact or glob (fnmatch) match in `kml_layer`, else the global `kml`."""
    kml_layer = kml_layer or {}
    if name in kml_layer:
        return float(kml_layer[name])
    for pat, val in kml_layer.items():
        if fnmatch.fnmatch(name, pat):
            return float(val)
    return float(kml)


@register_wrapper("vib")
def vib_wrapper(
    model: nn.Module,
    threshold: float = 0.0,
    kml: float = 1.0,
    kml_layer: dict[str, float] | None = None,
    hard: bool = False,
    exclude: list[str] | None = None,
) -> nn.Module:
    """Add VIB gates to `model` (LSTM models: input features and i,f,g,o; CNNs: conv channels)."""
    if gated(model):
        raise UsageError("model already has VIB gates")
    if is_lstm_model(model):
        if not isinstance(model.lstm, nn.LSTM):
            raise UsageError("the model's LSTM was already ported; VIB gates need the original nn.LSTM")
        model.lstm = GatedLSTM(model.lstm, threshold=threshold, hard=hard)
    else:
        cg = ChannelGates()
        modules = dict(model.named_modules())
        for conv_name, target in _conv_targets(model, list(exclude or [])):
            key = conv_name.replace(".", "__")
            conv = modules[conv_name]
            gate = VIBGate(conv.out_channels, threshold=threshold, eval_scale=True, hard=hard)
            cg.gates[key] = gate
            cg.targets[key] = target
            cg.convs[key] = conv_name
            modules[target].register_forward_hook(_GateHook(gate))
        if not cg.gates:
            raise UsageError("VIB: the model has no LSTM and no convolution to gate")
        model.vib_gates = cg
    for name, gate in gates(model).items():
        gate.kml = layer_kml(name, kml, kml_layer)
    return model


def gated(model: nn.Module) -> bool:
    """True when `model` carries VIB gates."""
    return isinstance(getattr(model, "lstm", None), GatedLSTM) or isinstance(getattr(model, "vib_gates", None), ChannelGates)


def set_gates(model: nn.Module, *, threshold: float | None = None, hard: bool | None = None, kml: float | None = None, kml_layer: dict[str, float] | None = None) -> None:
    """Change threshold / hardness / kml of every gate in place."""
    for name, gate in gates(model).items():
        if threshold is not None:
            gate.threshold = float(threshold)
        if hard is not None:
            gate.set_hard(hard)
        if kml is not None:
            gate.kml = layer_kml(name, kml, kml_layer)


def kl_term(model: nn.Module, kl_factor: float = 1.0) -> torch.Tensor:
    """kl_factor * sum over gated layers of kml * 0.5 * sum log(1 + mu^2 / sigma^2)."""
    terms = [g.kml * g.kld() for g in gates(model).values() if not g.hard]
    if not terms:
        return torch.zeros(())
    return kl_factor * torch.stack(terms).sum()


@register_wrapper("vib_select")
def vib_select_wrapper(model: nn.Module, index_size: int | None = None) -> nn.Module:
    """Dense VIB port: put an input-feature gather (:class:`IndexedLSTM`) in front of ``model.lstm``."""
    if not isinstance(getattr(model, "lstm", None), nn.LSTM):
        raise UsageError("vib_select needs a model with an nn.LSTM at .lstm")
    index = torch.arange(index_size if index_size is not None else model.lstm.input_size)
    model.lstm = IndexedLSTM(model.lstm, index)
    return model


# ---------------------------------------------------------------- counting


def lstm_param_count(input_size: int, hidden: int, num_layers: int = 1, bias: bool = True) -> int:
    """Parameters of a unidirectional LSTM: per layer 4H(H+L) + 8H (two bias vectors)."""
    total, L = 0, input_size
    for _ in range(num_layers):
        total += 4 * hidden * (hidden + L) + (8 * hidden if bias else 0)
        L = hidden
    return total


def kept_units(model: nn.Module) -> dict[str, list[int]]:
    """{layer: [kept, total]} for every gate, plus ``lstm.l{k}.hidden`` (i, g and o kept)."""
    out: dict[str, list[int]] = {}
    for name, gate in gates(model).items():
        out[name] = [int(gate.kept().sum()), gate.n]
    if isinstance(getattr(model, "lstm", None), GatedLSTM):
        for k in range(model.lstm.lstm.num_layers):
            kh = model.lstm.kept_hidden(k)
            out[f"lstm.l{k}.hidden"] = [int(kh.sum()), int(kh.numel())]
    return out


def _lstm_counts(model: nn.Module) -> tuple[int, int]:
    """(LSTM params before, after) for a gated LSTM model, by the kept units."""
    g: GatedLSTM = model.lstm
    lstm = g.lstm
    before = lstm_param_count(lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.bias)
    after, L = 0, int(g.gates["input"].kept().sum())
    for k in range(lstm.num_layers):
        H = int(g.kept_hidden(k).sum())
        after += 4 * H * (H + L) + (8 * H if lstm.bias else 0)
        L = H
    return before, after


def compression_summary(model: nn.Module) -> dict[str, Any]:
    """Kept units per layer and compression figures of a gated model (no port needed)."""
    kept = kept_units(model)
    doc: dict[str, Any] = {"kept": kept}
    if isinstance(getattr(model, "lstm", None), GatedLSTM):
        before, after = _lstm_counts(model)
        doc.update(lstm_params_before=before, lstm_params_after=after, compression=_ratio(before, after))
    else:
        tot = sum(t for _, t in kept.values())
        kp = sum(k for k, _ in kept.values())
        doc.update(channels_before=tot, channels_after=kp, compression=_ratio(tot, kp))
    return doc


def _ratio(a: float, b: float) -> float | None:
    """a / b, or None when nothing is left (keeps JSON output valid)."""
    return float(a) / float(b) if b else None


def _base_params(model: nn.Module) -> int:
    """Parameters of a gated model, not counting the gates."""
    gate_ids = {id(p) for g in gates(model).values() for p in g.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in gate_ids)


# ---------------------------------------------------------------- port


@torch.no_grad()
def _port_lstm(model: nn.Module) -> tuple[nn.Module, bool, dict[str, Any]]:
    """Dense copy of a gated LSTM model. Returns (model, uses_select, info).

    Rows of W_ih, W_hh and the biases are taken per gate block (i, f, g, o) at the kept hidden
    units; W_ih's columns at the kept input features (gathered by index, scaled by mu); the fc's
    columns at the last layer's kept units. A kept unit whose forget gate was pruned gets f == 0
    exactly (rows 0, bias -1e4). nn.LSTM has one hidden size for all layers, so a layer that keeps
    fewer units than another is padded with dead units (o == 0 exactly, so h == 0).
    """
    g: GatedLSTM = model.lstm
    lstm = g.lstm
    H, nl = lstm.hidden_size, lstm.num_layers
    dtype = lstm.weight_ih_l0.dtype
    in_gate = g.gates["input"]
    in_idx = torch.nonzero(in_gate.kept(), as_tuple=False).flatten().cpu()
    in_scale = in_gate.hard_gate().detach().cpu()
    if in_idx.numel() == 0:  # nothing survives: keep one zeroed feature so shapes stay valid
        in_idx, in_scale = torch.zeros(1, dtype=torch.long), torch.zeros_like(in_scale)
    kept = [g.kept_hidden(k).cpu() for k in range(nl)]
    h2 = max(1, max(int(k.sum()) for k in kept))
    hidden: list[torch.Tensor] = []
    dead: list[torch.Tensor] = []
    for k in range(nl):
        idx = torch.nonzero(kept[k], as_tuple=False).flatten()
        pad = torch.nonzero(~kept[k], as_tuple=False).flatten()[: h2 - idx.numel()]
        hidden.append(torch.cat([idx, pad]))
        dead.append(torch.cat([torch.zeros(idx.numel(), dtype=torch.bool), torch.ones(pad.numel(), dtype=torch.bool)]))
    new_lstm = nn.LSTM(int(in_idx.numel()), h2, num_layers=nl, bias=lstm.bias, batch_first=True, dropout=lstm.dropout)
    cols, col_scale = in_idx, in_scale[in_idx]
    for k in range(nl):
        idx = hidden[k]
        rows = torch.cat([b * H + idx for b in range(4)])
        w_ih = getattr(lstm, f"weight_ih_l{k}").detach().cpu()[rows][:, cols] * col_scale.to(dtype)
        w_hh = getattr(lstm, f"weight_hh_l{k}").detach().cpu()[rows][:, idx] * (~dead[k]).to(dtype)
        b_ih = getattr(lstm, f"bias_ih_l{k}").detach().cpu()[rows].clone() if lstm.bias else None
        b_hh = getattr(lstm, f"bias_hh_l{k}").detach().cpu()[rows].clone() if lstm.bias else None
        f_off = ~g.gates[f"l{k}_f"].kept().cpu()[idx] & ~dead[k]
        for block, off in ((1, f_off), (3, dead[k])):
            if not off.any():
                continue
            if not lstm.bias:
                raise VccError("VIB port: switching off a gate needs an LSTM with biases")
            r = block * h2 + torch.nonzero(off, as_tuple=False).flatten()
            w_ih[r] = 0
            w_hh[r] = 0
            b_ih[r] = F_GATE_OFF_BIAS
            b_hh[r] = 0
        getattr(new_lstm, f"weight_ih_l{k}").copy_(w_ih)
        getattr(new_lstm, f"weight_hh_l{k}").copy_(w_hh)
        if lstm.bias:
            getattr(new_lstm, f"bias_ih_l{k}").copy_(b_ih)
            getattr(new_lstm, f"bias_hh_l{k}").copy_(b_hh)
        cols, col_scale = idx, (~dead[k]).to(dtype)

    device = lstm.weight_ih_l0.device
    dense = copy.deepcopy(model)
    fc: nn.Linear = dense.fc
    new_fc = nn.Linear(h2, fc.out_features, bias=fc.bias is not None)
    new_fc.weight.copy_(fc.weight.detach().cpu()[:, hidden[-1]] * (~dead[-1]).to(dtype))
    if fc.bias is not None:
        new_fc.bias.copy_(fc.bias.detach().cpu())
    dense.fc = new_fc
    full_inputs = in_idx.numel() == lstm.input_size and bool(in_scale.ne(0).all())
    dense.lstm = new_lstm if full_inputs else IndexedLSTM(new_lstm, in_idx)
    dense.to(device)
    if device.type == "cuda":
        new_lstm.flatten_parameters()
    before, after = _lstm_counts(model)
    info = {
        "lstm_input_before": lstm.input_size,
        "lstm_input_after": int(in_gate.kept().sum()),
        "lstm_hidden_before": H,
        "lstm_hidden_after": [int(k.sum()) for k in kept],
        "lstm_params_before": before,
        "lstm_params_after": after,
        "lstm_params_dense": sum(p.numel() for p in new_lstm.parameters()),
        "lstm_compression": _ratio(before, after),
        "forget_gates_off": int(sum(int((~g.gates[f"l{k}_f"].kept().cpu()[kept[k]]).sum()) for k in range(nl))),
    }
    return dense, not full_inputs, info


@torch.no_grad()
def _fold_channel_gates(model: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A plain (hook-free, gate-free) copy of a gated CNN with mu*mask folded into BN / conv.

    Returns (model, {conv name: bool kept-channel mask}).
    """
    cg: ChannelGates = model.vib_gates
    plain = copy.deepcopy(model)
    for mod in plain.modules():
        for hid, hook in list(mod._forward_hooks.items()):
            if isinstance(hook, _GateHook):
                del mod._forward_hooks[hid]
    del plain.vib_gates
    modules = dict(plain.named_modules())
    kept: dict[str, torch.Tensor] = {}
    for key, gate in cg.gates.items():
        s = gate.hard_gate().detach()
        target = modules[cg.targets[key]]
        if isinstance(target, _BN):
            if target.affine:
                target.weight.mul_(s)
                target.bias.mul_(s)
            else:
                raise VccError(f"VIB port: {cg.targets[key]} has no affine parameters to fold the gate into")
        else:
            shape = [-1] + [1] * (target.weight.dim() - 1)
            target.weight.mul_(s.reshape(shape))
            if target.bias is not None:
                target.bias.mul_(s)
        kept[cg.convs[key]] = gate.kept().cpu()
    return plain, kept


def _port_cnn(model: nn.Module, meta) -> tuple[nn.Module, dict[str, Any]]:
    """Fold channel gates, then remove the channels they zeroed as `vcc port` does for masks
    (:func:`vcc.core.compress.port.remove_dead_channels`, on the pruning Surgeon): every arch it
    handles (residual adds, shortcut A padding, depthwise convs, concats) ports exactly."""
    from vcc.core.compress.port import TOLERANCE, remove_dead_channels

    plain, kept = _fold_channel_gates(model)
    before = {n: m.out_channels for n, m in plain.named_modules() if isinstance(m, _CONV)}
    try:
        plain, _ = remove_dead_channels(plain.eval(), meta, tol=TOLERANCE)
    except VccError as exc:
        raise VccError(f"VIB port: {exc}") from exc
    after = {n: m.out_channels for n, m in plain.named_modules() if isinstance(m, _CONV)}
    layers = [[n, before[n], after.get(n, before[n]), int(kept[n].sum()) if n in kept else None] for n in before]
    return plain, {"channels": layers}


def port_vib(model: nn.Module, meta) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Dense model from a VIB-gated one: LSTM sliced per gate block (standard ``nn.LSTM``), inputs
    gathered by index, fc sliced; CNN gates folded and channels removed through DepGraph.

    The dense model's eval outputs match the gated model's (up to float rounding). Returns
    ``(dense_model, dense_meta, info)`` with params/compression figures in `info`.
    """
    if not gated(model):
        raise UsageError("port_vib: the model has no VIB gates")
    model = model.eval()
    wrappers = [w for w in meta.wrappers if w.get("name") != "vib"]
    params_before = _base_params(model)
    kept = kept_units(model)
    if isinstance(getattr(model, "lstm", None), GatedLSTM):
        dense, select, info = _port_lstm(model)
        if select:
            wrappers.append({"name": "vib_select", "options": {"index_size": int(dense.lstm.index.numel())}})
        info["compression"] = info["lstm_compression"]
        info["removed"] = {"lstm.input": info["lstm_input_before"] - info["lstm_input_after"]}
        for k, h in enumerate(info["lstm_hidden_after"]):
            info["removed"][f"lstm.l{k}.hidden"] = info["lstm_hidden_before"] - h
        comp = info["lstm_compression"]
        info["note"] = (
            f"VIB: LSTM {info['lstm_params_before']:,} -> {info['lstm_params_after']:,} params "
            f"(4H(H+L)+8H; {comp:.1f}x fewer)" if comp is not None else "VIB: every LSTM unit was pruned"
        )
    else:
        dense, info = _port_cnn(model, meta)
        info["removed"] = {name: b - a for name, b, a, _ in info["channels"] if b != a}
        info["note"] = f"VIB: folded channel gates and removed {sum(info['removed'].values())} channels through DepGraph"
    dense.eval()
    params_after = sum(p.numel() for p in dense.parameters())
    info.update(
        method="vib",
        kept=kept,
        params_before=params_before,
        params_after=params_after,
        model_compression=_ratio(params_before, params_after),
    )
    if "compression" not in info:
        info["compression"] = info["model_compression"]
    dense_meta = meta.child(wrappers=wrappers, structure={})
    dense_meta.extra = {**dense_meta.extra, "vib_port": {k: v for k, v in info.items() if k != "channels"}}
    return dense, dense_meta, info


# ---------------------------------------------------------------- training


def vib_table(kept: dict[str, list[int]]) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the per-layer kept-units table."""
    cols = ["layer", "kept", "total", "kept %"]
    rows = [[name, k, t, round(100.0 * k / t, 2) if t else 0.0] for name, (k, t) in kept.items()]
    return cols, rows


def prune_vib(
    model_path: str | Path,
    data: Any,
    cfg: Any,
    run_dir: str | Path,
    *,
    kml: float = 1.0,
    ib_lr: float = 0.1,
    kl_factor: float = 2e-3,
    mask_threshold: float = 0.0,
    kml_layer: dict[str, float] | None = None,
    finetune: bool = False,
    freeze_backbone: bool = False,
    summaries: bool = False,
    eval_clips: int = 1,
    latency_runs: int = 10,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Train VIB gates jointly with the weights (or, with `finetune`, weights only under frozen masks).

    `model_path` is any model artefact (trained or untrained; from scratch = untrained), gated or
    not. Gate parameters get their own learning rate `ib_lr` (no weight decay); the loss is
    cross-entropy on plain logits + kl_factor * sum_l kml_l * KL_l; noise is redrawn every forward.
    Use AdamW (``cfg.optimizer="adamw"``, lr ~1e-3): its scale-free steps move mu/logD at
    ~ib_lr per step; with SGD the KL gradients (~kl_factor) are too small to prune anything.
    `freeze_backbone` trains a cnn_lstm's LSTM and classifier only (the arch's ``freeze_backbone``
    option, recorded in the artefact: backbone frozen, BN statistics fixed).
    Saves the gated model as ``run_dir/model.safetensors`` (gates hard, so later fine-tuning keeps
    the masks) and returns ``{"model", "kept", "table", "columns", "history",
    "lstm_params_before", "lstm_params_after", "compression", ...}``; with `summaries`, also ``before``
    and ``after``: :func:`vcc.core.evaluate.summarise_model` rows of the model as loaded and of
    its dense port (what `vcc port` makes of the result; the saved gated model has the same MACs
    as before until then), each with `eval_clips` clips per test video and `latency_runs` timings.
    """
    from vcc.core.artefact import load_model, provenance, recorded_dataset, save_model
    from vcc.core.training import fit

    if kml < 0 or kl_factor < 0 or ib_lr <= 0:
        raise UsageError("--kml and --kl-factor must be >= 0 and --ib-lr > 0")
    from vcc.core.evaluate import add_paired_latency, summarise_model

    run_dir = Path(run_dir)
    model, meta = load_model(model_path, device="cpu")
    kml_layer = {k: float(v) for k, v in (kml_layer or {}).items()}
    opts = {"threshold": float(mask_threshold), "kml": float(kml), "kml_layer": kml_layer, "hard": bool(finetune)}
    if gated(model):
        set_gates(model, threshold=mask_threshold, hard=finetune, kml=kml, kml_layer=kml_layer)
        for w in meta.wrappers:
            if w.get("name") == "vib":
                w["options"] = {**(w.get("options") or {}), **opts}
    else:
        if finetune:
            raise UsageError("--finetune needs a VIB model (run `vcc prune --method vib` first)")
        model = vib_wrapper(model, **opts)
        meta.wrappers = [*meta.wrappers, {"name": "vib", "options": opts}]
    names = set(gates(model))
    unknown = [k for k in kml_layer if not any(fnmatch.fnmatch(n, k) for n in names)]
    if unknown:
        raise UsageError(f"--kml-layer: no gated layer matches {', '.join(unknown)} (layers: {', '.join(sorted(names))})")

    gate_params = [p for g in gates(model).values() for p in g.parameters()]
    gate_ids = {id(p) for p in gate_params}
    if freeze_backbone:
        if not isinstance(getattr(model, "backbone", None), nn.Module) or not hasattr(model, "freeze_backbone"):
            raise UsageError(f"freezing the backbone needs a cnn_lstm model, not {meta.arch!r}")
        model.freeze_backbone = True  # the arch's own option: backbone frozen and kept in eval mode
        model.backbone.requires_grad_(False)
        meta.options = {**meta.options, "freeze_backbone": True}
    weights = [p for p in model.parameters() if id(p) not in gate_ids and p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": weights}]
    if not finetune:
        groups.append({"params": gate_params, "lr": float(ib_lr), "weight_decay": 0.0})

    def criterion(m: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int):
        logits = m(x)
        loss = F.cross_entropy(logits.float(), y)
        if not finetune:
            loss = loss + kl_term(_unwrap(m), kl_factor).to(loss.device)
        return loss, logits

    history: list[dict[str, Any]] = []

    def epoch_hook(epoch: int, m: nn.Module) -> dict[str, Any]:
        summ = compression_summary(_unwrap(m))
        history.append({"epoch": epoch, **summ})
        kept = summ["kept"]
        short = {f"kept[{n}]": k for n, (k, _) in kept.items()}
        comp = summ["compression"]
        return {"compression": round(comp, 3) if comp is not None else None, **short}

    before = original = None
    if summaries:  # the model as loaded (the one above now carries the new gates), once the options are known good
        original = load_model(model_path, device="cpu")
        before = summarise_model(*original, data, clips=eval_clips, latency_runs=0, progress=progress)
    res = fit(model, meta, data, cfg, run_dir, criterion=criterion, param_groups=groups, epoch_hook=epoch_hook, progress=progress)
    last = Path(getattr(res, "last_path", None) or res.model_path)
    final, fmeta = load_model(last, device="cpu")
    summ = compression_summary(final)
    dense, dense_meta, info = port_vib(final, fmeta)
    after = None
    if summaries:
        after = summarise_model(dense, dense_meta, data, clips=eval_clips, latency_runs=0, progress=progress)
        add_paired_latency([(before, *original), (after, dense, dense_meta)], runs=latency_runs)
    set_gates(final, hard=True)
    for w in fmeta.wrappers:
        if w.get("name") == "vib":
            w["options"] = {**(w.get("options") or {}), "hard": True}
    metrics = dict((res.history[-1] if getattr(res, "history", None) else {}) or {})
    metrics.update({"compression": summ["compression"], "params_before": info["params_before"], "params_after": info["params_after"]})
    fmeta.provenance = provenance(parent=model_path, metrics=_jsonable(metrics), dataset=recorded_dataset(fmeta), method="vib")
    out_path = run_dir / "model.safetensors"
    save_model(out_path, final, fmeta)
    cols, rows = vib_table(summ["kept"])
    doc: dict[str, Any] = {
        "model": str(out_path),
        "method": "vib",
        "finetune": finetune,
        "kept": summ["kept"],
        "columns": cols,
        "table": rows,
        "history": history,
        "compression": summ["compression"],
        "params_before": info["params_before"],
        "params_after": info["params_after"],
        "model_compression": info["model_compression"],
        "metrics": _jsonable(metrics),
        **({"before": before, "after": after} if summaries else {}),
    }
    for key in ("lstm_params_before", "lstm_params_after", "channels_before", "channels_after"):
        if key in summ:
            doc[key] = summ[key]
    doc["warnings"] = vib_warnings(summ["kept"], finetune=finetune, kml=kml, kl_factor=kl_factor, kml_layer=kml_layer,
                                   epochs=cfg.epochs)
    return doc


def vib_warnings(kept: dict[str, Any], *, finetune: bool, kml: float, kl_factor: float, kml_layer: dict[str, float],
                 epochs: int) -> list[str]:
    """What a user should know about a VIB result: nothing pruned (too little pressure or training),
    or a layer pruned to nothing (the model can no longer use it)."""
    out: list[str] = []
    if finetune:
        return out
    if (kml == 0 and not any(kml_layer.values())) or kl_factor == 0:
        out.append("--kml 0 (or --kl-factor 0) puts no pressure on the gates: nothing is meant to be pruned")
    elif kept and all(int(k) == int(n) for k, n in kept.values()):
        out.append(f"VIB pruned nothing in {epochs} epochs: train longer (--epochs), or raise --ib-lr, --kml or --kl-factor")
    empty = [name for name, (k, _n) in kept.items() if int(k) == 0]
    if empty:
        out.append(f"VIB pruned every unit of {', '.join(empty)}: what flows through it is lost; "
                   f"lower --kml (or --kml-layer {empty[0]}=K)")
    return out


def _unwrap(m: nn.Module) -> nn.Module:
    """The model inside DDP / torch.compile wrappers."""
    for attr in ("module", "_orig_mod"):
        inner = getattr(m, attr, None)
        if isinstance(inner, nn.Module):
            return _unwrap(inner)
    return m


def _jsonable(doc: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in doc.items():
        if isinstance(v, torch.Tensor):
            v = v.tolist()
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out
