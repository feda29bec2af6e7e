"""The clip loader: a torch Dataset/DataLoader over decord.

Batches are ``(clips uint8 (N, 3, T, H, W), labels int64 (N,), video_idx int64 (N,))``;
``video_idx`` indexes ``info.split(split)``. Normalise on the device with
:func:`vcc.core.data.transforms.normalize`.

* Training: one random clip of ``frames`` frames ``stride`` apart per video, a random crop of
  the short-side-resized video, a random horizontal flip; videos shuffled.
* Testing: ``clips`` evenly spaced clips x ``crops`` (1 centre, 3 along the long side) per video,
  in order; the crops of a clip are cut from one decode of its frames.
* Readers open lazily inside each worker process (one decode thread each). A video whose probe
  recorded keyframes (``VideoEntry.keys``) is read by :class:`vcc.core.data.fastread.FastReader`:
  decord's frames (the true ones, where decord itself slips), about 2x as fast, since only the
  kept frames are converted to RGB and B-frames before a clip are skipped;
  every other video, and any read the fast reader cannot line up, goes to decord (kept open only
  while testing, as an open decord reader's thread keeps working ahead). ``VCC_READER=decord``
  sends every read to decord. Only the frames a clip uses are resized (uint8, antialiased);
  decord's decode-time scaling, which scales every decoded frame including the skipped ones,
  is used only for videos over 4x the target size.
* Randomness is a pure function of (seed, epoch, item): the same seed gives the same batches for
  any number of workers, and ``loader.set_epoch(e)`` before iterating resumes bit-exactly.
  Without it, each iteration over the loader advances the epoch by one.
* A video that fails to load is logged once (logger ``vcc.data``, a short reason;
  decord's and FFmpeg's own log lines are muted), counted in ``loader.dataset.failures`` (every
  failed load, across workers) and replaced by another sample.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from vcc.core.data import sampling, transforms
from vcc.core.data.fastread import FastReader
from vcc.core.data.manifest import DatasetInfo, VideoEntry
from vcc.core.data.probe import decord_rows_ok, native_stderr_muted, quiet_ffmpeg, short_reason
from vcc.core.errors import UsageError, VccError

log = logging.getLogger("vcc.data")
MAX_RETRIES = 10
READER_CACHE = 1  # readers kept open per worker when testing (clips of one video are consecutive)
DECODE_SCALE_ABOVE = 4  # let decord scale while decoding only when the short side is > 4x the target


class ClipDataset(Dataset):
    """Clips of one split of a prepared dataset (see the module docstring)."""

    def __init__(
        self,
        entries: list[VideoEntry],
        *,
        train: bool,
        frames: int,
        size: int,
        stride: int,
        clips: int = 1,
        crops: int = 1,
        seed: int = 0,
    ) -> None:
        self.entries = entries
        self.train = train
        self.frames = frames
        self.size = size
        self.stride = stride
        self.clips = 1 if train else clips
        self.crops = 1 if train else crops
        self.seed = seed
        self.epoch = 0
        self.short = transforms.scale_for(size)
        self._failures = multiprocessing.Value("i", 0)
        self._readers: OrderedDict[int, Any] | None = None  # per process, opened lazily
        self._fast: tuple[int, FastReader] | None = None  # per process: the last video's fast reader
        self._not_fast: set[int] = set()  # per process: videos the fast reader could not line up
        self._no_skip: set[int] = set()  # per process: videos whose reads skipping non-reference frames cut short
        self._scales_right: dict[int, bool] = {}  # per process: whether decord's scaler gave a video's frames the right shape
        self.use_fast = os.environ.get("VCC_READER", "").lower() != "decord"
        self._last_clip: tuple[tuple[int, int], np.ndarray] | None = None  # test: the crops of one clip share its frames
        self._reported = multiprocessing.Array("b", max(1, len(entries)), lock=False)  # failure logged (any process)

    def __len__(self) -> int:
        return len(self.entries) * self.clips * self.crops

    @property
    def failures(self) -> int:
        """How many loads failed (and were replaced), summed over all worker processes."""
        return int(self._failures.value)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_readers"] = None  # never ship open readers to a worker
        state["_fast"] = None
        state["_last_clip"] = None
        return state

    def _reader(self, vid: int) -> Any:
        import decord

        quiet_ffmpeg()
        if self._readers is None:
            self._readers = OrderedDict()
        if vid in self._readers:
            self._readers.move_to_end(vid)
            return self._readers[vid]
        e = self.entries[vid]
        kw: dict[str, int] = {}
        if self._decoder_scales(vid):
            kw["width"], kw["height"] = transforms.resized_shape(e.width, e.height, self.short)
            if vid not in self._scales_right:
                # decord's scaler pads some widths' rows too (probe.decord_rows_ok): try one frame,
                # on a reader of its own, and decode this video at full size (resized after) if it is off
                f = decord.VideoReader(e.path, num_threads=1, **kw)[0].asnumpy()
                self._scales_right[vid] = decord_rows_ok(f) and f.shape[:2] == (kw["height"], kw["width"])
                if not self._scales_right[vid]:
                    kw = {}
        reader = decord.VideoReader(e.path, num_threads=1, **kw)
        # an open decord reader keeps a decoder thread working ahead: keep only what test reuses
        keep = 0 if self.train else READER_CACHE
        self._readers[vid] = reader
        while len(self._readers) > keep:
            self._readers.popitem(last=False)
        return reader

    def _decoder_scales(self, vid: int) -> bool:
        """Whether decord scales video `vid` while decoding. It scales every decoded frame, skipped
        ones included: for UCF101-sized videos that costs up to 2x the decode (bench/loader.py), so
        only huge videos are scaled by the decoder (bounding memory); the rest are resized after,
        kept frames only. So are videos whose scaled frames decord gets wrong (`_scales_right`)."""
        e = self.entries[vid]
        return (e.width > 0 and e.height > 0 and min(e.width, e.height) > DECODE_SCALE_ABOVE * self.short
                and self._scales_right.get(vid, True))

    def _fast_reader(self, vid: int) -> FastReader | None:
        """The fast reader for video `vid`, or None when decord must read it."""
        e = self.entries[vid]
        if not (self.use_fast and e.keys) or vid in self._not_fast or self._decoder_scales(vid):
            return None
        if self._fast is None or self._fast[0] != vid:
            self._drop_fast()
            self._fast = (vid, FastReader(e.path, e.keys, e.pts, 0 if vid in self._no_skip else e.skip_gap))
        return self._fast[1]

    def _drop_fast(self, vid: int | None = None) -> None:
        """Close the open fast reader (only if it is video `vid`'s, when given)."""
        if self._fast is not None and vid in (None, self._fast[0]):
            self._fast[1].close()
            self._fast = None

    def _frames(self, vid: int, fast: FastReader | None, indices: list[int]) -> np.ndarray:
        """uint8 (T, H, W, 3) frames `indices` (sorted, distinct) of video `vid`."""
        with native_stderr_muted():  # decord's C++ `ERROR opening` and FFmpeg's lines
            frames = fast.read(indices) if fast is not None else None
            if fast is not None and fast.skip_failed:
                self._no_skip.add(vid)
            if frames is not None:
                return frames
            if fast is not None:  # it did not line up: decord reads this video from now on
                self._not_fast.add(vid)
                self._drop_fast(vid)
            return self._reader(vid).get_batch(indices).asnumpy()

    def _load(self, index: int, attempt: int) -> tuple[torch.Tensor, int, int]:
        vid, rest = divmod(index, self.clips * self.crops)
        clip, crop = divmod(rest, self.crops)
        fast = self._fast_reader(vid)
        if fast is not None:
            n = self.entries[vid].n_frames  # decord's count: the probe checked the fast reader agrees
        else:
            with native_stderr_muted():  # decord's C++ `ERROR opening` and FFmpeg's lines
                n = len(self._reader(vid))
        if n <= 0:
            raise VccError("no frames")
        rng = np.random.default_rng([self.seed, self.epoch, index, attempt]) if self.train else None
        if self.train:
            idx = sampling.train_indices(n, self.frames, self.stride, rng)
        else:
            idx = sampling.eval_indices(n, self.frames, self.stride, self.clips)[clip]
        key = (vid, clip) if self.crops > 1 else None  # test clips are fixed by (video, clip)
        if key is not None and self._last_clip is not None and self._last_clip[0] == key:
            frames = self._last_clip[1]  # another crop of the clip just decoded: no second decode
        else:
            if all(a < b for a, b in zip(idx, idx[1:], strict=False)):  # increasing (any clip but a looped one)
                frames = self._frames(vid, fast, idx)
            else:
                uniq, inverse = np.unique(idx, return_inverse=True)
                frames = self._frames(vid, fast, [int(i) for i in uniq])[inverse]
            frames = transforms.fit_short_side(frames, self.short)
            if key is not None:
                self._last_clip = (key, frames)
        h, w = frames.shape[1:3]
        if self.train:
            top, left = transforms.random_offset(h, w, self.size, rng)
            flip = bool(rng.random() < 0.5)
        else:
            top, left = transforms.crop_offsets(h, w, self.size, self.crops)[crop]
            flip = False
        return transforms.to_clip_tensor(frames, top, left, self.size, flip), self.entries[vid].label, vid

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        per_video = self.clips * self.crops
        cur = index
        for attempt in range(MAX_RETRIES):
            try:
                return self._load(cur, attempt)
            except Exception as exc:  # noqa: BLE001 - a bad video must never end an epoch
                vid = cur // per_video
                if self._readers is not None:
                    self._readers.pop(vid, None)
                self._drop_fast(vid)
                with self._failures.get_lock():
                    self._failures.value += 1
                    first = not self._reported[vid]
                    self._reported[vid] = 1
                if first:
                    path = self.entries[vid].path
                    why = "missing: moved or deleted since `vcc prepare`" if not os.path.exists(path) else short_reason(exc)
                    log.warning("cannot load %s (%s); using another video instead", path, why)
                # a deterministic replacement: another video, same clip/crop slot
                step = (attempt + 1) * 7919 % max(1, len(self.entries)) or 1
                cur = ((vid + step) % len(self.entries)) * per_video + cur % per_video
        raise VccError(f"{MAX_RETRIES} videos in a row failed to load; check the dataset ({self.entries[index // per_video].path})")


class EpochSampler(Sampler[int]):
    """Indices in order, or shuffled by (seed, epoch)."""

    def __init__(self, n: int, shuffle: bool, seed: int) -> None:
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class ClipLoader(DataLoader):
    """A DataLoader that knows its epoch: ``set_epoch(e)`` fixes the next iteration's shuffle
    and augmentation; each iteration otherwise advances the epoch by one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.next_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration epoch `epoch` (for resuming)."""
        self.next_epoch = epoch

    def __iter__(self):  # type: ignore[override]
        epoch = self.next_epoch
        self.next_epoch += 1
        self.dataset.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        return super().__iter__()


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)


def make_loader(
    info: DatasetInfo,
    split: str,
    *,
    train: bool,
    frames: int,
    size: int,
    batch_size: int,
    workers: int = 0,
    stride: int | None = None,
    clips: int = 1,
    crops: int = 1,
    seed: int = 0,
    distributed: bool = False,
    pin_memory: bool = False,
) -> ClipLoader:
    """A loader over ``info.split(split)``; see the module docstring.

    ``stride=None`` picks one stride for the whole dataset (1..4) from its median length.
    """
    entries = info.split(split)
    if not entries:
        raise VccError(f"dataset {info.name!r} has no {split!r} videos")
    if frames < 1 or size < 1 or batch_size < 1:
        raise UsageError("frames, size and batch_size must be positive")
    if crops not in (1, 3):
        raise UsageError(f"--crops must be 1 or 3, got {crops}")
    if clips < 1:
        raise UsageError(f"--clips must be at least 1, got {clips}")
    if stride is None:
        stride = sampling.auto_stride([e.n_frames for e in entries], frames)
    if stride < 1:
        raise UsageError(f"--stride must be at least 1, got {stride}")
    ds = ClipDataset(entries, train=train, frames=frames, size=size, stride=stride, clips=clips, crops=crops, seed=seed)
    sampler: Sampler[int]
    if distributed:
        sampler = DistributedSampler(ds, shuffle=train, seed=seed)
    else:
        sampler = EpochSampler(len(ds), shuffle=train, seed=seed)
    return ClipLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=False,
        worker_init_fn=_worker_init if workers > 0 else None,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
