"""Model registry (timm-style): one builder per arch name, plus model wrappers.

Every model maps float input (N, C, T, H, W) to logits (N, num_classes).
Builders take ``num_classes`` and keyword options; options are stored in artefacts so the
same call rebuilds the model. Nothing is downloaded: weights come only from user files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from vcc.core.errors import UsageError


@dataclass(frozen=True)
class ModelSpec:
    """A registered arch: its builder and the input it was designed for."""

    name: str
    builder: Callable[..., nn.Module]
    family: str
    frames: int = 16
    size: int = 112
    description: str = ""


_MODELS: dict[str, ModelSpec] = {}
_WRAPPERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str, *, family: str, frames: int = 16, size: int = 112, description: str = ""):
    """Decorator: register `builder(num_classes, **options) -> nn.Module` under `name`."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        _MODELS[name] = ModelSpec(name, fn, family, frames, size, description or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return deco


def _ensure_loaded() -> None:
    # Importing the package registers every family.
    import vcc.core.models  # noqa: F401


def list_models() -> list[str]:
    """Names of all registered archs, sorted."""
    _ensure_loaded()
    return sorted(_MODELS)


def get_spec(name: str) -> ModelSpec:
    """The spec of arch `name`, or a UsageError listing the known archs."""
    _ensure_loaded()
    if name not in _MODELS:
        raise UsageError(f"unknown arch {name!r}; known archs: {', '.join(sorted(_MODELS))}")
    return _MODELS[name]


def arch_options(name: str) -> dict[str, Any] | None:
    """The builder options arch `name` takes, with their defaults (None: the builder does not say)."""
    import inspect

    try:
        params = inspect.signature(get_spec(name).builder).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name: (None if p.default is p.empty else p.default) for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "num_classes"}


def build_model(name: str, num_classes: int, **options: Any) -> nn.Module:
    """Build arch `name` with `num_classes` outputs and builder options (randomly initialised)."""
    spec = get_spec(name)
    known = arch_options(name)
    unknown = sorted(set(options) - set(known)) if known is not None else []
    if unknown:
        takes = ", ".join(f"{k}={v!r}" for k, v in known.items()) or "none"
        raise UsageError(f"arch {name!r} has no option {', '.join(unknown)}; its options (defaults): {takes}")
    kwargs = _coerce_options(name, spec.builder, options)
    try:
        return spec.builder(num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise UsageError(f"bad options for arch {name!r}: {exc}") from exc


def check_input(model: nn.Module, frames: int, size: int, what: str) -> None:
    """UsageError when `model` cannot take one clip of `frames` x `size` x `size` (e.g. pools
    that shrink it to nothing), so that a run fails before its data loads, not at its first batch.

    Checked on a meta-device copy (shapes only, no compute). A model that cannot be copied there
    (masks computed by parametrizations) or fails there (an op with no meta kernel) runs one real
    forward at batch 1 instead, in eval mode without gradients (its modes are restored).
    """
    import copy

    import torch

    from vcc.core.errors import first_line

    shape = (1, 3, frames, size, size)
    with torch.no_grad():
        try:
            copy.deepcopy(model).to("meta").eval()(torch.empty(shape, device="meta"))
            return
        except Exception:  # noqa: BLE001 - confirmed below on real tensors
            pass
        ref = next((t for t in model.parameters() if t.is_floating_point()), None)
        modes = {m: m.training for m in model.modules()}
        try:
            model.eval()(torch.zeros(shape, device=ref.device if ref is not None else "cpu",
                                     dtype=ref.dtype if ref is not None else torch.float32))
        except Exception as exc:  # noqa: BLE001 - any failure means this input does not fit
            raise UsageError(f"{what} cannot take {frames}-frame {size}x{size} clips ({first_line(exc, 200)}); "
                             "use larger --frames / --size") from exc
        finally:
            for m, training in modes.items():
                m.train(training)


def _coerce_options(arch: str, builder: Callable[..., nn.Module], options: dict[str, Any]) -> dict[str, Any]:
    """Turn string values (as given on a command line) into the type of the builder's default."""
    import inspect

    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return options
    out = dict(options)
    for key, value in options.items():
        default = params[key].default if key in params else None
        if not isinstance(value, str) or isinstance(default, str) or default is None or default is inspect.Parameter.empty:
            continue
        text = value.strip().lower()
        try:
            if isinstance(default, bool):
                if text not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError
                out[key] = text in ("1", "true", "yes", "on")
            elif isinstance(default, (int, float)):
                out[key] = type(default)(value)
        except ValueError:
            raise UsageError(f"bad option for arch {arch!r}: {key}={value!r} is not a {type(default).__name__}") from None
    return out


def register_wrapper(name: str):
    """Decorator: register `fn(model, **options) -> nn.Module`, applied after building.

    Wrappers add structure an arch does not have by itself (early-exit heads, VIB gates,
    element-wise masks). They are recorded in artefact metadata as
    ``{"name": name, "options": {...}}`` and re-applied, in order, when loading.
    """

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _WRAPPERS[name] = fn
        return fn

    return deco


def apply_wrappers(model: nn.Module, wrappers: list[dict[str, Any]]) -> nn.Module:
    """Apply recorded wrappers in order."""
    _ensure_loaded()
    for w in wrappers:
        name = w.get("name")
        if name not in _WRAPPERS:
            _load_wrapper_modules()
        if name not in _WRAPPERS:
            raise UsageError(f"unknown model wrapper {name!r}; known: {', '.join(sorted(_WRAPPERS))}")
        model = _WRAPPERS[name](model, **(w.get("options") or {}))
    return model


def _load_wrapper_modules() -> None:
    """Import modules that register wrappers (they live outside vcc.core.models)."""
    import importlib

    for mod in ("vcc.core.exits", "vcc.core.compress.vib", "vcc.core.compress.magnitude"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise
