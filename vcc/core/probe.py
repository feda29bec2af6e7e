"""One instrumented forward pass: shapes and widths of a model's layers without changing the model."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

HookFn = Callable[[nn.Module, Any, Any], None]


def probe_forward(model: nn.Module, example: Any, hooks: Iterable[tuple[nn.Module, HookFn]]) -> Any:
    """Run `model(example)` once in eval mode without gradients, with temporary forward hooks.

    Each (module, fn) pair registers fn as a forward hook for this call only; the hooks are removed
    and the model's training mode restored even if the forward fails. Returns the model's output.
    """
    handles = [m.register_forward_hook(fn) for m, fn in hooks]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            return model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
