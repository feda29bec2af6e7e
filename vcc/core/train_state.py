"""Training checkpoints without pickle: nested state dicts split into safetensors + JSON.

Optimizer, scheduler and scaler state dicts are nested dicts/lists of tensors and plain
numbers. :func:`pack` replaces every tensor by ``{"__t__": key}`` (the tensor goes into a flat
dict for safetensors) and keeps dict key types (optimizer state is keyed by int) and tuples;
:func:`unpack` reverses it exactly.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from vcc.core.errors import ArtefactError

CHECKPOINT_FORMAT = "vcc-checkpoint"


def pack(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able copy of `obj`; tensors move into `tensors` under keys starting with `prefix`."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}#{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"__t__": key}
    if isinstance(obj, dict):
        return {"__d__": [[k, pack(v, prefix, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [pack(v, prefix, tensors) for v in obj]}
    if isinstance(obj, list):
        return [pack(v, prefix, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return {"__np__": obj.tolist(), "dtype": str(getattr(obj, "dtype", ""))}
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`pack`."""
    if isinstance(obj, dict):
        if "__t__" in obj:
            try:
                return tensors[obj["__t__"]]
            except KeyError as exc:
                raise ArtefactError(f"checkpoint is missing tensor {obj['__t__']!r}") from exc
        if "__d__" in obj:
            return {(tuple(k) if isinstance(k, list) else k): unpack(v, tensors) for k, v in obj["__d__"]}
        if "__tuple__" in obj:
            return tuple(unpack(v, tensors) for v in obj["__tuple__"])
        if "__np__" in obj:
            import numpy as np

            return np.asarray(obj["__np__"], dtype=obj.get("dtype") or None)
        return {k: unpack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unpack(v, tensors) for v in obj]
    return obj


def rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG a training step may touch: python, numpy, torch CPU/CUDA and the loader's generator."""
    import numpy as np

    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["loader"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only when the device count matches)."""
    import numpy as np

    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        np.random.set_state(tuple(state["numpy"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if generator is not None and "loader" in state:
        generator.set_state(state["loader"])


def save_checkpoint(path: str | Path, parts: dict[str, Any], doc: dict[str, Any]) -> Path:
    """Atomically write `parts` (name -> nested state) plus the JSON `doc` as one safetensors file."""
    from vcc.core.artefact import save_tensors

    tensors: dict[str, torch.Tensor] = {}
    packed = {name: pack(value, name, tensors) for name, value in parts.items()}
    return save_tensors(path, tensors, {"format": CHECKPOINT_FORMAT, **doc, "state": packed})


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(parts, doc) from :func:`save_checkpoint`'s file."""
    from vcc.core.artefact import load_tensors

    tensors, doc = load_tensors(path, expect_format=CHECKPOINT_FORMAT)
    packed = doc.pop("state", {})
    return {name: unpack(value, tensors) for name, value in packed.items()}, doc
