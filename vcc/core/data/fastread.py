"""decord's frames, read faster: PyAV decoding that converts only the frames a clip keeps.

decord decodes from the keyframe before a clip and converts *every* decoded frame to RGB, the
ones it then skips included. On UCF101-style files (MPEG-4 with B-frames and a single keyframe)
that conversion costs more than the decoding itself. :class:`FastReader` decodes the same
frames with PyAV (the same FFmpeg decoders), converts only the kept ones through one reused
swscale context, and so returns decord's pixels for decord's frame numbers; the loader runs
1.4-1.6x as fast with it (``bench/loader.py``). Its frames are the true ones (those of a decode
of the whole file in order) even where decord's own reads are not: decord 0.6 gets a lone last
frame of a B-frame video, some clips after a seek near the end, and reads from several threads
wrong (``tests/test_fastread.py`` pins two of these).

Exactness is checked per video, once, when it is probed (:func:`scan`): one linear PyAV decode
numbers the frames in output order (decord's numbering) and records each keyframe's index and
presentation timestamp; the video qualifies only if that count equals decord's and the first
and last frames equal decord's pixel for pixel, in yuv420p (the pixel format of nearly every
dataset video). The manifest keeps the keyframes (``keys``); a video without them (an older
manifest, a failed check, another pixel format, a very long video) is read by decord. At read
time the reader seeks to a recorded keyframe, starts counting at the frame with that timestamp
and returns ``None`` (the caller falls back to decord) whenever anything does not line up.
"""

from __future__ import annotations

import bisect
import os
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

SCAN_MAX_FRAMES = 4000  # longer videos are left to decord (the probe-time scan decodes every frame)
PIXEL_FORMATS = ("yuv420p",)  # where PyAV's conversion was checked to equal decord's
_LOCAL = threading.local()  # one swscale context per thread and process (one costs ~0.3 ms to make)


def _rgb(frame: Any, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 (H, W, 3) RGB of a decoded frame (written into `out` when given), through this
    thread's reused, single-threaded swscale context."""
    made = getattr(_LOCAL, "reformatter", None)
    if made is None or made[0] != os.getpid():  # a forked worker never reuses its parent's context
        from av.video.reformatter import VideoReformatter

        made = _LOCAL.reformatter = (os.getpid(), VideoReformatter())
    plane = made[1].reformat(frame, format="rgb24", threads=1).planes[0]
    w, h = plane.width, plane.height
    rows = np.frombuffer(plane, np.uint8).reshape(h, plane.line_size)[:, : w * 3].reshape(h, w, 3)
    if out is None:
        return rows.copy()
    out[...] = rows
    return out


def _open(path: str) -> tuple[Any, Any]:
    import av

    container = av.open(path)
    stream = container.streams.video[0]
    stream.thread_type = "SLICE"  # no frame threads: nothing decodes ahead in the background
    stream.codec_context.thread_count = 1
    return container, stream


def scan(path: str, n_frames: int, first: np.ndarray, last: np.ndarray) -> list[list[int]] | None:
    """The keyframes ``[[index, pts], ...]`` of a video whose frames :class:`FastReader` reads
    exactly as decord does, or ``None``. `first` and `last` are decord's frames 0 and n-1."""
    if not 0 < n_frames <= SCAN_MAX_FRAMES:
        return None
    try:
        container, stream = _open(path)
    except Exception:  # noqa: BLE001 - anything PyAV cannot open stays with decord
        return None
    keys: list[list[int]] = []
    count, seen_pts = 0, set()
    try:
        for frame in container.decode(stream):
            if frame.pts is None or frame.format.name not in PIXEL_FORMATS or frame.pts in seen_pts:
                return None
            seen_pts.add(frame.pts)
            if frame.key_frame:
                keys.append([count, int(frame.pts)])
            if count == 0 and not np.array_equal(_rgb(frame), first):
                return None
            if count == n_frames - 1 and not np.array_equal(_rgb(frame), last):
                return None
            count += 1
            if count > n_frames:
                return None
    except Exception:  # noqa: BLE001 - a decoding error: decord decides what is readable
        return None
    finally:
        container.close()
    if count != n_frames or not keys or keys[0][0] != 0:
        return None
    return keys


class FastReader:
    """Reads frames of one video by decord's numbering (see the module docstring).

    Kept open between calls, a reader decodes forward from where it stopped when the next clip
    starts later in the video before the next keyframe (the clips of a test video)."""

    def __init__(self, path: str, keys: list[list[int]]) -> None:
        self.path = path
        self.key_index = [int(k[0]) for k in keys]
        self.key_pts = [int(k[1]) for k in keys]
        self.container: Any = None
        self.frames: Iterator[Any] | None = None
        self.next_index = -1  # index of the next frame self.frames yields; -1: not positioned

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
        self.container, self.frames, self.next_index = None, None, -1

    def read(self, indices: list[int]) -> np.ndarray | None:
        """uint8 (len(indices), H, W, 3) frames for sorted, distinct `indices`, or None when the
        video does not decode as its keyframes say (the caller then asks decord)."""
        if not indices:
            return None
        k = bisect.bisect_right(self.key_index, indices[0]) - 1
        if k < 0:
            return None
        try:
            if not (self.key_index[k] <= self.next_index <= indices[0]):
                self._seek(k)
            assert self.frames is not None
            out: np.ndarray | None = None
            j, target = 0, indices[0]
            for frame in self.frames:
                i = self.next_index
                self.next_index += 1
                if i == target:
                    if frame.format.name not in PIXEL_FORMATS:
                        self.close()
                        return None
                    if out is None:
                        out = np.empty((len(indices), frame.height, frame.width, 3), dtype=np.uint8)
                    elif out.shape[1:3] != (frame.height, frame.width):
                        self.close()
                        return None
                    _rgb(frame, out[j])
                    j += 1
                    if j == len(indices):
                        return out
                    target = indices[j]
            self.close()  # the stream ended before the last wanted frame
            return None
        except Exception:  # noqa: BLE001 - decord will read it (or report it)
            self.close()
            return None

    def _seek(self, k: int) -> None:
        """Position at keyframe k: the next frame yielded is its frame (outputs before the
        frame with the keyframe's timestamp, leading frames of an open GOP, are dropped)."""
        self.close()
        self.container, stream = _open(self.path)
        pts = self.key_pts[k]
        if k > 0:
            self.container.seek(pts, stream=stream, backward=True, any_frame=False)
        frames = self.container.decode(stream)
        for frame in frames:
            if frame.pts == pts:
                break
            if k == 0 or frame.pts is None or frame.pts > pts:
                raise LookupError("the keyframe is not where the scan found it")
        else:
            raise LookupError("the keyframe is not where the scan found it")
        self.frames = _prepend(frame, frames)
        self.next_index = self.key_index[k]


def _prepend(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest
