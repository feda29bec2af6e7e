"""A generated motion dataset: real encoded videos whose classes only motion tells apart.

Every video shows nine shapes (random kind, size and colour) on a random textured background
with per-frame noise. Eight shapes move alike, one stays still. The class is how the shapes
move (up, down, sideways, growing, ...). The appearance (background, shapes, colours, start
position, speed) is drawn from the video's number alone, so video k of every class looks the
same in any single frame: only motion tells the classes apart, and memorising a background
teaches nothing about the label. Train and test videos have different appearances.

All classes are invariant under a horizontal flip (sideways motion goes left or right at
random, diagonals too), so the loader's random flip never changes a label.
Motion wraps around the frame edges (a torus), so any clip of any length keeps moving.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import numpy as np

from vcc.core.data.manifest import PrepareResult, VideoEntry, load_dataset, write_dataset
from vcc.core.data.prepare import check_holdout, hold_out, replaced_note
from vcc.core.data.probe import probe_many
from vcc.core.errors import UsageError, VccError
from vcc.core.progress import ProgressFn
from vcc.core.workspace import Workspace, atomic_dir

# Class names in label order; `classes=N` takes the first N.
MOTIONS = [
    "up",
    "down",
    "sideways",
    "still",
    "diagonal_up",
    "diagonal_down",
    "orbit",
    "shake",
    "grow",
    "shrink",
]
DEFAULTS: dict[str, Any] = {"classes": 8, "videos_per_class": 96, "frames": 40, "size": 64, "seed": 0}
TEST_FRACTION = 0.25
MOVERS = 8  # moving shapes per video
FPS = 25


def prepare_synthetic(
    ws: Workspace,
    name: str = "synthetic",
    classes: int = DEFAULTS["classes"],
    videos_per_class: int = DEFAULTS["videos_per_class"],
    frames: int = DEFAULTS["frames"],
    size: int = DEFAULTS["size"],
    seed: int = DEFAULTS["seed"],
    progress: ProgressFn | None = None,
    holdout: float = 0.0,
    replace: bool = False,
) -> PrepareResult:
    """Generate `classes` x `videos_per_class` videos into ``datasets/<name>/`` (75/25 split).

    Deterministic in `seed`; re-running with the same options reuses the existing dataset.
    `holdout` > 0 moves that share of each class's training videos to a "val" split.
    """
    if not 2 <= classes <= len(MOTIONS):
        raise UsageError(f"--classes must be between 2 and {len(MOTIONS)}, got {classes}")
    if videos_per_class < 2:
        raise UsageError(f"--videos-per-class must be at least 2 (one train, one test), got {videos_per_class}")
    if frames < 4:
        raise UsageError(f"--frames must be at least 4, got {frames}")
    if size < 16 or size % 2:
        raise UsageError(f"--size must be an even number >= 16, got {size}")
    if not decord_reads_size(size):
        near = sorted((c for c in range(max(16, size - 16), size + 18, 2) if c != size and decord_reads_size(c)),
                      key=lambda c: (abs(c - size), c))[:2]
        raise UsageError(f"--size {size}: decord 0.6 misreads videos of this width (its RGB rows are padded by a "
                         f"pixel or more, a decord bug at a few narrow widths); try --size {' or '.join(map(str, sorted(near)))}")
    folder = ws.dataset_dir(name)
    check_holdout(holdout)
    options = {"classes": classes, "videos_per_class": videos_per_class, "frames": frames, "size": size, "seed": seed, "generator": 8}
    if holdout > 0:
        options["holdout"] = holdout
    existing = _reuse(folder, options)
    if existing is not None:
        return existing
    ws.check_writable(ws.datasets_dir)
    warnings = replaced_note(folder, "synthetic", options, replace)

    class_names = MOTIONS[:classes]
    n_test = max(1, round(videos_per_class * TEST_FRACTION))
    total = classes * videos_per_class
    entries: list[VideoEntry] = []
    with atomic_dir(folder) as tmp:
        done = 0
        for label, motion in enumerate(class_names):
            (tmp / "videos" / motion).mkdir(parents=True, exist_ok=True)
            for k in range(videos_per_class):
                video = render_video(motion, frames, size, np.random.default_rng([seed, k]), np.random.default_rng([seed, label, k]))
                rel = Path("videos") / motion / f"{motion}_{k:03d}.avi"
                encode_video(tmp / rel, video, fps=FPS)
                split = "test" if k >= videos_per_class - n_test else "train"
                entries.append(VideoEntry(str(tmp / rel), label, split, frames, float(FPS), size, size))
                done += 1
                if progress:
                    progress("generate", done, total, {"class": motion})
        # the fast reader's keyframes (and decord's own frame count), as any prepare probes them
        probes = probe_many([Path(e.path) for e in entries], progress=progress)
        for i, (e, pr) in enumerate(zip(entries, probes, strict=True)):
            if not pr.ok:
                raise VccError(f"a generated video does not read back ({e.path}: {pr.reason})")
            entries[i] = VideoEntry.from_probe(e.path, e.label, e.split, pr)
        if holdout > 0:
            hold_out(entries, class_names, holdout)
        counts = write_dataset(tmp, name, class_names, entries, source="synthetic", options=options)
    return PrepareResult(name, folder, class_names, counts, [], warnings)


@functools.cache
def decord_reads_size(size: int) -> bool:
    """Whether decord reads back a `size` x `size` video this module encodes: decord 0.6 takes the
    channel count from the padded RGB row length, so a few narrow widths come back as 4 or 6
    channels (16, 24, 48 and 72 on x86-64). Checked once per size with a 2-frame file."""
    import tempfile

    import decord

    from vcc.core.data.probe import native_stderr_muted, quiet_ffmpeg

    quiet_ffmpeg()
    with tempfile.TemporaryDirectory(prefix="vcc-size-") as tmp:
        path = Path(tmp) / "probe.avi"
        encode_video(path, np.zeros((2, size, size, 3), dtype=np.uint8))
        try:
            with native_stderr_muted():
                shape = decord.VideoReader(str(path), num_threads=1).get_batch([0, 1]).shape
        except Exception:  # noqa: BLE001 - decord raises its own types
            return False
    return tuple(shape) == (2, size, size, 3)


def _reuse(folder: Path, options: dict[str, Any]) -> PrepareResult | None:
    try:
        info = load_dataset(folder)
    except Exception:  # noqa: BLE001 - anything unreadable is regenerated
        return None
    if info.source != "synthetic" or info.options != options:
        return None
    if not all(Path(e.path).is_file() for e in info.entries):
        return None
    return PrepareResult(info.name, folder, info.classes, info.counts, [])


# ---------------------------------------------------------------- rendering


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth random colour field plus static fine texture, float32 (H, W, 3) in 0..255."""
    g = int(rng.integers(2, 6))
    coarse = rng.uniform(30, 225, size=(g, g, 3)).astype(np.float32)
    # bilinear upsampling of the coarse grid
    pos = np.linspace(0, g - 1, size, dtype=np.float32)
    i0 = np.clip(np.floor(pos).astype(int), 0, g - 2) if g > 1 else np.zeros(size, int)
    f = (pos - i0)[:, None]
    rows = coarse[i0] * (1 - f[..., None]) + coarse[np.minimum(i0 + 1, g - 1)] * f[..., None]
    f2 = f[None, :, :]
    bg = rows[:, i0] * (1 - f2) + rows[:, np.minimum(i0 + 1, g - 1)] * f2
    bg += rng.normal(0, 8, size=(size, size, 1)).astype(np.float32)
    return bg


def _shape_mask(kind: int, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    if kind == 0:  # disc
        return dx * dx + dy * dy <= r * r
    if kind == 1:  # square
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    return np.abs(dx) + np.abs(dy) <= r * 1.15  # diamond


def _contrast_colour(bg_mean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    for _ in range(20):
        c = rng.uniform(0, 255, size=3)
        if np.abs(c - bg_mean).sum() > 180:
            return c.astype(np.float32)
    return (255.0 - bg_mean).astype(np.float32)


def render_video(motion: str, frames: int, size: int, rng: np.random.Generator, noise_rng: np.random.Generator | None = None) -> np.ndarray:
    """Render one video of class `motion`: uint8 (T, H, W, 3).

    `rng` draws the appearance (background, shapes, colours, start, speed); `noise_rng` the
    per-frame noise. `prepare_synthetic` seeds `rng` by video number only, so video k of every
    class has the same appearance and only its motion differs.
    """
    noise_rng = noise_rng if noise_rng is not None else rng
    s = size / 64.0
    bg = _background(size, rng)
    bg_mean = bg.reshape(-1, 3).mean(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    def wrapped(cx: float, cy: float) -> tuple[np.ndarray, np.ndarray]:
        dx = (xx - cx + size / 2) % size - size / 2
        dy = (yy - cy + size / 2) % size - size / 2
        return dx, dy

    # a static distractor that looks like the moving shapes
    static = bg.copy()
    m = _shape_mask(int(rng.integers(0, 3)), *wrapped(*rng.uniform(0, size, 2)), float(rng.uniform(6, 9) * s))
    static[m] = _contrast_colour(bg_mean, rng)

    # the moving shapes: all follow the class's motion, each from its own start
    movers = []
    for _ in range(MOVERS):
        movers.append(
            {
                "kind": int(rng.integers(0, 3)),
                "colour": _contrast_colour(bg_mean, rng),
                "r0": float(rng.uniform(5.0, 8.0) * s),
                "c0": rng.uniform(0, size, 2),
                "phase": float(rng.uniform(0, 2 * math.pi)),
            }
        )
    speed = float(rng.uniform(3.0, 4.5) * s)
    sign = 1.0 if rng.random() < 0.5 else -1.0  # left or right: flip-invariant classes
    rmin, rmax = 3.0 * s, 13.0 * s
    grow_rate = float(rng.uniform(0.6, 0.8) * s)
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for t in range(frames):
        frame = static.copy()
        for mv in movers:
            (cx, cy), r, phase = mv["c0"], mv["r0"], mv["phase"]
            if motion == "up":
                cy = cy - speed * t
            elif motion == "down":
                cy = cy + speed * t
            elif motion == "sideways":
                cx = cx + sign * speed * t
            elif motion == "diagonal_up":
                cx, cy = cx + sign * speed * t * 0.75, cy - speed * t * 0.75
            elif motion == "diagonal_down":
                cx, cy = cx + sign * speed * t * 0.75, cy + speed * t * 0.75
            elif motion in ("grow", "shrink"):
                off = (r - rmin + (grow_rate * t if motion == "grow" else -grow_rate * t)) % (rmax - rmin)
                r = rmin + off
            elif motion == "orbit":
                a = phase + sign * t * 2 * math.pi / 14
                cx, cy = cx + 9.0 * s * (math.cos(a) - math.cos(phase)), cy + 9.0 * s * (math.sin(a) - math.sin(phase))
            elif motion == "shake":
                cx = cx + 7.0 * s * (math.sin(phase + t * 2 * math.pi / 10) - math.sin(phase))
            # "still": nothing moves
            frame[_shape_mask(mv["kind"], *wrapped(cx, cy), r)] = mv["colour"]
        frame += noise_rng.normal(0, 5, size=frame.shape).astype(np.float32)
        out[t] = np.clip(frame, 0, 255).astype(np.uint8)
    return out


def encode_video(
    path: Path,
    video: np.ndarray,
    fps: int = FPS,
    codec: str = "mpeg4",
    options: dict[str, str] | None = None,
    pix_fmt: str = "yuv420p",
) -> None:
    """Encode uint8 (T, H, W, 3) frames with PyAV (MPEG-4 part 2 in AVI by default); `options`
    go to the encoder (GOP ``g``, B-frames ``bf``, ...)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = video.shape[1:3]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options=options or {})
        stream.width, stream.height = w, h
        stream.pix_fmt = pix_fmt
        stream.bit_rate = max(400_000, int(w * h * fps * 2))
        for frame in video:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
