"""Temporal samplers: which frame indices make a clip. Pure functions, no decoding.

A clip is `frames` indices `stride` apart. When a video is too short for the requested stride,
the stride shrinks (down to 1); when it is shorter than `frames`, the clip loops the video
(0, 1, ..., n-1, 0, 1, ...), which keeps the motion rather than freezing on the last frame.
"""

from __future__ import annotations

import numpy as np


def effective_stride(n_frames: int, frames: int, stride: int) -> int:
    """The largest stride <= `stride` whose clip fits in `n_frames` (at least 1)."""
    if frames <= 1:
        return max(1, stride)
    fit = (n_frames - 1) // (frames - 1) if n_frames > 1 else 1
    return max(1, min(stride, fit))


def _clip(start: int, n_frames: int, frames: int, stride: int) -> list[int]:
    idx = start + stride * np.arange(frames)
    return [int(i) for i in np.mod(idx, max(1, n_frames))]


def train_indices(n_frames: int, frames: int, stride: int, rng: np.random.Generator) -> list[int]:
    """A random clip: `frames` indices `stride` apart from a random start."""
    s = effective_stride(n_frames, frames, stride)
    span = (frames - 1) * s + 1
    start = int(rng.integers(0, n_frames - span + 1)) if n_frames >= span else 0
    return _clip(start, n_frames, frames, s)


def eval_indices(n_frames: int, frames: int, stride: int, clips: int) -> list[list[int]]:
    """`clips` evenly spaced clips; with 2+ clips the first starts at frame 0 and the last ends
    at the last frame. One clip is the centre clip."""
    s = effective_stride(n_frames, frames, stride)
    span = (frames - 1) * s + 1
    room = max(0, n_frames - span)
    if clips == 1:
        starts = [room // 2]
    else:
        starts = [int(round(k * room / (clips - 1))) for k in range(clips)]
    return [_clip(st, n_frames, frames, s) for st in starts]


def auto_stride(n_frames: list[int], frames: int) -> int:
    """A dataset-wide default stride: clips cover about half of a typical video (1..4)."""
    if not n_frames:
        return 1
    med = int(np.median(n_frames))
    return max(1, min(4, med // (2 * frames)))
