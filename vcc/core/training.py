"""The one training loop: train, finetune and every compression step that trains.

`fit` trains a model on a prepared dataset (or on ready-made loaders), validates each epoch with
video-level accuracy on the test split, and keeps under the run folder:

- ``best.safetensors`` / ``last.safetensors`` / ``model.safetensors`` (= best) model artefacts with
  their metrics in provenance,
- ``checkpoint.safetensors`` (+ a readable ``checkpoint.json``): model, optimizer, scheduler,
  scaler, RNG states and epoch, written atomically every epoch (no pickle anywhere),
- ``metrics.jsonl``: one line per epoch.

Resuming (`resume=True`) continues bit-exactly from the last completed epoch: each epoch seeds
every RNG (and the loader's generator) from ``seed + epoch``, so an epoch is a pure function of the
weights and optimizer state it starts from. That is also why a Ctrl-C keeps the checkpoint of the
last completed epoch (one is written before the first epoch too) and only notes where it stopped:
the interrupted epoch is redone from its start, not continued from weights that already took part of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vcc.core.artefact import ModelMeta, dataset_ref, input_spec, provenance, save_model
from vcc.core.errors import UsageError, VccError, first_line
from vcc.core.progress import ProgressFn
from vcc.core.workspace import atomic_path, atomic_write_json, atomic_write_text

Criterion = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], "tuple[torch.Tensor, Any]"]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
HASH_ENV = "VCC_WEIGHTS_HASH_DIR"  # tests: every rank writes the sha256 of its final weights here


@dataclass
class TrainConfig:
    """Every knob of :func:`fit`. Defaults train r3d_tiny on the synthetic set on a CPU."""

    frames: int = 8
    size: int = 32
    epochs: int = 20
    batch_size: int = 8
    lr: float = 3e-3
    optimizer: str = "adamw"
    schedule: str = "cosine"
    warmup: float = 1.0  # epochs of linear warm-up (fractions allowed)
    weight_decay: float = 0.01
    momentum: float = 0.9
    workers: int = 0  # loader processes; 0 decodes in the main process (best on a small CPU)
    device: str = "auto"
    amp: bool = True  # autocast on CUDA (bf16 where supported, else fp16 + GradScaler); ignored on CPU
    compile: bool = False
    compile_mode: str | None = None  # a torch.compile mode; implies compile
    seed: int = 0
    kd_temperature: float = 4.0
    kd_alpha: float = 0.5
    label_smoothing: float = 0.0
    step_size: int = 0  # epochs per decay for schedule "step" (0: a third of the epochs)
    gamma: float = 0.1
    grad_clip: float | None = None
    val_clips: int = 1  # clips per video during per-epoch validation
    val_split: str = "auto"  # the split that picks the best epoch; auto: "val" where prepared, else "test"
    max_batches: int | None = None  # cap on batches per epoch (smoke runs)
    stop_after: int | None = None  # stop (resumably) after this many epochs in this call
    init: str | None = None  # parent artefact path, recorded in provenance
    command: str = "train"

    def validate(self) -> None:
        """UsageError for values out of range."""
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"--schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}")
        for name in ("frames", "size", "epochs", "batch_size", "val_clips"):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise UsageError(f"--lr must be > 0, got {self.lr}")
        if self.warmup < 0 or self.weight_decay < 0 or self.workers < 0:
            raise UsageError("--warmup, --weight-decay and --workers must be >= 0")
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise UsageError(f"--kd-alpha must be in [0, 1], got {self.kd_alpha}")
        if not self.kd_temperature > 0:
            raise UsageError(f"--kd-temperature must be > 0, got {self.kd_temperature}")
        if self.compile_mode is not None and self.compile_mode not in COMPILE_MODES:
            raise UsageError(f"--compile-mode must be one of {', '.join(COMPILE_MODES)}, not {self.compile_mode!r}")
        if self.device != "auto":
            resolve_device(self.device)  # a device this machine lacks is a usage error, found before anything is written

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in names})


@dataclass
class FitResult:
    """What :func:`fit` produced: artefact paths, per-epoch history, the best epoch's record."""

    best_path: Path
    last_path: Path
    model_path: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)
    # the split the best epoch was chosen on ("test" when the dataset has no other), None: by train
    # loss, "last": the last epoch is the result (early-exit heads after their whole KD schedule)
    selected_on: str | None = None


@dataclass
class Loaders:
    """Ready-made data for :func:`fit`: a train loader, an optional validation loader, class names.

    Batches are ``(clips, labels, video_idx)``; clips uint8 (normalised on the device with the
    model's mean/std) or float (used as they are).
    """

    train: Iterable
    val: Iterable | None
    classes: list[str]
    val_split: str | None = None  # the dataset split `val` reads, when known
    dataset: dict[str, str] | None = None  # artefact.dataset_ref of the prepared dataset, when known


# ---------------------------------------------------------------- devices and inputs


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """`auto` -> CUDA when available else CPU; `cpu`, `cuda`, `cuda:N` checked against the machine."""
    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available on this machine (use --device cpu)")
        try:
            dev = torch.device(spec)
        except RuntimeError as exc:
            raise UsageError(f"bad --device {spec!r}") from exc
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
        return dev
    raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, not {spec!r}")


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `device`: bf16 where supported, else fp16; None on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast on CUDA with `dtype`, a no-op otherwise."""
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def has_conv3d(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv3d) for m in model.modules())


def channels_last_convs(model: nn.Module, clip_shape: tuple[int, ...]) -> int:
    """Store the weights of `model`'s Conv3d layers channels_last_3d, where the layout is unambiguous.

    A conv whose input or output has a spatial extent of 1 on some axis (a 1-frame-deep last stage,
    say) keeps its weight contiguous: there the two layouts share a shape, strides of size-1 axes
    are arbitrary, and inductor's compiled backward asserted strides cuDNN did not produce. One
    clip of `clip_shape` (C, T, H, W) runs once in eval mode without gradients, on the model's
    device, to find the shapes. Returns the number of convs converted.
    """
    from vcc.core.probe import probe_forward

    shapes: dict[nn.Module, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        shapes[mod] = (tuple(args[0].shape[2:]), tuple(out.shape[2:]))

    convs = [m for m in model.modules() if isinstance(m, nn.Conv3d)]
    device = next(model.parameters()).device
    example = torch.zeros(1, *clip_shape, device=device).contiguous(memory_format=torch.channels_last_3d)
    probe_forward(model, example, [(m, hook) for m in convs])
    n = 0
    for m in convs:
        sin, sout = shapes.get(m, ((1,), (1,)))
        if min(sin) > 1 and min(sout) > 1:
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last_3d)
            n += 1
    return n


def space_to_depth_stem(model: nn.Module, in_channels: int = 3) -> Callable[[], None] | None:
    """Run the input conv (RGB, k x 2·odd spatial kernel at spatial stride 2) as a stride-1 conv on 2x2 blocks.

    The 3x7x7 stride-(1,2,2) stem of a 3D ResNet becomes a 3x4x4 stride-1 conv over 12 channels (the
    kernel zero-padded to 8x8): the same function, on a shape tensor cores handle well. Parameters and
    state dict are untouched. Returns a function that undoes it, or None when the model has no such conv.
    """
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv3d) and m.in_channels == in_channels), None)
    if conv is None or conv.groups != 1 or conv.stride[1:] != (2, 2) or conv.dilation != (1, 1, 1):
        return None
    kh, kw = conv.kernel_size[1:]
    if kh % 2 == 0 or kw % 2 == 0 or not isinstance(conv.padding, tuple) or conv.padding_mode != "zeros":
        return None
    pt, ph, pw = conv.padding

    def forward(x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        ho, wo = (h + 2 * ph - kh) // 2 + 1, (w + 2 * pw - kw) // 2 + 1
        need_h, need_w = 2 * ho + kh - 1, 2 * wo + kw - 1  # kernel padded to kh+1 taps
        xp = F.pad(x, (pw, need_w - w - pw, ph, need_h - h - ph))
        xs = xp.view(b, c, t, need_h // 2, 2, need_w // 2, 2).permute(0, 1, 4, 6, 2, 3, 5).reshape(b, 4 * c, t, need_h // 2, need_w // 2)
        wt = F.pad(conv.weight, (0, 1, 0, 1))
        o, kt = wt.shape[0], wt.shape[2]
        ws = wt.view(o, c, kt, (kh + 1) // 2, 2, (kw + 1) // 2, 2).permute(0, 1, 4, 6, 2, 3, 5).reshape(o, 4 * c, kt, (kh + 1) // 2, (kw + 1) // 2)
        if x.is_contiguous(memory_format=torch.channels_last_3d):
            xs = xs.contiguous(memory_format=torch.channels_last_3d)
            ws = ws.contiguous(memory_format=torch.channels_last_3d)
        return F.conv3d(xs, ws, conv.bias, (conv.stride[0], 1, 1), (pt, 0, 0))

    conv.forward = forward

    def undo() -> None:
        del conv.forward

    return undo


def prepare_input(
    x: torch.Tensor,
    device: torch.device,
    mean: list[float],
    std: list[float],
    channels_last: bool = False,
) -> torch.Tensor:
    """Move a batch to `device` (non-blocking) and, if uint8, normalise it there to float."""
    x = x.to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        m = torch.tensor(mean, device=device, dtype=torch.float32).view(1, -1, 1, 1, 1)
        s = torch.tensor(std, device=device, dtype=torch.float32).view(1, -1, 1, 1, 1)
        x = (x.float().div_(255.0) - m).div_(s)
    if channels_last and x.dim() == 5:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x


def final_logits(out: Any) -> torch.Tensor:
    """The final classifier's logits from a model output (multi-exit models return a list)."""
    if isinstance(out, (list, tuple)):
        return out[-1]
    if isinstance(out, dict):
        return out.get("logits", next(reversed(out.values())))
    return out


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ---------------------------------------------------------------- data


def dataset_info(data: Any) -> Any:
    """A DatasetInfo from a DatasetInfo, a dataset folder, or its dataset.json."""
    if hasattr(data, "entries") and hasattr(data, "classes"):
        return data
    if isinstance(data, (str, Path)):
        from vcc.core.data.manifest import load_dataset

        path = Path(data)
        if path.is_file():
            path = path.parent
        if not (path / "dataset.json").is_file():
            raise VccError(f"dataset not found: {data} (no dataset.json)")
        return load_dataset(path)
    raise TypeError(f"expected a DatasetInfo, a dataset folder or Loaders, got {type(data).__name__}")


def check_classes(meta: ModelMeta, classes: list[str], model_name: str = "model", data_name: str = "dataset") -> None:
    """VccError when the model's classes do not match the dataset's."""
    if meta.classes and list(meta.classes) != list(classes):
        diff = sorted(set(meta.classes) ^ set(classes))[:4]
        hint = f"; differing: {', '.join(diff)}" if diff else " (same names, different order)"
        raise VccError(
            f"class mismatch: {model_name} has {len(meta.classes)} classes, {data_name} has {len(classes)}{hint}"
        )
    if meta.num_classes != len(classes):
        raise VccError(f"class mismatch: {model_name} has {meta.num_classes} outputs, {data_name} has {len(classes)} classes")


def _load_failures(loaders: Loaders) -> int:
    """Clip loads that failed so far (each replaced by another video), over both loaders."""
    return sum(int(getattr(getattr(ld, "dataset", None), "failures", 0) or 0) for ld in (loaders.train, loaders.val))


def _make_loaders(data: Any, cfg: TrainConfig, distributed: bool, pin: bool) -> Loaders:
    if isinstance(data, Loaders):
        return data
    info = dataset_info(data)
    from vcc.core.data.loader import make_loader

    if not info.split("train"):
        raise VccError(f"dataset {info.name!r} has no training videos")
    train = make_loader(
        info, "train", train=True, frames=cfg.frames, size=cfg.size, batch_size=cfg.batch_size,
        workers=cfg.workers, seed=cfg.seed, distributed=distributed, pin_memory=pin,
    )
    split = cfg.val_split
    if split == "auto":
        split = "val" if info.counts.get("val") else "test"
    val = None
    if info.split(split):
        val = make_loader(
            info, split, train=False, frames=cfg.frames, size=cfg.size, batch_size=cfg.batch_size,
            workers=cfg.workers, clips=cfg.val_clips, seed=cfg.seed, pin_memory=pin,
        )
    return Loaders(train, val, list(info.classes), split if val is not None else None, dataset_ref(info))


def _seed_epoch(loader: Any, seed: int, epoch: int) -> None:
    """Make epoch `epoch` a pure function of (seed, epoch): RNGs, loader generator, sampler epoch."""
    seed_everything(seed * 1_000_003 + epoch)
    gen = getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator):
        gen.manual_seed(seed * 1_000_003 + epoch)
    sampler = getattr(loader, "sampler", None)
    if hasattr(loader, "set_epoch"):  # vcc's ClipLoader: shuffle and augmentation follow the epoch
        loader.set_epoch(epoch)
    elif hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    sampler_gen = getattr(sampler, "generator", None)
    if isinstance(sampler_gen, torch.Generator) and sampler_gen is not gen:
        sampler_gen.manual_seed(seed * 1_000_003 + epoch)


def _loader_len(loader: Iterable, cap: int | None) -> int | None:
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError:
        return cap
    return min(n, cap) if cap else n


# ---------------------------------------------------------------- optimisation


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable params only; no weight decay on biases and norm weights (1-d tensors)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() > 1 else no_decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if not groups:
        raise VccError("the model has no trainable parameters (everything is frozen)")
    return groups


def make_optimizer(params: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum) or AdamW over `params` (groups may carry their own lr/decay)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The multiplier of each group's lr at optimizer step `s` (warm-up, then cosine/step/constant)."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = min(int(round(cfg.warmup * steps_per_epoch)), total - 1)
    step_size = cfg.step_size or max(1, cfg.epochs // 3)

    def factor(s: int) -> float:
        if s < warm:
            return (s + 1) / (warm + 1)
        if cfg.schedule == "cosine":
            t = (s - warm) / max(1, total - warm)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
        if cfg.schedule == "step":
            return cfg.gamma ** ((s // steps_per_epoch) // step_size)
        return 1.0

    return factor


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(teacher ‖ student) on temperature-softened distributions (Hinton et al.)."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student.float() / t, dim=1),
        F.log_softmax(teacher.float() / t, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)


def default_criterion(cfg: TrainConfig, teacher: nn.Module | None = None) -> Criterion:
    """Cross-entropy; with a teacher (1-α)·CE + α·T²·KL(teacher ‖ student)."""

    def criterion(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits = final_logits(model(x))
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        if teacher is not None and cfg.kd_alpha > 0:
            with torch.no_grad():
                t_logits = final_logits(teacher(x))
            loss = (1.0 - cfg.kd_alpha) * loss + cfg.kd_alpha * kd_loss(logits, t_logits, cfg.kd_temperature)
        return loss, logits

    return criterion


def _keep_frozen_bn_eval(model: nn.Module) -> None:
    """Norm layers whose parameters are all frozen keep their running statistics (eval mode)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                m.eval()


# ---------------------------------------------------------------- distributed


@dataclass
class _Dist:
    world: int = 1
    rank: int = 0
    local_rank: int = 0
    created: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _dist_setup(device_spec: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    created = False
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_spec != "cpu"
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        created = True
    return _Dist(dist.get_world_size(), dist.get_rank(), local, created)


# ---------------------------------------------------------------- the loop


def fit(
    model: nn.Module,
    meta: ModelMeta,
    data: Any,
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    criterion: Criterion | None = None,
    param_groups: list[dict[str, Any]] | None = None,
    teacher: nn.Module | None = None,
    epoch_hook: Callable[[int, nn.Module], dict[str, Any]] | None = None,
    resume: bool = False,
    checkpoint: tuple[dict[str, Any], dict[str, Any]] | None = None,
    progress: ProgressFn | None = None,
) -> FitResult:
    """Train `model` on `data` (DatasetInfo, dataset folder or :class:`Loaders`) into `run_dir`.

    `criterion(model, x, y, epoch) -> (loss, logits)` replaces CE (+KD when `teacher` is given);
    `param_groups` replaces the default single trainable group (e.g. a separate gate lr);
    `epoch_hook(epoch, model) -> dict` adds metrics to each epoch's record. Parameters with
    ``requires_grad=False`` stay frozen; buffers (masks) are never trained. With `resume=True`
    training continues from ``run_dir/checkpoint.safetensors`` (or from `checkpoint`, its
    already-loaded ``(parts, doc)``). KeyboardInterrupt saves a resumable checkpoint, then propagates;
    in the main thread a first Ctrl-C takes effect at the next batch boundary (see _DeferredInterrupt).
    """
    cfg.validate()
    run_dir = Path(run_dir)
    dd = _dist_setup(cfg.device)
    try:
        if dd.world > 1 and torch.cuda.is_available() and cfg.device != "cpu":
            device = torch.device("cuda", dd.local_rank)
        else:
            device = resolve_device(cfg.device)
        return _fit(model, meta, data, cfg, run_dir, device, dd, criterion, param_groups, teacher, epoch_hook, resume, checkpoint, progress)
    finally:
        if dd.created:
            import torch.distributed as dist

            dist.destroy_process_group()


class _DeferredInterrupt:
    """Ctrl-C during training stops at the next batch boundary instead of wherever Python is.

    With the default handler, a SIGINT that lands in a library finaliser (decord's
    ``VideoReader.__del__``) is printed as "Exception ignored" and lost, and the run goes on. Here
    the first Ctrl-C only sets `requested` (the loop raises KeyboardInterrupt at a safe point and
    checkpoints); a second one raises at once. Installed only in the main thread over the default
    handler, so embedding applications keep theirs. Forked loader workers inherit the handler and
    ignore the signal: the main process shuts them down when it stops.
    """

    def __init__(self) -> None:
        self.requested = False
        self._pid = os.getpid()
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return
        # SIGTERM too (a cluster scheduler's preemption, `kill`): the same graceful stop, where it
        # would otherwise kill the process (default) or raise anywhere (vcc's CLI maps it to Ctrl-C)
        for sig in (signal.SIGINT, signal.SIGTERM):
            prev = signal.getsignal(sig)
            if prev is signal.default_int_handler or (sig == signal.SIGTERM and prev is signal.SIG_DFL):
                self._previous[sig] = prev
                signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked loader worker
            if signum == signal.SIGTERM:
                os._exit(128 + signum)  # the DataLoader terminates a stuck worker this way: let it
            return  # Ctrl-C: the main process stops it at the batch boundary
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        what = b"Ctrl-C" if signum == signal.SIGINT else b"terminate signal"
        try:  # a raw write: a signal handler must not re-enter the progress display
            os.write(2, b"\n" + what + b": stopping after this batch (again to stop now)\n")
        except OSError:
            pass

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous = {}


def _fit(
    model: nn.Module,
    meta: ModelMeta,
    data: Any,
    cfg: TrainConfig,
    run_dir: Path,
    device: torch.device,
    dd: _Dist,
    criterion: Criterion | None,
    param_groups: list[dict[str, Any]] | None,
    teacher: nn.Module | None,
    epoch_hook: Callable[[int, nn.Module], dict[str, Any]] | None,
    resume: bool,
    checkpoint: tuple[dict[str, Any], dict[str, Any]] | None,
    progress: ProgressFn | None,
) -> FitResult:
    from vcc.core.evaluate import predict, video_accuracy

    report = progress if dd.main else None
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(cfg.seed)
    loaders = _make_loaders(data, cfg, distributed=dd.world > 1, pin=cuda)
    check_classes(meta, loaders.classes)
    if dd.main:
        run_dir.mkdir(parents=True, exist_ok=True)

    dtype = amp_dtype(device) if cfg.amp else None
    # channels_last_3d inputs and conv weights (where the layout is unambiguous: see channels_last_convs)
    channels_last = cuda and dtype is not None and has_conv3d(model)
    raw = model.to(device)
    if channels_last:
        channels_last_convs(raw, (meta.channels, cfg.frames, cfg.size, cfg.size))
    # The RGB stem as a stride-1 conv on 2x2 blocks: the same function, 2.1x faster on H100 tensor cores.
    undo_stem = space_to_depth_stem(raw) if cuda and dtype is not None else None
    if teacher is not None:
        teacher = teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    optimizer = make_optimizer(param_groups if param_groups is not None else _param_groups(raw, cfg.weight_decay), cfg)
    steps_per_epoch = max(1, _loader_len(loaders.train, cfg.max_batches) or 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch))
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    out_meta = meta.child(classes=list(loaders.classes), input=input_spec(cfg.frames, cfg.size, meta.mean, meta.std))
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {}
    start_epoch = 0
    ckpt_path = run_dir / "checkpoint.safetensors"
    if resume:
        start_epoch, history, best = _restore(ckpt_path, raw, optimizer, scheduler, scaler, loaders.train, steps_per_epoch, checkpoint)
        if report:
            report("resume", start_epoch, cfg.epochs, {"from epoch": start_epoch})

    train_model: nn.Module = raw
    if dd.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(raw, device_ids=[device.index] if cuda else None)
    if cfg.compile or cfg.compile_mode:
        train_model = torch.compile(train_model, mode=None if cfg.compile_mode in (None, "default") else cfg.compile_mode)
    crit = criterion or default_criterion(cfg, teacher)

    best_path, last_path, model_path = run_dir / "best.safetensors", run_dir / "last.safetensors", run_dir / "model.safetensors"
    stop_at = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, start_epoch + cfg.stop_after)
    epoch = start_epoch
    batch_i = 0
    if dd.main and not resume:  # the state a Ctrl-C in the first epoch resumes from
        _save_checkpoint(ckpt_path, raw, out_meta, cfg, optimizer, scheduler, scaler, loaders.train, start_epoch, history, best, None)
    ctrl_c = _DeferredInterrupt() if dd.world == 1 else None
    try:
        for epoch in range(start_epoch, stop_at):
            batch_i = 0
            if ctrl_c and ctrl_c.requested:
                raise KeyboardInterrupt
            _seed_epoch(loaders.train, cfg.seed, epoch)
            failed_before = _load_failures(loaders)
            train_model.train()
            _keep_frozen_bn_eval(raw)
            task = f"epoch {epoch + 1}/{cfg.epochs}"
            t0 = time.perf_counter()
            sum_loss = torch.zeros((), device=device, dtype=torch.float64)
            correct = torch.zeros((), device=device, dtype=torch.int64)
            seen = 0
            used_lr = optimizer.param_groups[0]["lr"]
            last_report = 0.0
            # A batch of one has no batch statistics: training BatchNorm on it fails, so skip it.
            bn_training = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in raw.modules())
            for batch_i, batch in enumerate(loaders.train):
                if ctrl_c and ctrl_c.requested:
                    raise KeyboardInterrupt
                if cfg.max_batches and batch_i >= cfg.max_batches:
                    break
                if bn_training and int(batch[1].shape[0]) < 2:
                    continue
                x = prepare_input(batch[0], device, out_meta.mean, out_meta.std, channels_last)
                y = batch[1].to(device, non_blocking=True)
                with autocast(device, dtype):
                    loss, logits = crit(train_model, x, y, epoch)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                used_lr = optimizer.param_groups[0]["lr"]  # the rate this batch trained with
                scheduler.step()
                n = int(y.shape[0])
                seen += n
                sum_loss += loss.detach().double() * n
                correct += (final_logits(logits).detach().argmax(1) == y).sum()
                now = time.perf_counter()
                if report and (now - last_report > 0.5 or batch_i + 1 == steps_per_epoch):
                    last_report = now
                    mean_loss = float(sum_loss) / max(1, seen)
                    if not math.isfinite(mean_loss):
                        raise VccError(f"loss is {mean_loss} at epoch {epoch + 1} batch {batch_i + 1}: try a lower --lr")
                    report(task, batch_i + 1, steps_per_epoch, {
                        "loss": mean_loss, "acc": float(correct) / max(1, seen),
                        "clips/s": seen / max(1e-9, now - t0), "lr": used_lr,
                    })
            train_time = time.perf_counter() - t0
            if dd.world > 1:
                _broadcast_buffers(raw)
            train_loss, train_acc = _reduce_train_stats(sum_loss, correct, seen, device, dd)
            if not math.isfinite(train_loss):
                raise VccError(f"training diverged (loss {train_loss}) in epoch {epoch + 1}: try a lower --lr")
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "lr": float(f"{used_lr:.6g}"),  # the rate of the epoch's last batch (the scheduler has moved on since)
                "train_loss": round(train_loss, 6),
                "train_acc": round(train_acc, 6),
                "clips_per_s": round(seen * dd.world / max(1e-9, train_time), 2),
                "time_s": round(train_time, 3),
            }
            if dd.main and loaders.val is not None:
                t1 = time.perf_counter()
                logits_v, labels_v, vidx_v = predict(raw, loaders.val, device, out_meta, amp=cfg.amp)
                acc = video_accuracy(logits_v, labels_v, vidx_v, topk=(1,))
                record["val_video_top1"] = round(acc["video_top1"], 6)
                record["val_clip_top1"] = round(acc["clip_top1"], 6)
                record["val_time_s"] = round(time.perf_counter() - t1, 3)
            failed = _load_failures(loaders) - failed_before
            if failed:
                record["load_failures"] = failed
            if epoch_hook is not None:
                record.update(epoch_hook(epoch, raw) or {})
            history.append(record)
            if dd.main:
                score = record.get("val_video_top1", -record["train_loss"])
                improved = not best or score > best.get("_score", -math.inf)
                _save_artefacts(raw, out_meta, cfg, record, last_path, best_path if improved else None, model_path, loaders.dataset)
                if improved:
                    best = {**record, "_score": score}
                _save_checkpoint(ckpt_path, raw, out_meta, cfg, optimizer, scheduler, scaler, loaders.train, epoch + 1, history, best, None)
                _write_metrics(run_dir, history)
                if report:
                    info = {k: record[k] for k in ("train_loss", "train_acc", "val_video_top1") if k in record}
                    report("epochs", epoch + 1, cfg.epochs, info)
            if dd.world > 1:
                import torch.distributed as dist

                dist.barrier()
    except (KeyboardInterrupt, Exception) as exc:
        # After a Ctrl-C, a loader worker killed by the same signal surfaces as a RuntimeError: the interrupt too.
        if not isinstance(exc, KeyboardInterrupt) and not (ctrl_c and ctrl_c.requested):
            raise
        if dd.main:  # the checkpoint of the last completed epoch stays; its summary says where the run stopped
            _note_interrupt(ckpt_path, {"epoch": epoch, "batch": batch_i})
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise KeyboardInterrupt from exc
    finally:
        if ctrl_c:
            ctrl_c.restore()
        if undo_stem is not None:
            undo_stem()
    _write_weights_hash(raw, dd)
    best_clean = {k: v for k, v in best.items() if k != "_score"}
    selected_on = None
    if loaders.val is not None:
        selected_on = loaders.val_split or "validation"
    return FitResult(best_path, last_path, model_path, history, best_clean, selected_on)


def _broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BN running stats) everywhere: DDP syncs them only at the next forward."""
    import torch.distributed as dist

    for buf in model.buffers():
        dist.broadcast(buf.data, src=0)


def _reduce_train_stats(sum_loss: torch.Tensor, correct: torch.Tensor, seen: int, device: torch.device, dd: _Dist) -> tuple[float, float]:
    if dd.world > 1:
        import torch.distributed as dist

        t = torch.stack([sum_loss.double(), correct.double(), torch.tensor(float(seen), device=device, dtype=torch.float64)])
        dist.all_reduce(t)
        sum_loss, correct, seen = t[0], t[1], int(t[2].item())
    return float(sum_loss) / max(1, seen), float(correct) / max(1, seen)


def _save_artefacts(raw: nn.Module, meta: ModelMeta, cfg: TrainConfig, record: dict[str, Any], last: Path, best: Path | None,
                    model_path: Path, dataset: dict[str, str] | None) -> None:
    meta = meta.child()
    meta.provenance = provenance(parent=cfg.init, metrics=dict(record), dataset=dataset, step=cfg.command)
    save_model(last, raw, meta)
    if best is not None:
        with atomic_path(best) as tmp:
            shutil.copyfile(last, tmp)
        with atomic_path(model_path) as tmp:
            shutil.copyfile(last, tmp)


def _save_checkpoint(
    path: Path, raw: nn.Module, meta: ModelMeta, cfg: TrainConfig, optimizer: torch.optim.Optimizer,
    scheduler: Any, scaler: Any, loader: Any, epoch: int, history: list[dict[str, Any]], best: dict[str, Any],
    interrupted: dict[str, int] | None,
) -> None:
    from vcc.core.train_state import rng_state, save_checkpoint

    gen = getattr(loader, "generator", None)
    parts = {
        "model": raw.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_state(gen if isinstance(gen, torch.Generator) else None),
    }
    doc = {
        "epoch": epoch,
        "epochs": cfg.epochs,
        "interrupted": interrupted,
        "config": cfg.to_json(),
        "meta": meta.to_json(),
        "history": history,
        "best": best,
    }
    save_checkpoint(path, parts, doc)
    summary = {k: doc[k] for k in ("epoch", "epochs", "interrupted", "config", "best")}
    atomic_write_json(path.with_suffix(".json"), {"checkpoint": path.name, **summary})


def _note_interrupt(path: Path, where: dict[str, int]) -> None:
    """Record in the checkpoint's readable summary that the run stopped at `where` (epoch index, batch)."""
    summary_path = path.with_suffix(".json")
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        return
    atomic_write_json(summary_path, {**summary, "interrupted": where})


def read_checkpoint_doc(run_dir: str | Path) -> dict[str, Any]:
    """The JSON document of a run's checkpoint (config, meta, epoch, history) without its state."""
    from vcc.core.artefact import read_doc

    path = Path(run_dir) / "checkpoint.safetensors"
    if not path.is_file():
        raise VccError(f"no checkpoint to resume in {run_dir}")
    doc = read_doc(path)
    doc.pop("state", None)
    return doc


def _restore(path: Path, raw: nn.Module, optimizer: Any, scheduler: Any, scaler: Any, loader: Any, steps_per_epoch: int,
             checkpoint: tuple[dict[str, Any], dict[str, Any]] | None = None) -> tuple[int, list, dict]:
    from vcc.core.train_state import load_checkpoint, set_rng_state

    if checkpoint is None:
        if not path.is_file():
            raise VccError(f"no checkpoint to resume: {path} does not exist")
        checkpoint = load_checkpoint(path)
    parts, doc = checkpoint
    try:
        raw.load_state_dict(parts["model"], strict=True)
        optimizer.load_state_dict(parts["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise VccError(f"{path}: checkpoint does not fit this model/optimizer ({first_line(exc, 200)})") from exc
    scheduler.load_state_dict(parts["scheduler"])
    scaler.load_state_dict(parts["scaler"])
    gen = getattr(loader, "generator", None)
    set_rng_state(parts.get("rng", {}), gen if isinstance(gen, torch.Generator) else None)
    epoch = int(doc["epoch"])
    if doc.get("interrupted"):
        # A checkpoint written mid-epoch by an earlier vcc (it saved the weights of the interrupted
        # epoch): that epoch restarts from its first batch, so the schedule goes back to its first step.
        scheduler.last_epoch = epoch * steps_per_epoch
        for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
            group["lr"] = base * fn(scheduler.last_epoch)
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    return epoch, list(doc.get("history") or []), dict(doc.get("best") or {})


def _write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))


def weights_sha256(model: nn.Module) -> str:
    """sha256 over a model's state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().to("cpu").contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _write_weights_hash(raw: nn.Module, dd: _Dist) -> None:
    out = os.environ.get(HASH_ENV)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(out) / f"rank{dd.rank}.sha256", weights_sha256(raw) + "\n")
