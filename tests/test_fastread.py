"""The fast reader (PyAV, kept frames converted only) against decord, on real and generated files."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import av
import decord
import numpy as np
import pytest
import torch

from tests.conftest import SHARED_VIDEOS
from vcc.core.data import fastread
from vcc.core.data.loader import make_loader
from vcc.core.data.manifest import load_dataset
from vcc.core.data.prepare import prepare_folder
from vcc.core.data.probe import probe_video
from vcc.core.data.synthetic import encode_video, render_video


def _encode(path: Path, codec: str, options: dict[str, str], frames: int = 40, size: int = 64, pix_fmt: str = "yuv420p") -> Path:
    """A moving test video with the encoder's GOP and B-frame options."""
    encode_video(path, render_video("sideways", frames, size, np.random.default_rng(3)), codec=codec, options=options, pix_fmt=pix_fmt)
    return path


_LINEAR: dict[str, np.ndarray] = {}


def _linear(path: str) -> np.ndarray:
    """Every frame, from one PyAV decode of the whole file in order: the ground truth. (decord
    0.6 gives these for a read of every frame, but not always for a clip: it returns wrong
    frames after a seek near the end of a video with B-frames, or for a lone last frame.)"""
    if path not in _LINEAR:
        with av.open(path) as c:
            _LINEAR[path] = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    return _LINEAR[path]


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("fast")
    return {
        "ucf-style avi (mpeg4, B-frames, one keyframe)": SHARED_VIDEOS / "test.avi",
        "h264 mp4, two keyframes": SHARED_VIDEOS / "test.mp4",
        "h264 mp4, four keyframes": SHARED_VIDEOS / "demo.mp4",
        "mpeg4 avi, GOP 12 (synthetic)": _encode(d / "gop12.avi", "mpeg4", {}),
        "mpeg4 avi, GOP 9 + B-frames": _encode(d / "b.avi", "mpeg4", {"g": "9", "bf": "2"}),
        "h264 mkv, GOP 8 + B-pyramid": _encode(d / "pyr.mkv", "libx264", {"g": "8", "bf": "3", "b-pyramid": "normal"}),
    }


@pytest.mark.parametrize("mode", ["counted", "timestamps", "timestamps + skipping"])
@pytest.mark.parametrize(
    "kind",
    [
        "ucf-style avi (mpeg4, B-frames, one keyframe)",
        "h264 mp4, two keyframes",
        "h264 mp4, four keyframes",
        "mpeg4 avi, GOP 12 (synthetic)",
        "mpeg4 avi, GOP 9 + B-frames",
        "h264 mkv, GOP 8 + B-pyramid",
    ],
)
def test_fast_reader_returns_decords_frames(videos: dict[str, Path], kind: str, mode: str) -> None:
    """Any clip, at any position, read after any earlier clip: the true frames, by decord's numbering
    and in decord's pixels; with frames counted (manifests before timestamps), identified by their
    timestamps, and with non-reference frames skipped on the way to a clip."""
    path = str(videos[kind])
    pr = probe_video(path)
    assert pr.ok and pr.keys, pr
    n = pr.n_frames
    truth = _linear(path)
    assert np.array_equal(decord.VideoReader(path, num_threads=1).get_batch(list(range(n))).asnumpy(), truth)  # decord's numbering
    assert pr.keys[0][0] == 0 and all(a[0] < b[0] for a, b in zip(pr.keys, pr.keys[1:], strict=False))
    assert pr.pts is not None and len(fastread.unpack_pts(pr.pts)) == n
    if "B-frames" in kind or "B-pyramid" in kind:
        assert pr.skip_gap >= 2  # skipping pays where a third or more of the frames are B-frames
    pts, gap = {"counted": (None, 0), "timestamps": (pr.pts, 0), "timestamps + skipping": (pr.pts, pr.skip_gap)}[mode]
    reader = fastread.FastReader(path, pr.keys, pts, gap)
    rng = random.Random(kind)
    cases = [[0, 1], [n - 2, n - 1], [n - 1], list(range(0, n, max(1, n // 7)))]
    cases += [[k[0], k[0] + 1] for k in pr.keys[1:] if k[0] + 1 < n]  # start exactly at a keyframe
    cases += [[k[0] - 1, k[0]] for k in pr.keys[1:]]  # end exactly at one
    for _ in range(10):
        stride = rng.randint(1, 3)
        start = rng.randint(0, n - 1 - 7 * stride)
        cases.append(list(range(start, start + 8 * stride, stride)))
    for i, idx in enumerate(cases):
        got = reader.read(idx)
        assert got is not None, (idx, pr.keys)
        assert got.shape == (len(idx), pr.height, pr.width, 3) and got.dtype == np.uint8
        assert np.array_equal(got, truth[idx]), idx
        if i % 3 == 2:
            reader.close()  # and from a fresh open
    assert not reader.skip_failed  # skipping never cut a clip short


def test_forward_reads_continue_without_reopening(videos: dict[str, Path]) -> None:
    """Test clips of a video come in order: the reader decodes on from where it stopped."""
    path = str(videos["ucf-style avi (mpeg4, B-frames, one keyframe)"])
    pr = probe_video(path)
    reader = fastread.FastReader(path, pr.keys)
    assert reader.read([0, 2, 4]) is not None
    container = reader.container
    assert reader.read([60, 62]) is not None and reader.container is container  # on, not reopened
    assert reader.read([10, 12]) is not None and reader.container is not container  # back: reopened
    assert np.array_equal(reader.read([100, 101]), _linear(path)[[100, 101]])


def test_scan_refuses_what_it_cannot_match(videos: dict[str, Path], tmp_path: Path) -> None:
    path = str(videos["mpeg4 avi, GOP 12 (synthetic)"])
    pr = probe_video(path)
    first, last = _linear(path)[0], _linear(path)[-1]
    assert fastread.scan(path, pr.n_frames, first, last) == (pr.keys, pr.pts, pr.skip_gap)
    assert isinstance(fastread.scan(path, pr.n_frames + 1, first, last), str)  # decord counts another frame
    assert fastread.scan(path, pr.n_frames, np.zeros_like(first), last) == fastread.PIXELS_DIFFER  # other pixels
    assert fastread.scan(path, pr.n_frames, first, first) == fastread.PIXELS_DIFFER
    assert isinstance(fastread.scan(str(tmp_path / "missing.avi"), 10, first, last), str)
    # full-range JPEG frames (yuvj420p): not a format whose conversion was checked; decord reads them
    mjpeg = _encode(tmp_path / "m.avi", "mjpeg", {}, frames=12, pix_fmt="yuvj420p")
    pm = probe_video(mjpeg)
    assert pm.ok and pm.keys is None


def test_keys_that_do_not_line_up_fall_back_to_decord(videos: dict[str, Path]) -> None:
    path = str(videos["h264 mp4, two keyframes"])
    pr = probe_video(path)
    wrong = [pr.keys[0], [pr.keys[1][0], pr.keys[1][1] + 7]]  # a keyframe timestamp the file lacks
    reader = fastread.FastReader(path, wrong)
    assert reader.read([pr.keys[1][0] + 3, pr.keys[1][0] + 5]) is None
    assert reader.read([3, 5]) is not None  # the first segment still lines up
    assert fastread.FastReader(path, [[5, 0]]).read([1, 2]) is None  # before the first keyframe


def test_skipping_that_misses_a_frame_reads_again_without(videos: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A clip that skipping cut short (here: a margin too small to stop skipping before the
    clip's B-frame) is read again with every frame decoded, and the reader stops skipping."""
    path = str(videos["ucf-style avi (mpeg4, B-frames, one keyframe)"])
    pr = probe_video(path)
    truth = _linear(path)
    b = 100 if 100 % 3 else 101  # frames 1, 2, 4, 5, ... of test.avi are B-frames
    assert pr.skip_gap == 3
    reader = fastread.FastReader(path, pr.keys, pr.pts, pr.skip_gap)
    monkeypatch.setattr(fastread, "skip_margin", lambda gap: -2)  # skipping would stop two frames *after* the clip starts
    assert np.array_equal(reader.read([b, b + 1]), truth[[b, b + 1]])
    assert reader.skip_failed and reader.skip_gap == 0
    assert np.array_equal(reader.read([b + 20]), truth[[b + 20]])


def test_timestamps_that_do_not_match_fall_back_to_decord(videos: dict[str, Path]) -> None:
    """Frames are identified by their timestamps: a table the file does not match reads nothing."""
    path = str(videos["h264 mp4, two keyframes"])
    pr = probe_video(path)
    pts = fastread.unpack_pts(pr.pts)
    shifted = fastread.pack_pts(np.concatenate([pts[:10], pts[10:] + 1]))
    assert fastread.FastReader(path, pr.keys, shifted).read([4, 6]) is not None  # before the change
    assert fastread.FastReader(path, pr.keys, shifted).read([20, 22]) is None


def test_packed_timestamps_round_trip() -> None:
    pts = [1, 2, 4, 3, 5, 7, 6] * 30 + [-5, 2**40]
    packed = fastread.pack_pts(pts)
    assert fastread.unpack_pts(packed).tolist() == pts
    assert len(fastread.pack_pts([3 * i for i in range(1000)])) < 60  # a regular GOP packs small
    for bad in ("not base64!", "aGVsbG8=", ""):
        if bad:
            with pytest.raises(ValueError):
                fastread.unpack_pts(bad)
    assert fastread.unpack_pts(fastread.pack_pts([])).tolist() == []


def _dataset(tmp_path: Path, ws, videos: dict[str, Path]):
    root = tmp_path / "tree"
    for i, src in enumerate(v for _, v in sorted(videos.items())):
        cls = root / ("a" if i % 2 else "b")
        cls.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, cls / f"v{i}{src.suffix}")
    return load_dataset(prepare_folder(ws, root, val_ratio=0.5, name="mixed").path)


def _all(loader) -> list[torch.Tensor]:
    return [x for x, _, _ in loader]


def test_loader_batches_are_the_true_frames(tmp_path: Path, ws, videos: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Training and testing batches through the fast reader equal the same loader's batches cut
    from whole-file decodes, and the fast reader served every read; VCC_READER=decord sends
    every read to decord."""
    from vcc.core.data import loader as loader_mod

    class Truth:
        def __init__(self, path: str) -> None:
            self.frames = _linear(path)

        def __len__(self) -> int:
            return len(self.frames)

        def get_batch(self, idx: list[int]):
            return SimpleNamespace(asnumpy=lambda: self.frames[idx])

    info = _dataset(tmp_path, ws, videos)
    assert all(e.keys for e in info.entries)
    kw: dict = dict(frames=8, size=64, batch_size=3, seed=5)  # 64: no video is big enough for decode-time scaling

    def batches(split: str, train: bool, **more):
        ld = make_loader(info, split, train=train, **kw, **more)
        return _all(ld) + _all(ld), ld.dataset  # two epochs

    fast = [batches("train", True), batches("test", False, clips=3, crops=3)]
    for _, ds in fast:
        assert not ds._not_fast and not ds._readers  # no decord reader was opened
        assert not ds._no_skip  # and skipping never cut a clip short
    assert sum(e.skip_gap > 0 for e in info.entries) >= 3  # the B-frame videos were read skipping
    monkeypatch.setattr(loader_mod.ClipDataset, "_reader", lambda self, vid: Truth(self.entries[vid].path))
    monkeypatch.setenv("VCC_READER", "decord")
    truth = [batches("train", True), batches("test", False, clips=3, crops=3)]
    assert truth[0][1]._readers is None and not truth[0][1].use_fast
    for (xa, _), (xb, _) in zip(fast, truth, strict=True):
        for a, b in zip(xa, xb, strict=True):
            assert torch.equal(a, b)


def test_manifest_keeps_keys_and_reads_old_lines(tmp_path: Path, ws, videos: dict[str, Path]) -> None:
    info = _dataset(tmp_path, ws, videos)
    man = info.root / "manifest.jsonl"
    lines = [json.loads(line) for line in man.read_text().splitlines()]
    assert all(isinstance(d["keys"], list) and d["keys"][0][0] == 0 for d in lines)
    assert all(isinstance(d["pts"], str) and d["skip_gap"] >= 0 for d in lines)
    assert {e.path: e.pts for e in info.entries} == {str(info.root / d["path"]) if not Path(d["path"]).is_absolute() else d["path"]: d["pts"] for d in lines}
    for d in lines[:2]:
        del d["keys"], d["pts"], d["skip_gap"]  # a manifest written before the fast reader
    lines[2]["keys"] = "garbage"
    for d in lines[3:5]:
        del d["pts"], d["skip_gap"]  # written before timestamps: frames are counted
    lines[5]["skip_gap"] = -4
    man.write_text("".join(json.dumps(d) + "\n" for d in lines))
    again = load_dataset(info.root)
    assert [e.keys is None for e in again.entries[:3]] == [True, True, True]
    assert all(e.keys for e in again.entries[3:])
    assert [e.pts is None for e in again.entries[3:6]] == [True, True, False] and again.entries[5].skip_gap == 0
    ld = make_loader(again, "train", train=True, frames=8, size=32, batch_size=8)
    assert sum(len(x) for x in _all(ld)) == len(again.split("train"))  # decord reads the first three


@pytest.mark.skipif(decord.__version__ != "0.6.0", reason="pins decord 0.6.0's behaviour")
def test_decord_quirks_the_fast_reader_avoids(videos: dict[str, Path]) -> None:
    """decord 0.6.0 returns frame n-2 for a lone [n-1] of test.avi, and repeats the last frame for
    a clip read after a seek to the last keyframe of a short B-frame video; the fast reader gives
    the true frames in both cases (the probe reads the last frames together for its check)."""
    path = str(SHARED_VIDEOS / "test.avi")
    truth = _linear(path)
    n = len(truth)
    lone = decord.VideoReader(path, num_threads=1).get_batch([n - 1]).asnumpy()[0]
    assert np.array_equal(lone, truth[n - 2]) and not np.array_equal(lone, truth[n - 1])
    keys = probe_video(path).keys
    assert np.array_equal(fastread.FastReader(path, keys).read([n - 1])[0], truth[n - 1])
    bpath = str(videos["mpeg4 avi, GOP 9 + B-frames"])
    btruth = _linear(bpath)
    tail = decord.VideoReader(bpath, num_threads=1).get_batch([38, 39]).asnumpy()
    assert np.array_equal(tail[0], btruth[39])  # frame 39 twice
    assert np.array_equal(fastread.FastReader(bpath, probe_video(bpath).keys).read([38, 39]), btruth[[38, 39]])


def test_probe_reads_decord_again_when_a_mismatch_was_decords(monkeypatch: pytest.MonkeyPatch) -> None:
    """decord 0.6 now and then returns a wrong frame: a first/last-frame mismatch is read again
    from fresh readers, and only a mismatch decord repeats leaves a video to decord."""
    from vcc.core.data import probe as probe_mod

    path = SHARED_VIDEOS / "test.avi"
    real = probe_mod._decord_last
    calls: list[int] = []

    def once_wrong(p: Path, n: int) -> np.ndarray:
        calls.append(n)
        frame = real(p, n)
        return np.zeros_like(frame) if len(calls) == 1 else frame

    monkeypatch.setattr(probe_mod, "_decord_last", once_wrong)
    pr = probe_video(path)
    assert pr.ok and pr.keys and len(calls) == 2  # the slip was read again, and the video qualifies
    monkeypatch.setattr(probe_mod, "_decord_last", lambda p, n: np.zeros_like(real(p, n)))
    pr = probe_video(path)
    assert pr.ok and pr.keys is None and pr.pts is None  # decord says so every time: decord reads it
