"""decord's frames, read faster: PyAV decoding that converts only the frames a clip keeps and
skips the B-frames it decodes only to reach a clip.

decord decodes from the keyframe before a clip and converts *every* decoded frame to RGB, the
ones it then skips included. On UCF101-style files (MPEG-4 with B-frames and a single keyframe)
that conversion costs more than the decoding itself. :class:`FastReader` decodes the same
frames with PyAV (the same FFmpeg decoders), converts only the kept ones through one reused
swscale context, and so returns decord's pixels for decord's frame numbers. On the way to a
clip it lets the decoder skip non-reference frames (nothing else is decoded from them, so the
frames after are the same), up to a margin before the clip: on test.avi that halves the decode
of the frames before the clip. The loader runs about 2x as fast with it as on decord
(``bench/loader.py``). Its frames are the true ones (those of a decode of the whole file in
order) even where decord's own reads are not: decord 0.6 gets a lone last frame of a B-frame
video, some clips after a seek near the end, and reads from several threads wrong
(``tests/test_fastread.py`` pins two of these).

Exactness is checked per video, once, when it is probed (:func:`scan`): one linear PyAV decode
numbers the frames in output order (decord's numbering) and records every frame's timestamp
and the keyframes; the video qualifies only if that count equals decord's and the first and
last frames equal decord's pixel for pixel, in yuv420p (the pixel format of nearly every
dataset video). A video with B-frames is decoded once more with non-reference frames skipped,
which gives the largest distance between the frames that survive (``skip_gap``). The manifest
keeps ``keys``, ``pts`` and ``skip_gap``; a video without them (an older manifest, a failed
check, another pixel format, a very long video) is read by decord. At read time the reader
seeks to a recorded keyframe and knows each decoded frame by its timestamp (frames are counted
where a manifest has no timestamps); it returns ``None`` (the caller falls back to decord)
whenever anything does not line up, and reads a clip again without skipping if skipping cut
it short.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import os
import threading
import zlib
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

SCAN_MAX_FRAMES = 4000  # longer videos are left to decord (the probe-time scan decodes every frame)
PIXEL_FORMATS = ("yuv420p",)  # where PyAV's conversion was checked to equal decord's
SKIP_WORTH = 0.8  # skip non-reference frames only where at most this share of the frames survive
_B = 3  # av.video.frame.PictureType.B
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


class Scan(NamedTuple):
    """What :func:`scan` records of a video the fast reader reads exactly."""

    keys: list[list[int]]  # keyframes [[index, pts], ...]
    pts: str  # every frame's pts in output order (:func:`pack_pts`)
    skip_gap: int  # largest distance between frames that survive skipping non-reference ones; 0: never skip


def pack_pts(pts: Sequence[int]) -> str:
    """Timestamps as a short string: zlib-compressed int64 deltas, base64 (a regular GOP packs
    a few hundred frames into a few dozen characters)."""
    d = np.diff(np.asarray(pts, dtype=np.int64), prepend=np.int64(0))
    return base64.b64encode(zlib.compress(d.astype("<i8").tobytes(), 9)).decode("ascii")


def unpack_pts(packed: str) -> np.ndarray:
    """The int64 timestamps :func:`pack_pts` packed (ValueError when it is not such a string)."""
    try:
        raw = zlib.decompress(base64.b64decode(packed.encode("ascii"), validate=True))
    except (zlib.error, binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError(f"not packed timestamps: {exc}") from None
    if len(raw) % 8:
        raise ValueError("not packed timestamps: truncated")
    return np.cumsum(np.frombuffer(raw, dtype="<i8")).astype(np.int64)


PIXELS_DIFFER = "first or last frame differs from decord's"


def scan(path: str, n_frames: int, first: np.ndarray, last: np.ndarray) -> Scan | str:
    """What :class:`FastReader` needs to read a video exactly as decord does, or why it cannot (a
    string; :data:`PIXELS_DIFFER` when only the pixels of frame 0 or n-1 disagree with decord's).
    `first` and `last` are decord's frames 0 and n-1.

    One linear decode numbers the frames in output order (decord's numbering) and records every
    frame's timestamp and the keyframes; a video with B-frames is decoded once more with
    non-reference frames skipped, to learn how far apart the frames that survive skipping lie."""
    if not 0 < n_frames <= SCAN_MAX_FRAMES:
        return f"not 1 to {SCAN_MAX_FRAMES} frames"
    try:
        container, stream = _open(path)
    except Exception:  # noqa: BLE001 - anything PyAV cannot open stays with decord
        return "PyAV cannot open it"
    keys: list[list[int]] = []
    index_of: dict[int, int] = {}  # pts -> output index, in output order
    b_frames = 0
    try:
        for frame in container.decode(stream):
            count = len(index_of)
            if frame.pts is None or frame.pts in index_of:
                return "frames without distinct timestamps"
            if frame.format.name not in PIXEL_FORMATS:
                return f"pixel format {frame.format.name}"
            index_of[int(frame.pts)] = count
            b_frames += frame.pict_type == _B
            if frame.key_frame:
                keys.append([count, int(frame.pts)])
            if count == 0 and not np.array_equal(_rgb(frame), first):
                return PIXELS_DIFFER
            if count == n_frames - 1 and not np.array_equal(_rgb(frame), last):
                return PIXELS_DIFFER
            if count == n_frames:
                break
    except Exception:  # noqa: BLE001 - a decoding error: decord decides what is readable
        return "PyAV cannot decode it"
    finally:
        container.close()
    if len(index_of) != n_frames:
        return "another frame count than decord's"
    if not keys or keys[0][0] != 0:
        return "frame 0 is not a keyframe"
    gap = _skip_gap(path, index_of, {k[0] for k in keys}) if b_frames else 0
    return Scan(keys, pack_pts(list(index_of)), gap)


def _skip_gap(path: str, index_of: dict[int, int], key_indices: set[int]) -> int:
    """The largest distance (in frames) between consecutive frames that survive a decode with
    non-reference frames skipped, end of the video included; 0 when skipping would not pay
    (few frames skipped) or the survivors are not what the full decode had (by timestamp)."""
    n = len(index_of)
    kept: list[int] = []
    try:
        container, stream = _open(path)
        try:
            stream.codec_context.skip_frame = "NONREF"
            for frame in container.decode(stream):
                i = index_of.get(frame.pts, -1)
                if i < 0 or (kept and i <= kept[-1]):
                    return 0
                kept.append(i)
        finally:
            container.close()
    except Exception:  # noqa: BLE001 - then never skip
        return 0
    if not kept or kept[0] != 0 or not key_indices <= set(kept) or len(kept) > SKIP_WORTH * n:
        return 0
    return int(np.diff(np.asarray(kept + [n])).max())


def skip_margin(gap: int) -> int:
    """How many frames before a clip skipping stops, for a video whose skip gap is `gap`: one
    gap and a frame to spare. (A decoder holding a reference frame back, MPEG-4's, needs gap - 1;
    a read that a deeper one cuts short is read again without skipping.)"""
    return gap + 1


class FastReader:
    """Reads frames of one video by decord's numbering (see the module docstring).

    With the video's timestamps (`pts`, from :func:`scan`), every decoded frame is identified by
    its timestamp, and with a `skip_gap` the decoder skips non-reference frames (B-frames) while
    it runs up to a clip, which halves the cost of the frames decoded only to reach it; a clip
    that skipping would cut short is read again without. Without `pts`, frames are counted.
    Kept open between calls, a reader decodes forward from where it stopped when the next clip
    starts later in the video before the next keyframe (the clips of a test video)."""

    def __init__(self, path: str, keys: list[list[int]], pts: str | None = None, skip_gap: int = 0) -> None:
        self.path = path
        self.key_index = [int(k[0]) for k in keys]
        self.key_pts = [int(k[1]) for k in keys]
        self.packed_pts = pts
        self.skip_gap = skip_gap if pts is not None else 0
        self.skip_failed = False  # a read with skipping missed a frame: this reader no longer skips
        self._index_of: dict[int, int] | None = None
        self.container: Any = None
        self.stream: Any = None
        self.frames: Iterator[Any] | None = None
        self.next_index = -1  # index of the next frame self.frames yields; -1: not positioned

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
        self.container, self.stream, self.frames, self.next_index = None, None, None, -1

    def read(self, indices: list[int]) -> np.ndarray | None:
        """uint8 (len(indices), H, W, 3) frames for sorted, distinct `indices`, or None when the
        video does not decode as its scan says (the caller then asks decord)."""
        if not indices:
            return None
        k = bisect.bisect_right(self.key_index, indices[0]) - 1
        if k < 0:
            return None
        try:
            if self.packed_pts is not None and self._index_of is None:
                self._index_of = {int(p): i for i, p in enumerate(unpack_pts(self.packed_pts))}
            out = self._read(indices, k)
            if out is None and self.skip_gap > 0:  # skipping cut the clip short: again, all frames
                self.skip_gap, self.skip_failed = 0, True
                self.close()
                out = self._read(indices, k)
            if out is None:
                self.close()
            return out
        except Exception:  # noqa: BLE001 - decord will read it (or report it)
            self.close()
            return None

    def _read(self, indices: list[int], k: int) -> np.ndarray | None:
        if not (self.key_index[k] <= self.next_index <= indices[0]):
            self._seek(k)
        assert self.frames is not None and self.stream is not None
        margin = skip_margin(self.skip_gap)
        skipping = self.skip_gap > 0 and indices[0] - margin > self.next_index
        if skipping:  # from the next packet on (the keyframe, after a seek, is never skipped)
            self.stream.codec_context.skip_frame = "NONREF"
        out: np.ndarray | None = None
        j, target = 0, indices[0]
        for frame in self.frames:
            if self._index_of is None:
                i = self.next_index  # counted
            else:
                i = self._index_of.get(frame.pts, -1)
                if i < self.next_index:  # unknown, or out of order
                    return None
            self.next_index = i + 1
            if skipping and i >= target - margin:
                self.stream.codec_context.skip_frame = "DEFAULT"  # from the next packet on
                skipping = False
            if i < target:
                continue
            if i > target:  # a wanted frame never came (skipped, or not decodable from here)
                return None
            if frame.format.name not in PIXEL_FORMATS:
                return None
            if out is None:
                out = np.empty((len(indices), frame.height, frame.width, 3), dtype=np.uint8)
            elif out.shape[1:3] != (frame.height, frame.width):
                return None
            _rgb(frame, out[j])
            j += 1
            if j == len(indices):
                return out
            target = indices[j]
        return None  # the stream ended before the last wanted frame

    def _seek(self, k: int) -> None:
        """Position at keyframe k: the next frame yielded is its frame (outputs before the
        frame with the keyframe's timestamp, leading frames of an open GOP, are dropped)."""
        self.close()
        self.container, self.stream = _open(self.path)
        pts = self.key_pts[k]
        if k > 0:
            self.container.seek(pts, stream=self.stream, backward=True, any_frame=False)
        frames = self.container.decode(self.stream)
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
