"""What `vcc train` and `vcc finetune` do around :func:`vcc.core.training.fit`.

A run folder gets ``run.json`` (dataset, model source, teacher, config) so that
``--resume RUN`` can rebuild everything from the folder alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vcc.core.artefact import (
    ModelMeta,
    build_from_meta,
    import_weights,
    input_spec,
    load_model,
    read_doc,
    read_model_meta,
)
from vcc.core.errors import UsageError, VccError
from vcc.core.progress import ProgressFn
from vcc.core.training import FitResult, TrainConfig, check_classes, fit
from vcc.core.workspace import Workspace, atomic_write_json, normal_mode, run_lock

RUN_FILE = "run.json"


@dataclasses.dataclass
class RunResult:
    """A finished (or stopped) run: its folder, name and fit's result."""

    name: str
    run_dir: Path
    fit: FitResult
    notes: list[str]


def load_init(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Copy matching weights from a vcc artefact or a third-party .pth/.safetensors into `model`.

    Tensors whose name and shape match are loaded; the rest (e.g. a classifier for other classes)
    keep their initialisation. Returns counts; a file that shares nothing with the model is an error.
    """
    from vcc.core.artefact import load_tensors

    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            doc = read_doc(path)
        except VccError as exc:
            if "not a vcc artefact" not in str(exc):
                raise
            doc = None
        if doc is None:
            state = import_weights(path)
        elif doc.get("format") == "vcc-model":
            state, _ = load_tensors(path, expect_format="vcc-model")
        else:
            raise VccError(f"--init {path} is a {doc['format']!r} artefact, not a model")
    else:
        state = import_weights(path)
    own = model.state_dict()
    loaded = {k: v for k, v in state.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    if not loaded:
        sample = ", ".join(list(state)[:3])
        raise VccError(f"--init {path}: no tensor matches the model by name and shape (file has e.g. {sample})")
    model.load_state_dict(loaded, strict=False)
    skipped = sorted(k for k in state if k not in loaded)
    missing = sorted(k for k in own if k not in loaded)
    return {"loaded": len(loaded), "skipped": skipped, "missing": missing}


def _dataset(ws: Workspace, data: str) -> Any:
    from vcc.core.data.manifest import load_dataset

    return load_dataset(ws.resolve_dataset(data))


def _load_teacher(ws: Workspace, spec: str | None, classes: list[str]) -> tuple[nn.Module | None, str | None]:
    if not spec:
        return None, None
    path = ws.resolve_model(spec)
    teacher, tmeta = load_model(path)
    check_classes(tmeta, classes, model_name=f"teacher {spec!r}", data_name="the dataset")
    return teacher, str(path)


def _rank() -> int:
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def _new_run_dir(ws: Workspace, name: str | None, default: str, doc: dict[str, Any]) -> tuple[str, Path]:
    """Claim a new run folder with its run.json in one step: the folder is built aside and renamed
    into place, which fails if the name was taken meanwhile (two `vcc train --name X` started
    together: one wins, the other is refused; without --name the next free name is taken)."""
    if _rank() > 0:  # under torchrun rank 0 alone checks and writes; every rank uses the same name
        name = name or default
        return name, ws.run_dir(name)
    explicit = bool(name) or int(os.environ.get("WORLD_SIZE", "1")) > 1
    ws.check_writable(ws.runs_dir)
    for _ in range(1000):
        run_name = (name or default) if explicit else ws.unique_run_name(default)
        run_dir = ws.run_dir(run_name)
        if explicit and run_dir.exists():
            raise _run_exists(ws, run_name, run_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f".{run_name}.", suffix=".tmp", dir=ws.runs_dir))
        normal_mode(tmp, is_dir=True)
        try:
            atomic_write_json(tmp / RUN_FILE, doc)
            os.rename(tmp, run_dir)  # atomic; fails on an existing non-empty folder
            return run_name, run_dir
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if not run_dir.exists():
                raise
            if explicit:
                raise _run_exists(ws, run_name, run_dir) from exc
    raise VccError(f"cannot find a free run name for {default!r} in {ws.runs_dir}")


def _data_ref(ws: Workspace, info: Any) -> dict[str, Any]:
    """How run.json names its dataset: the path, plus the workspace dataset name when it is one,
    so a moved or copied workspace resumes on its own copy."""
    root = Path(info.root)
    inside = root.parent == ws.datasets_dir
    return {"data": str(root), "data_name": root.name if inside else None}


def _resume_data(ws: Workspace, spec: dict[str, Any], data: str | None) -> Path:
    """The dataset a resumed run continues on: `data` if given, else the workspace's dataset of the
    recorded name (this workspace's copy, wherever it moved), else the recorded path."""
    if data:
        return ws.resolve_dataset(data)
    return ws.recorded_dataset_dir(spec["data"], spec.get("data_name")) or Path(spec["data"])


def _run_exists(ws: Workspace, name: str, run_dir: Path) -> UsageError:
    if any(run_dir.glob("*.safetensors")):
        return UsageError(f"run {name!r} already exists in {ws.runs_dir}; continue it with --resume {name} or pick another --name")
    return UsageError(f"run {name!r} already exists in {ws.runs_dir} and holds no model yet (another `vcc train` may be "
                      f"writing it, or one was killed); pick another --name, or delete {run_dir}")


@contextlib.contextmanager
def _discard_if_no_epoch(run_dir: Path) -> Iterator[None]:
    """A new run that fails (an error, not Ctrl-C) before finishing an epoch leaves no folder
    behind: its only state is the checkpoint written before the first epoch."""
    try:
        yield
    except Exception:
        if _rank() == 0 and not any(p.name != "checkpoint.safetensors" for p in run_dir.rglob("*.safetensors")):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def start_train(
    ws: Workspace,
    *,
    data: str,
    arch: str | None,
    name: str | None,
    cfg: TrainConfig,
    init: str | None = None,
    teacher: str | None = None,
    arch_options: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
) -> RunResult:
    """`vcc train`: build `arch` (or take `--init`'s artefact), train on `data` into a new run."""
    from vcc.core.models import build_model, get_spec

    info = _dataset(ws, data)
    classes = list(info.classes)
    notes: list[str] = []
    init_path = Path(init).expanduser() if init else None
    if init_path is not None and not init_path.is_file():
        init_path = ws.resolve_model(init)
    init_meta: ModelMeta | None = None
    if init_path is not None:
        try:
            doc = read_doc(init_path)
            init_meta = ModelMeta.from_json(doc) if doc.get("format") == "vcc-model" else None
        except VccError:
            init_meta = None
    if init_meta is not None and (arch is None or arch == init_meta.arch):
        arch = init_meta.arch
        options = dict(init_meta.options)
    else:
        arch = arch or "r3d_tiny"
        options = dict(arch_options or {})
    spec = get_spec(arch)
    # frames/size 0 = the init artefact's input, else the arch's design input
    cfg = dataclasses.replace(
        cfg,
        frames=cfg.frames or (init_meta.frames if init_meta else spec.frames),
        size=cfg.size or (init_meta.size if init_meta else spec.size),
    )
    torch.manual_seed(cfg.seed)
    if init_meta is not None and arch == init_meta.arch and list(init_meta.classes) == classes:
        model, meta = load_model(init_path)  # keeps wrappers, pruned shapes, masks
        model.train()
        notes.append(f"initialised from {init_path} (all weights)")
    else:
        model = build_model(arch, num_classes=len(classes), **options)
        meta = ModelMeta(arch=arch, num_classes=len(classes), options=options, classes=classes,
                         input=input_spec(cfg.frames, cfg.size, init_meta.mean if init_meta else None, init_meta.std if init_meta else None))
        if init_path is not None:
            res = load_init(model, init_path)
            notes.append(f"initialised from {init_path}: {res['loaded']} tensors loaded, {len(res['missing'])} kept fresh"
                         + (f" ({', '.join(res['missing'][:4])})" if res["missing"] else ""))
    meta.classes = classes
    meta.num_classes = len(classes)
    teacher_model, teacher_path = _load_teacher(ws, teacher, classes)
    return _run(ws, info, model, meta, cfg, name, f"{arch}-{info.name}", teacher_model, teacher_path, init_path, "train", notes, progress)


def start_finetune(
    ws: Workspace,
    *,
    model_spec: str,
    data: str,
    name: str | None,
    cfg: TrainConfig,
    teacher: str | None = None,
    progress: ProgressFn | None = None,
) -> RunResult:
    """`vcc finetune`: continue training any artefact (pruned, masked, gated) on `data`."""
    info = _dataset(ws, data)
    path = ws.resolve_model(model_spec)
    model, meta = load_model(path)
    check_classes(meta, list(info.classes), model_name=f"model {model_spec!r}", data_name=f"dataset {info.name!r}")
    from vcc.core.exits import drop_combine, has_combine

    notes = ["the WISE weights were dropped: they fit the old logits (refit with `vcc wise`)"] if has_combine(meta) else []
    model, meta = drop_combine(model, meta)
    model.train()
    cfg = dataclasses.replace(cfg, frames=cfg.frames or meta.frames, size=cfg.size or meta.size)
    teacher_model, teacher_path = _load_teacher(ws, teacher, list(info.classes))
    stem = path.parent.name if path.name in ("model.safetensors", "best.safetensors", "last.safetensors") else path.stem
    return _run(ws, info, model, meta, cfg, name, f"{stem}-ft", teacher_model, teacher_path, path, "finetune", notes, progress)


def _run(ws: Workspace, info: Any, model: nn.Module, meta: ModelMeta, cfg: TrainConfig, name: str | None, default_name: str,
         teacher: nn.Module | None, teacher_path: str | None, parent: Path | None, command: str, notes: list[str],
         progress: ProgressFn | None) -> RunResult:
    # The callers have matched meta's classes to the dataset's (fit checks them again).
    cfg.validate()  # before the run folder exists: a bad option leaves nothing behind
    from vcc.core.models import check_input

    check_input(model, cfg.frames, cfg.size, meta.arch)
    cfg = dataclasses.replace(cfg, command=command, init=str(parent) if parent else None)
    run_name, run_dir = _new_run_dir(ws, name, default_name, {
        "command": command, **_data_ref(ws, info), "teacher": teacher_path,
        "parent": str(parent) if parent else None, "config": cfg.to_json(), "meta": meta.to_json(),
    })
    with _locked(run_dir), _discard_if_no_epoch(run_dir):
        res = fit(model, meta, info, cfg, run_dir, teacher=teacher, progress=progress)
    return RunResult(run_name, run_dir, res, notes)


def resume(ws: Workspace, run: str, *, overrides: dict[str, Any] | None = None, data: str | None = None,
           progress: ProgressFn | None = None) -> RunResult:
    """Continue run `run` from its last checkpoint (`overrides`: epochs, workers, device, stop_after...;
    `data`: where its dataset is now, when it moved; the classes must match)."""

    run_dir = ws.run_dir(run)
    run_file = run_dir / RUN_FILE
    if not run_file.is_file():
        known = ", ".join(ws.runs()) or "none"
        raise VccError(f"no resumable run {run!r} in {ws.runs_dir} (runs: {known})")
    with _locked(run_dir):
        return _resume_locked(ws, run, run_dir, run_file, overrides, data, progress)


def _locked(run_dir: Path) -> Any:
    """The run's lock, on rank 0 only (the other ranks of a torchrun job write nothing)."""
    return run_lock(run_dir) if _rank() == 0 else contextlib.nullcontext()


def _resume_locked(ws: Workspace, run: str, run_dir: Path, run_file: Path, overrides: dict[str, Any] | None,
                   data: str | None, progress: ProgressFn | None) -> RunResult:
    from vcc.core.data.manifest import load_dataset
    from vcc.core.train_state import load_checkpoint

    spec = json.loads(run_file.read_text())
    ckpt = run_dir / "checkpoint.safetensors"
    if not ckpt.is_file():
        raise VccError(f"run {run!r} has no checkpoint yet (it stopped before finishing an epoch); start it again")
    parts, doc = load_checkpoint(ckpt)
    cfg = TrainConfig.from_json(doc["config"])
    changes = {k: v for k, v in (overrides or {}).items() if v is not None}
    cfg = dataclasses.replace(cfg, **changes)
    if cfg.epochs < int(doc["epoch"]):
        raise UsageError(f"--epochs {cfg.epochs} is fewer than the {doc['epoch']} epochs run {run!r} already did")
    meta = ModelMeta.from_json(doc["meta"])
    model = build_from_meta(meta, parts["model"])  # the structure (pruned shapes); fit restores the weights
    info = load_dataset(_resume_data(ws, spec, data))
    check_classes(meta, list(info.classes), model_name=f"run {run!r}", data_name=f"dataset {info.name!r}")
    teacher, _ = _load_teacher(ws, spec.get("teacher"), list(info.classes))
    spec["config"] = cfg.to_json()
    if _rank() == 0:
        atomic_write_json(run_file, {**spec, **_data_ref(ws, info)})  # where it trains now
    res = fit(model, meta, info, cfg, run_dir, teacher=teacher, resume=True, checkpoint=(parts, doc), progress=progress)
    notes = [f"resumed after epoch {doc['epoch']}"]
    if str(info.root) != spec["data"]:
        notes.append(f"on {info.root} (the run started on {spec['data']})")
    before = int(doc["config"].get("epochs", cfg.epochs))
    if cfg.epochs != before and cfg.schedule != "constant":
        notes.append(f"--epochs {cfg.epochs} changed the run's length from {before}: from epoch {int(doc['epoch']) + 1} on, "
                     f"the learning rate follows the {cfg.schedule} schedule stretched over {cfg.epochs} epochs")
    return RunResult(run, run_dir, res, notes)


def train_exits_run(
    ws: Workspace,
    *,
    data: str,
    init: str | None,
    name: str | None,
    cfg: TrainConfig,
    exits: str,
    kd: str,
    teachers: list[str],
    kd_epochs: list[int] | None,
    kd_temperature: float,
    progress: ProgressFn | None = None,
) -> RunResult:
    """`vcc train --exits`: early-exit heads on `--init`'s frozen backbone (vcc.core.exits)."""
    if not init:
        raise UsageError("--exits needs --init MODEL (the trained backbone to attach exits to)")
    from vcc.core.exits import train_exits

    info = _dataset(ws, data)
    init_path = ws.resolve_model(init)
    imeta = read_model_meta(init_path)  # the weights are loaded once, by train_exits
    check_classes(imeta, list(info.classes), model_name=f"model {init!r}", data_name=f"dataset {info.name!r}")
    teacher_paths = [str(ws.resolve_model(t)) for t in teachers]
    stem = init_path.parent.name if init_path.name == "model.safetensors" else init_path.stem
    cfg = dataclasses.replace(cfg, command="train-exits", init=str(init_path), frames=cfg.frames or imeta.frames, size=cfg.size or imeta.size)
    cfg.validate()  # before the run folder exists: a bad option leaves nothing behind
    run_name, run_dir = _new_run_dir(ws, name, f"{stem}-exits", {
        "command": "train-exits", **_data_ref(ws, info), "parent": str(init_path), "exits": exits, "kd": kd,
        "teachers": teacher_paths, "kd_epochs": kd_epochs, "config": cfg.to_json(),
    })
    with _locked(run_dir), _discard_if_no_epoch(run_dir):
        res = train_exits(init_path, info, cfg, run_dir, exits=exits, kd=kd, teachers=teacher_paths or None,
                          kd_epochs=kd_epochs, kd_temperature=kd_temperature, progress=progress)
    return RunResult(run_name, run_dir, res, [])
