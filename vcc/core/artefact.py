"""Self-describing `.safetensors` artefacts. Nothing is ever unpickled.

A model artefact holds the state dict as tensors and one metadata key, ``vcc``, whose value is
a JSON document::

    {"format": "vcc-model", "format_version": 1,
     "arch": "r3d_tiny", "options": {...builder kwargs...}, "num_classes": 10,
     "classes": [...], "input": {"channels": 3, "frames": 8, "size": 32, "mean": [...], "std": [...]},
     "wrappers": [{"name": "exits", "options": {...}}],     # applied after the builder, in order
     "structure": {"layer1.0.conv1": {"in_channels": 16, "out_channels": 12, "groups": 1}, ...},
     "provenance": {"command": "...", "parent_sha256": "...", "vcc_version": "...",
                    "created": "...", "metrics": {...}},
     "extra": {...}}                                          # free-form, per command

"structure" records the size attributes of every conv/linear/norm/recurrent module, so a model
whose channels were pruned is rebuilt from arch + options and then resized to fit.

Other artefacts (rankings, logits) use the same container with ``format`` set to their kind; see
:func:`save_tensors` and :func:`load_tensors`.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import vcc
from vcc.core.errors import ArtefactError, first_line
from vcc.core.workspace import atomic_path

FORMAT_VERSION = 1
MODEL_FORMAT = "vcc-model"
META_KEY = "vcc"

# Attributes that fix a module's tensor shapes; recorded so pruned models can be rebuilt.
SIZE_ATTRS = (
    "in_channels",
    "out_channels",
    "groups",
    "num_features",
    "in_features",
    "out_features",
    "input_size",
    "hidden_size",
    "proj_size",
    "num_embeddings",
    "embedding_dim",
    "normalized_shape",
    "num_channels",
    "pad_channels",
)
DEFAULT_MEAN = [0.43216, 0.394666, 0.37645]  # Kinetics statistics used by torchvision video models
DEFAULT_STD = [0.22803, 0.22145, 0.216989]


@dataclass
class ModelMeta:
    """The metadata of a model artefact. Everything needed to rebuild the model."""

    arch: str
    num_classes: int
    options: dict[str, Any] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)
    input: dict[str, Any] = field(default_factory=dict)
    wrappers: list[dict[str, Any]] = field(default_factory=list)
    structure: dict[str, dict[str, Any]] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def frames(self) -> int:
        return int(self.input.get("frames", 16))

    @property
    def size(self) -> int:
        return int(self.input.get("size", 112))

    @property
    def channels(self) -> int:
        return int(self.input.get("channels", 3))

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """(C, T, H, W) of one clip."""
        return (self.channels, self.frames, self.size, self.size)

    @property
    def mean(self) -> list[float]:
        return list(self.input.get("mean", DEFAULT_MEAN))

    @property
    def std(self) -> list[float]:
        return list(self.input.get("std", DEFAULT_STD))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MODEL_FORMAT,
            "format_version": FORMAT_VERSION,
            "arch": self.arch,
            "num_classes": self.num_classes,
            "options": self.options,
            "classes": self.classes,
            "input": self.input,
            "wrappers": self.wrappers,
            "structure": self.structure,
            "provenance": self.provenance,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ModelMeta:
        try:
            return cls(
                arch=str(doc["arch"]),
                num_classes=int(doc["num_classes"]),
                options=dict(doc.get("options") or {}),
                classes=list(doc.get("classes") or []),
                input=dict(doc.get("input") or {}),
                wrappers=list(doc.get("wrappers") or []),
                structure=dict(doc.get("structure") or {}),
                provenance=dict(doc.get("provenance") or {}),
                extra=dict(doc.get("extra") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtefactError(f"malformed vcc metadata: {exc}") from exc

    def child(self, **changes: Any) -> ModelMeta:
        """A copy with some fields replaced (structure and provenance are recomputed on save)."""
        doc = json.loads(json.dumps(self.to_json()))
        doc.update(changes)
        return ModelMeta.from_json(doc)


def input_spec(frames: int, size: int, mean: list[float] | None = None, std: list[float] | None = None) -> dict[str, Any]:
    """The input spec stored in metadata: (C=3, T=frames, H=W=size), normalisation."""
    return {
        "channels": 3,
        "frames": int(frames),
        "size": int(size),
        "mean": list(mean or DEFAULT_MEAN),
        "std": list(std or DEFAULT_STD),
    }


def provenance(parent: str | Path | None = None, metrics: dict[str, Any] | None = None, *,
               dataset: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    """Where an artefact came from: command line, parent sha256, vcc version, time, metrics, and
    the dataset it was made with (:func:`dataset_ref`; without one, the parent's, if it records one)."""
    doc: dict[str, Any] = {
        "command": shlex.join(["vcc", *sys.argv[1:]]) if sys.argv else "",
        "parent_sha256": sha256_file(parent) if parent else None,
        "vcc_version": vcc.__version__,
        "torch_version": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "metrics": metrics or {},
    }
    if dataset is None and parent:
        dataset = recorded_dataset(parent)
    if dataset:
        doc["dataset"] = dataset
    doc.update(extra)
    return doc


def dataset_ref(info: Any) -> dict[str, str]:
    """How an artefact records a prepared dataset (a DatasetInfo): its name and folder."""
    return {"name": str(info.name), "path": str(Path(info.root).resolve())}


def recorded_dataset(source: str | Path | ModelMeta) -> dict[str, str] | None:
    """The dataset an artefact (a path or its metadata) records it was made with, or None."""
    if isinstance(source, ModelMeta):
        prov = source.provenance
    else:
        try:
            prov = read_doc(source).get("provenance")
        except ArtefactError:
            return None
    ref = prov.get("dataset") if isinstance(prov, dict) else None
    return ref if isinstance(ref, dict) and ref.get("name") else None


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file (remembered per path, size and mtime: a training run's every
    checkpoint records its parent's hash without reading the parent again)."""
    st = os.stat(path)
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- structure (pruned shapes)


def _attr_json(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def module_structure(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Size attributes of every module that has any (convs, linears, norms, LSTMs...)."""
    out: dict[str, dict[str, Any]] = {}
    for name, mod in model.named_modules():
        attrs = {a: _attr_json(getattr(mod, a)) for a in SIZE_ATTRS if isinstance(getattr(mod, a, None), (int, tuple, list))}
        if attrs:
            out[name] = attrs
    return out


def apply_structure(model: nn.Module, structure: dict[str, dict[str, Any]], state: dict[str, torch.Tensor]) -> None:
    """Resize `model` in place so that its modules' size attributes and tensors fit `state`.

    Size attributes come from `structure`; parameter and buffer shapes from `state`. Only
    tensors whose shapes differ are replaced (with uninitialised storage to be loaded next).
    """
    modules = dict(model.named_modules())
    for name, attrs in structure.items():
        mod = modules.get(name)
        if mod is None:
            continue
        for attr, value in attrs.items():
            if hasattr(mod, attr):
                cur = getattr(mod, attr)
                setattr(mod, attr, tuple(value) if isinstance(cur, tuple) else value)
    for mod_name, mod in modules.items():
        prefix = f"{mod_name}." if mod_name else ""
        for pname, param in list(mod.named_parameters(recurse=False)):
            key = prefix + pname
            if key in state and tuple(state[key].shape) != tuple(param.shape):
                setattr(mod, pname, nn.Parameter(torch.empty(state[key].shape, dtype=param.dtype), requires_grad=param.requires_grad))
        for bname, buf in list(mod.named_buffers(recurse=False)):
            key = prefix + bname
            if buf is not None and key in state and tuple(state[key].shape) != tuple(buf.shape):
                mod._buffers[bname] = torch.empty(state[key].shape, dtype=buf.dtype)
        if isinstance(mod, nn.RNNBase):
            mod._init_flat_weights()


# ---------------------------------------------------------------- generic tensor container


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> Path:
    """Atomically write tensors plus the JSON document `doc` (must contain "format")."""
    from safetensors.torch import save_file

    if "format" not in doc:
        raise ValueError("artefact metadata needs a 'format' field")
    doc = {"format_version": FORMAT_VERSION, **doc}
    path = Path(path)
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    # safetensors refuses tensors sharing memory; clone duplicates.
    seen: dict[int, str] = {}
    for k, v in flat.items():
        ptr = v.data_ptr() if v.numel() else -1
        if ptr in seen and ptr != -1:
            flat[k] = v.clone()
        else:
            seen[ptr] = k
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata={META_KEY: json.dumps(doc)})
    return path


def _magic(path: Path) -> bytes:
    """The first 4 bytes of `path` (b"" when it cannot be read)."""
    try:
        with path.open("rb") as fh:
            return fh.read(4)
    except OSError:
        return b""


def _torch_checkpoint(magic: bytes) -> bool:
    """Whether a file starting with `magic` is a torch.save file: its zip format, or a legacy pickle."""
    return magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"


def _looks_like(path: Path) -> str:
    """A hint for a file that is not an artefact: what it seems to be and what to do with it."""
    from vcc.core.data.prepare import VIDEO_EXTS  # only on this error path

    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "; it is an ONNX model: vcc reads its own .safetensors artefacts (`vcc port --onnx` exports ONNX, one way)"
    if suffix in (".pth", ".pt", ".ckpt") or _torch_checkpoint(_magic(path)):
        return "; it looks like a PyTorch checkpoint: start from its weights with `vcc train --init FILE --arch ARCH`"
    if suffix in VIDEO_EXTS:
        return "; it is a video: `vcc prepare` makes datasets of videos"
    return ""


def read_doc(path: str | Path) -> dict[str, Any]:
    """The JSON document of an artefact, without loading tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ArtefactError(f"file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise ArtefactError(f"{path} is not a readable safetensors file ({first_line(exc)}){_looks_like(path)}") from exc
    if META_KEY not in meta:
        raise ArtefactError(f"{path} is a safetensors file but not a vcc artefact (no '{META_KEY}' metadata)")
    try:
        doc = json.loads(meta[META_KEY])
    except json.JSONDecodeError as exc:
        raise ArtefactError(f"{path}: corrupt vcc metadata ({exc})") from exc
    if not isinstance(doc, dict) or "format" not in doc:
        raise ArtefactError(f"{path}: vcc metadata has no 'format'")
    if int(doc.get("format_version", 0)) > FORMAT_VERSION:
        raise ArtefactError(f"{path}: written by a newer vcc (format_version {doc['format_version']})")
    return doc


def read_model_meta(path: str | Path) -> ModelMeta:
    """A model artefact's metadata (arch, classes, input spec...) without loading its weights."""
    doc = read_doc(path)
    if doc["format"] != MODEL_FORMAT:
        raise ArtefactError(f"{path} is a {doc['format']!r} artefact, expected {MODEL_FORMAT!r}")
    return ModelMeta.from_json(doc)


def load_tensors(path: str | Path, expect_format: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and JSON document of an artefact; checks its format when `expect_format` is given."""
    from safetensors.torch import load_file

    doc = read_doc(path)
    if expect_format is not None and doc["format"] != expect_format:
        raise ArtefactError(f"{path} is a {doc['format']!r} artefact, expected {expect_format!r}")
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise ArtefactError(f"{path} is truncated or corrupt ({first_line(exc)})") from exc
    return tensors, doc


# ---------------------------------------------------------------- model artefacts


def save_model(path: str | Path, model: nn.Module, meta: ModelMeta) -> Path:
    """Atomically save `model` with `meta` (structure is recomputed from the model)."""
    meta.structure = module_structure(model)
    if not meta.provenance:
        meta.provenance = provenance()
    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    return save_tensors(path, state, meta.to_json())


def build_from_meta(meta: ModelMeta, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Build the (possibly pruned or wrapped) model described by `meta`, with no weights loaded."""
    from vcc.core.models import apply_wrappers, build_model

    model = build_model(meta.arch, num_classes=meta.num_classes, **meta.options)
    model = apply_wrappers(model, meta.wrappers)
    if meta.structure and state is not None:
        apply_structure(model, meta.structure, state)
    return model


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelMeta]:
    """Load a model artefact: rebuild from metadata, resize to fit, load weights strictly, eval()."""
    tensors, doc = load_tensors(path, expect_format=MODEL_FORMAT)
    meta = ModelMeta.from_json(doc)
    try:
        model = build_from_meta(meta, tensors)
    except ArtefactError:
        raise
    except Exception as exc:
        raise ArtefactError(f"{path}: cannot build arch {meta.arch!r} ({first_line(exc)})") from exc
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise ArtefactError(f"{path}: weights do not fit arch {meta.arch!r}: {detail[:300]}") from exc
    model.eval()
    return model.to(device), meta


def import_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a third-party file: `.safetensors`, or `.pth/.pt` via torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise ArtefactError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise ArtefactError(f"{path}: unreadable safetensors ({first_line(exc)})") from exc
    if not _torch_checkpoint(_magic(path)):
        raise ArtefactError(f"{path}: not a PyTorch checkpoint (.pth/.pt) or a .safetensors file")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        if "Weights only load failed" in str(exc):
            raise ArtefactError(f"{path}: holds Python objects besides tensors, and vcc never unpickles them; "
                                f"save the model's state_dict() (or use .safetensors)") from exc
        raise ArtefactError(f"{path}: unreadable checkpoint ({first_line(exc)})") from exc
    for key in ("state_dict", "model", "model_state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ArtefactError(f"{path}: expected a state dict")
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
