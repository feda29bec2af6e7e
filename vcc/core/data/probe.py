"""Probing videos (opens, frame count, fps, size) with bounded parallelism and a cache.

The cache maps (absolute path, size, mtime) to the probe result, so re-running a prepare only
opens new or changed files. It lives in the workspace (``datasets/.probe-cache.json``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vcc.core.data import fastread
from vcc.core.errors import first_line
from vcc.core.progress import ProgressFn
from vcc.core.workspace import Workspace, atomic_write_text

CACHE_NAME = ".probe-cache.json"
CACHE_VERSION = 4  # 2: reasons without decord's C++ log prefixes; 3: keyframes for the fast reader; 4: timestamps, skip gap


# decord 0.6 returns wrong frames now and then when readers decode in several threads of one
# process at once (3 of 576 frames of test.avi over 4 threads): its reads are serialised
_DECORD_LOCK = threading.Lock()


@dataclass
class Probe:
    """What probing one video found. `reason` is empty when the video is usable."""

    n_frames: int = 0
    fps: float = 0.0
    width: int = 0
    height: int = 0
    reason: str = ""
    keys: list[list[int]] | None = None  # keyframes [[index, pts], ...] when FastReader reads it exactly
    pts: str | None = None  # every frame's timestamp, packed (fastread.pack_pts)
    skip_gap: int = 0  # fastread.Scan.skip_gap

    @property
    def ok(self) -> bool:
        return not self.reason


@functools.cache
def quiet_ffmpeg() -> None:
    """FFmpeg's own log lines (av_log) off: a bad file's trouble is reported as its skip reason."""
    import decord.logging

    decord.logging.set_level(decord.logging.QUIET)


_MUTE: dict[str, Any] = {"depth": 0, "real": {}}  # per process: nesting depth; fd 2's target -> (dup fd, writer)


def _real_stderr() -> tuple[int, Any]:
    """A dup of file descriptor 2 and a text writer on it, made once per target of descriptor 2 and
    never closed: a thread still holding the writer after a muted block ends (a progress bar's
    refresh) writes to the real stderr, never to a closed or reused descriptor."""
    st = os.fstat(2)
    key = (st.st_dev, st.st_ino, st.st_rdev)
    hit = _MUTE["real"].get(key)
    if hit is None:
        fd = os.dup(2)
        enc = getattr(sys.__stderr__, "encoding", None) or "utf-8"
        hit = (fd, open(fd, "w", encoding=enc, errors="replace", buffering=1, closefd=False))  # noqa: SIM115 - kept open
        _MUTE["real"][key] = hit
    return hit


@contextlib.contextmanager
def native_stderr_muted() -> Iterator[None]:
    """Send what C/C++ code writes to file descriptor 2 (decord's `ERROR opening: ...` lines) to the
    null device for the block, while Python's ``sys.stderr`` (progress bars, vcc's log lines) keeps
    the real stderr. Cheap enough to wrap every clip read; nested blocks are no-ops.
    ``VCC_NATIVE_LOGS=1`` leaves descriptor 2 alone."""
    if os.environ.get("VCC_NATIVE_LOGS") or _MUTE["depth"]:
        yield
        return
    old = sys.stderr
    try:
        py_on_fd2 = old is not None and old.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a captured or in-memory stream: not descriptor 2
        py_on_fd2 = False
    with contextlib.suppress(AttributeError, OSError, ValueError):
        old.flush()
    saved, writer = _real_stderr()
    devnull = os.open(os.devnull, os.O_WRONLY)
    _MUTE["depth"] += 1
    try:
        os.dup2(devnull, 2)
        if py_on_fd2:
            sys.stderr = writer
        yield
    finally:
        if py_on_fd2:
            with contextlib.suppress(OSError, ValueError):
                writer.flush()
            if sys.stderr is writer:
                sys.stderr = old
        os.dup2(saved, 2)
        os.close(devnull)
        _MUTE["depth"] -= 1


def short_reason(exc: BaseException) -> str:
    """A short reason from a decord error (without its C++ log prefix and source locations)."""
    msg = first_line(exc, 400)
    msg = re.sub(r"^\[\d\d:\d\d:\d\d\]\s+\S+:\d+:\s*", "", msg)
    failed = re.match(r"Check failed:\s*([A-Za-z_]\w*)", msg)
    if failed:
        tail = re.search(r"\)\s*([A-Za-z][^()]*)$", msg)
        return f"decoder setup failed ({failed.group(1)}{': ' + tail.group(1).strip() if tail else ''})"
    msg = re.sub(r"^ERROR opening:\s*\S.*?,\s*", "", msg)
    if msg.startswith("Error reading "):  # decord's whole message is the path: FFmpeg found no stream it can read
        return "no readable video stream (not a video, or damaged)"
    return msg if len(msg) <= 120 else msg[:117].rsplit(" ", 1)[0] + "..."


def probe_video(path: str | Path) -> Probe:
    """Open `path` with decord (one thread), read its first and last frames, and check whether
    :class:`vcc.core.data.fastread.FastReader` reads it exactly (`keys`, `pts`, `skip_gap`)."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        return Probe(reason="missing")
    except OSError as exc:
        return Probe(reason=f"unreadable: {exc.strerror or exc}")
    if not p.is_file():
        return Probe(reason="not a file")
    if st.st_size == 0:
        return Probe(reason="empty file (0 bytes)")
    try:
        import decord

        quiet_ffmpeg()
        with _DECORD_LOCK:
            vr = decord.VideoReader(str(p), num_threads=1)
            n = len(vr)
            if n <= 0:
                return Probe(reason="undecodable: no video frames")
            first = vr[0].asnumpy()  # (get_batch raises for the widths this check names)
            if not decord_rows_ok(first):
                return Probe(reason=f"undecodable: decord misreads frames {first.shape[1]} px wide (a decord bug at a few narrow widths, such as 48 or 72 px)")
            fps = float(vr.get_avg_fps() or 0.0)
            del vr
            last = _decord_last(p, n)
        sc = fastread.scan(str(p), n, first, last)
        for _ in range(2):  # decord 0.6 now and then returns a wrong frame: a pixel mismatch is read again
            if sc != fastread.PIXELS_DIFFER:
                break
            with _DECORD_LOCK:
                again = decord.VideoReader(str(p), num_threads=1)[0].asnumpy(), _decord_last(p, n)
            if np.array_equal(again[0], first) and np.array_equal(again[1], last):
                break  # decord reads the same: the fast reader does not match it
            first, last = again
            sc = fastread.scan(str(p), n, first, last)
        fast = sc._asdict() if isinstance(sc, fastread.Scan) else {}
        return Probe(n_frames=n, fps=round(fps, 3), width=int(first.shape[1]), height=int(first.shape[0]), **fast)
    except Exception as exc:  # noqa: BLE001 - decord raises its own types for every kind of bad file
        return Probe(reason=f"undecodable: {short_reason(exc)}")


def decord_rows_ok(frame: np.ndarray) -> bool:
    """Whether a frame decord returned is (H, W, 3) RGB. decord 0.6 pads the rows of some widths
    (8, 12, 16, 24, 48, 72 px ..., native or asked of its scaler) into extra "channels", and then
    every `get_batch` of that video fails."""
    return frame.ndim == 3 and frame.shape[2] == 3


def _decord_last(p: Path, n: int) -> np.ndarray:
    """decord's last frame, from a fresh reader and read with the two before it: decord 0.6
    returns frame n-2 for a lone [n-1] of a video with B-frames, and stale frames for a jump
    after an earlier read."""
    import decord

    return decord.VideoReader(str(p), num_threads=1).get_batch(list(range(max(0, n - 3), n))).asnumpy()[-1]


def _key(p: Path) -> str | None:
    try:
        st = p.stat()
    except OSError:
        return None
    return f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"


class ProbeCache:
    """Probe results keyed by path, size and mtime, stored as one JSON file."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.data: dict[str, dict[str, Any]] = {}
        self.dirty = False
        if path is not None and path.is_file():
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
                if doc.get("version") == CACHE_VERSION:
                    self.data = dict(doc.get("entries") or {})
            except (ValueError, OSError, AttributeError):
                self.data = {}

    @classmethod
    def for_workspace(cls, ws: Workspace) -> ProbeCache:
        return cls(ws.datasets_dir / CACHE_NAME)

    def get(self, key: str | None) -> Probe | None:
        if key is None or key not in self.data:
            return None
        try:
            return Probe(**self.data[key])
        except TypeError:
            return None

    def put(self, key: str | None, probe: Probe) -> None:
        if key is None:
            return
        self.data[key] = asdict(probe)
        self.dirty = True

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        atomic_write_text(self.path, json.dumps({"version": CACHE_VERSION, "entries": self.data}) + "\n")
        self.dirty = False


def probe_many(
    paths: list[Path],
    *,
    cache: ProbeCache | None = None,
    workers: int | None = None,
    progress: ProgressFn | None = None,
) -> list[Probe]:
    """Probe `paths` (results in the same order) with at most `workers` threads."""
    results: list[Probe | None] = [None] * len(paths)
    todo: list[tuple[int, str | None]] = []
    for i, p in enumerate(paths):
        key = _key(p)
        hit = cache.get(key) if cache else None
        if hit is not None:
            results[i] = hit
        else:
            todo.append((i, key))
    total = len(paths)
    done = total - len(todo)
    if progress:
        progress("probe", done, total, {"cached": done})
    n_workers = max(1, min(workers or min(4, os.cpu_count() or 1), len(todo) or 1))
    with native_stderr_muted(), ThreadPoolExecutor(max_workers=n_workers) as pool:
        futures = {pool.submit(probe_video, paths[i]): (i, key) for i, key in todo}
        for fut in as_completed(futures):
            i, key = futures[fut]
            res = fut.result()
            results[i] = res
            if cache is not None and res.reason != "missing":
                cache.put(key, res)
            done += 1
            if progress:
                progress("probe", done, total, {})
    if cache is not None:
        cache.save()
    return [r if r is not None else Probe(reason="not probed") for r in results]
