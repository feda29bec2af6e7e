"""Synthetic dataset, manifest, clip loader and temporal samplers (real videos, real decord)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import decord
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import SHARED_VIDEOS, TINY_SYNTH, run_vcc
from vcc.core.data import sampling
from vcc.core.data.loader import make_loader
from vcc.core.data.manifest import VideoEntry, load_dataset, write_dataset
from vcc.core.data.synthetic import DEFAULTS, MOTIONS, prepare_synthetic, render_video
from vcc.core.data.transforms import crop_offsets, normalize, resized_shape, scale_for
from vcc.core.errors import UsageError, VccError

# ---------------------------------------------------------------- synthetic


def test_tiny_synthetic_is_real_video(tiny_synthetic: Path) -> None:
    info = load_dataset(tiny_synthetic)
    assert info.classes == MOTIONS[: TINY_SYNTH["classes"]]
    assert info.counts == {"train": 16, "test": 8}
    for cls in range(len(info.classes)):  # 75/25 per class
        assert sum(e.label == cls for e in info.split("test")) == 2
    doc = json.loads((tiny_synthetic / "dataset.json").read_text())
    assert doc["counts"] == {"train": 16, "test": 8} and doc["source"] == "synthetic"
    for e in info.entries[:3]:
        vr = decord.VideoReader(e.path)
        assert len(vr) == e.n_frames == 16
        assert vr[0].shape == (32, 32, 3)
    # manifest paths are relative: the folder can move
    first = json.loads((tiny_synthetic / "manifest.jsonl").read_text().splitlines()[0])
    assert not Path(first["path"]).is_absolute()


def test_synthetic_single_frame_does_not_reveal_class() -> None:
    # video k of every class shares its appearance: frame 0 differs only where shapes moved
    frames = {m: render_video(m, 12, 48, np.random.default_rng([0, 3]), np.random.default_rng([1, i])) for i, m in enumerate(MOTIONS)}
    base = frames["still"][0].astype(np.float32)
    for m, v in frames.items():
        assert np.abs(v[0].astype(np.float32) - base).mean() < 8, m  # noise level only
    # ...and every class except "still" moves
    motion = {m: float(np.abs(np.diff(v.astype(np.float32), axis=0)).mean()) for m, v in frames.items()}
    for m in MOTIONS:
        if m != "still":
            assert motion[m] > motion["still"] + 1.0, (m, motion)


def test_synthetic_rerun_is_idempotent_and_validates(ws) -> None:
    res = prepare_synthetic(ws, name="s", classes=2, videos_per_class=2, frames=8, size=32, seed=1)
    stamp = (res.path / "manifest.jsonl").stat().st_mtime_ns
    again = prepare_synthetic(ws, name="s", classes=2, videos_per_class=2, frames=8, size=32, seed=1)
    assert again.counts == res.counts == {"train": 2, "test": 2}
    assert (res.path / "manifest.jsonl").stat().st_mtime_ns == stamp  # reused, not rewritten
    with pytest.raises(UsageError, match="dataset 's' exists, prepared from synthetic with other options"):
        prepare_synthetic(ws, name="s", classes=3, videos_per_class=2, frames=8, size=32, seed=1)
    assert load_dataset(res.path).classes == MOTIONS[:2]  # untouched
    other = prepare_synthetic(ws, name="s", classes=3, videos_per_class=2, frames=8, size=32, seed=1, replace=True)
    assert other.classes == MOTIONS[:3] and other.warnings == ["replaced dataset 's', which was prepared from synthetic with other options"]
    assert not [p for p in ws.datasets_dir.iterdir() if p.name.startswith(".s.")]  # no temp dirs left
    with pytest.raises(UsageError):
        prepare_synthetic(ws, name="bad", classes=1)
    with pytest.raises(UsageError):
        prepare_synthetic(ws, name="bad", size=33)
    assert DEFAULTS["classes"] >= 8


def test_load_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(VccError, match="not a prepared dataset"):
        load_dataset(tmp_path)
    (tmp_path / "dataset.json").write_text('{"classes": ["a"]}')
    (tmp_path / "manifest.jsonl").write_text('{"path": "x.avi", "label": 3, "split": "train", "n_frames": 1}\n')
    with pytest.raises(VccError, match="out of range"):
        load_dataset(tmp_path)


# ---------------------------------------------------------------- loader


def _batches(loader) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return list(loader)


def test_train_loader_format_and_determinism(tiny_synthetic: Path) -> None:
    info = load_dataset(tiny_synthetic)
    kw = dict(train=True, frames=8, size=32, batch_size=5, seed=3)
    a = make_loader(info, "train", workers=0, **kw)
    b0 = _batches(a)
    x, y, v = b0[0]
    assert x.dtype == torch.uint8 and x.shape == (5, 3, 8, 32, 32)
    assert y.dtype == torch.int64 and v.dtype == torch.int64
    entries = info.split("train")
    for yi, vi in zip(y.tolist(), v.tolist(), strict=True):
        assert entries[vi].label == yi
    assert sorted(int(i) for _, _, vv in b0 for i in vv) == list(range(16))  # each video once
    b1 = _batches(a)  # next epoch: new shuffle and new clips
    assert not torch.equal(torch.cat([bb[2] for bb in b0]), torch.cat([bb[2] for bb in b1]))
    # same seed + epoch, any number of workers: identical batches
    two = make_loader(info, "train", workers=2, **kw)
    for (xa, ya, va), (xb, yb, vb) in zip(b0, _batches(two), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(va, vb)
    a.set_epoch(1)  # resume: epoch 1 again, bit-exact
    for (xa, _, va), (xb, _, vb) in zip(b1, _batches(a), strict=True):
        assert torch.equal(xa, xb) and torch.equal(va, vb)
    other = make_loader(info, "train", workers=0, **{**kw, "seed": 4})
    assert not torch.equal(_batches(other)[0][0], b0[0][0])


def test_test_loader_clips_crops(tiny_synthetic: Path) -> None:
    info = load_dataset(tiny_synthetic)
    ld = make_loader(info, "test", train=False, frames=8, size=32, batch_size=7, clips=3, crops=3)
    assert len(ld.dataset) == 8 * 9
    xs, ys, vs = zip(*_batches(ld), strict=True)
    vids = torch.cat(vs)
    assert vids.tolist() == sorted(vids.tolist())  # in order
    assert torch.bincount(vids).tolist() == [9] * 8
    x = torch.cat(xs)
    assert not torch.equal(x[0], x[3])  # different clips of video 0
    again = torch.cat([b[0] for b in _batches(ld)])
    assert torch.equal(x, again)  # testing is deterministic
    with pytest.raises(UsageError):
        make_loader(info, "test", train=False, frames=8, size=32, batch_size=2, crops=2)


def test_normalize() -> None:
    x = torch.full((2, 3, 4, 5, 5), 255, dtype=torch.uint8)
    y = normalize(x, [0.5, 0.5, 0.5], [0.5, 0.25, 1.0])
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.allclose(y[:, 0], torch.tensor(1.0)) and torch.allclose(y[:, 1], torch.tensor(2.0))
    assert torch.allclose(normalize(x[0], [0, 0, 0], [1, 1, 1]), torch.tensor(1.0))


def test_bad_videos_are_replaced_and_counted(tmp_path: Path, tiny_synthetic: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = load_dataset(tiny_synthetic).split("train")[:4]
    (tmp_path / "empty.avi").write_bytes(b"")
    (tmp_path / "text.avi").write_text("not a video at all\n" * 50)
    data = Path(good[0].path).read_bytes()
    (tmp_path / "trunc.avi").write_bytes(data[: len(data) // 6])
    bad = [VideoEntry(str(tmp_path / n), 1, "train", 16, 25.0, 32, 32) for n in ("empty.avi", "text.avi", "missing.avi")]
    ds_dir = tmp_path / "ds"
    ds_dir.mkdir()
    write_dataset(ds_dir, "mixed", ["a", "b", "c", "d"], good + bad, source="test")
    info = load_dataset(ds_dir)
    for workers in (0, 2):
        ld = make_loader(info, "train", train=True, frames=8, size=32, batch_size=4, workers=workers)
        n = sum(len(y) for _, y, _ in ld)
        assert n == 7  # a full epoch: every failure replaced by another video
        assert ld.dataset.failures >= 3
        if workers == 0:  # logged in this process: a missing file is named as missing, not as damaged
            assert any("missing.avi (missing: moved or deleted since `vcc prepare`)" in r.getMessage() for r in caplog.records)
    all_bad = tmp_path / "bad"
    all_bad.mkdir()
    write_dataset(all_bad, "bad", ["a", "b"], bad, source="test")
    with pytest.raises(VccError, match="failed to load"):
        next(iter(make_loader(load_dataset(all_bad), "train", train=True, frames=8, size=32, batch_size=2)))


def test_train_reports_videos_broken_after_prepare_once_and_quietly(tmp_path: Path) -> None:
    """A video that breaks after `vcc prepare` is named once, with a short reason, and counted per
    epoch; decord's C++ lines and FFmpeg's log never reach stderr (real subprocess, 2 workers). A
    new run that fails before its first epoch ends leaves no folder."""
    root, ws = tmp_path / "vids", tmp_path / "ws"
    for cls, src in (("a", "test.avi"), ("b", "test.mp4")):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            shutil.copy(SHARED_VIDEOS / src, root / cls / f"{cls}{i}{Path(src).suffix}")
    run_vcc("-w", str(ws), "-q", "prepare", "folder", "--root", str(root), "--test-ratio", "0.34", check=True)
    broken = sorted(root.glob("*/*"))
    for p in broken:  # break every video: each load fails, so each one must be named exactly once
        p.write_bytes(p.read_bytes()[:3000])
    proc = run_vcc("-w", str(ws), "train", "-d", "vids", "--epochs", "2", "-j", "2", "--name", "t", "-f", "json")
    assert proc.returncode != 0 and "failed to load" in proc.stderr  # all broken: a clear error, not a hang
    assert not (ws / "runs" / "t").exists()  # failed before an epoch: nothing left, the name stays free
    keep = broken[1:]
    for p, src in zip(keep, ["test.avi"] * 2 + ["test.mp4"] * 3, strict=True):
        shutil.copy(SHARED_VIDEOS / src, p)
    proc = run_vcc("-w", str(ws), "train", "-d", "vids", "--epochs", "2", "-j", "2", "--name", "t", "-f", "json")
    assert proc.returncode == 0, proc.stderr
    for noise in ("video_reader.cc", "ERROR opening", "moov atom", "[mov,", "[avi @", "Traceback"):
        assert noise not in proc.stderr, proc.stderr
    named = [ln for ln in proc.stderr.splitlines() if ln.startswith("cannot load")]
    assert named == [f"cannot load {broken[0]} (no readable video stream (not a video, or damaged)); using another video instead"], proc.stderr
    history = json.loads(proc.stdout)["history"]
    assert len(history) == 2 and all(h.get("load_failures", 0) >= 1 for h in history)
    entries = load_dataset(ws / "datasets" / "vids").entries
    split = next(e.split for e in entries if e.path == str(broken[0]))
    in_split = sum(e.split == split for e in entries)
    proc = run_vcc("-w", str(ws), "eval", "t", "--data", "vids", "--split", split)
    assert proc.returncode == 0 and "video_reader.cc" not in proc.stderr, proc.stderr
    assert f"1 of {in_split} {split} videos could not be read" in " ".join(proc.stdout.split())


def test_real_clips_decode_time_resize(tmp_path: Path, ws) -> None:
    from vcc.core.data.prepare import prepare_folder

    root = tmp_path / "real"
    for cls, name in (("avi", "test.avi"), ("mp4", "test.mp4")):
        (root / cls).mkdir(parents=True)
        shutil.copy(SHARED_VIDEOS / name, root / cls / name)
        shutil.copy(SHARED_VIDEOS / name, root / cls / f"b_{name}")
    res = prepare_folder(ws, root, val_ratio=0.5, name="real")
    info = load_dataset(res.path)
    assert info.counts == {"train": 2, "test": 2}
    e = next(x for x in info.entries if x.path.endswith(".avi"))
    assert (e.width, e.height, e.n_frames) == (320, 240, 164)
    t0 = time.perf_counter()
    x, y, v = next(iter(make_loader(info, "test", train=False, frames=16, size=112, batch_size=2, clips=2, crops=3)))
    assert x.shape == (2, 3, 16, 112, 112) and x.dtype == torch.uint8
    assert time.perf_counter() - t0 < 20
    assert float(x.float().std()) > 10  # real picture content, not padding


def test_three_crops_share_one_decode_and_match_single_crops(tmp_path: Path, ws) -> None:
    """The crops of a clip reuse its decoded frames: each equals the crop cut from a fresh decode."""
    from vcc.core.data.prepare import prepare_folder

    root = tmp_path / "real" / "avi"
    root.mkdir(parents=True)
    for i in range(2):
        shutil.copy(SHARED_VIDEOS / "test.avi", root / f"v{i}.avi")
    info = load_dataset(prepare_folder(ws, root.parent, val_ratio=0.0, name="crops").path)
    three = make_loader(info, "train", train=False, frames=8, size=112, batch_size=5, clips=2, crops=3)
    x3 = torch.cat([b[0] for b in _batches(three)]).view(2, 2, 3, 3, 8, 112, 112)  # video, clip, crop
    one = make_loader(info, "train", train=False, frames=8, size=112, batch_size=4, clips=2, crops=1)
    x1 = torch.cat([b[0] for b in _batches(one)]).view(2, 2, 3, 8, 112, 112)
    assert torch.equal(x3[:, :, 1], x1)  # the middle of three crops is the single centre crop
    assert not torch.equal(x3[:, :, 0], x3[:, :, 2])  # left and right crops of a 4:3 video differ
    assert not torch.equal(x3[:, 0], x3[:, 1])  # and clips differ: the cache never mixes clips


def test_decoder_scaling_and_resize_after_decode_agree(tmp_path: Path, ws, monkeypatch: pytest.MonkeyPatch) -> None:
    """Huge videos are scaled by decord while decoding, the rest resized after: same pictures."""
    from vcc.core.data import loader as loader_mod
    from vcc.core.data.prepare import prepare_folder

    root = tmp_path / "real"
    (root / "a").mkdir(parents=True)
    shutil.copy(SHARED_VIDEOS / "test.avi", root / "a" / "test.avi")
    info = load_dataset(prepare_folder(ws, root, val_ratio=0.0, name="one").path)

    def clip(scale_above: float) -> torch.Tensor:
        monkeypatch.setattr(loader_mod, "DECODE_SCALE_ABOVE", scale_above)
        ds = make_loader(info, "train", train=False, frames=8, size=32, batch_size=1).dataset
        x, _, _ = ds[0]
        return x.float()

    after, during = clip(1e9), clip(1.0)  # short side 240 vs target 37: never / always decoder-scaled
    assert after.shape == during.shape == (3, 8, 32, 32)
    assert float((after - during).abs().mean()) < 6  # both bilinear; the scalers differ a little
    assert float(after.std()) > 10


def test_decoder_scaling_to_a_width_decord_gets_wrong_falls_back_to_resizing_after(
        tmp_path: Path, ws, monkeypatch: pytest.MonkeyPatch) -> None:
    """At --size 16 a 320x240 video is scaled to 24x18, a width decord's scaler returns 4-channel
    frames for (and every get_batch fails): the loader must decode it full size and resize after."""
    from vcc.core.data import loader as loader_mod
    from vcc.core.data.prepare import prepare_folder

    root = tmp_path / "real"
    (root / "a").mkdir(parents=True)
    shutil.copy(SHARED_VIDEOS / "test.avi", root / "a" / "test.avi")
    info = load_dataset(prepare_folder(ws, root, val_ratio=0.0, name="one").path)
    assert (info.split("train")[0].width, scale_for(16)) == (320, 18)

    def clip(scale_above: float) -> tuple[torch.Tensor, int]:
        monkeypatch.setattr(loader_mod, "DECODE_SCALE_ABOVE", scale_above)
        ds = make_loader(info, "train", train=False, frames=8, size=16, batch_size=1).dataset
        ds.use_fast = False  # decord reads both
        x, _, _ = ds[0]
        return x, ds.failures

    during, failures = clip(1.0)  # short side 240 > 18: decord asked to scale
    after, _ = clip(1e9)  # never scaled by the decoder
    assert failures == 0
    assert during.shape == (3, 8, 16, 16)
    assert torch.equal(during, after)  # the fallback is the resize-after path, exactly
    assert float(during.float().std()) > 10


# ---------------------------------------------------------------- samplers


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 400), frames=st.integers(1, 32), stride=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_train_indices_property(n: int, frames: int, stride: int, seed: int) -> None:
    idx = sampling.train_indices(n, frames, stride, np.random.default_rng(seed))
    assert len(idx) == frames
    assert all(0 <= i < n for i in idx)
    s = sampling.effective_stride(n, frames, stride)
    if n >= (frames - 1) * stride + 1:
        assert s == stride  # long enough: the requested stride
    if n >= frames:
        assert all(b - a == s for a, b in zip(idx, idx[1:], strict=False))  # no wrap
    else:
        assert idx[: n] == list(range(n))  # short video: loops from the start
        assert idx == [i % n for i in range(frames)]


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 400), frames=st.integers(1, 32), stride=st.integers(1, 8), clips=st.integers(1, 10))
def test_eval_indices_property(n: int, frames: int, stride: int, clips: int) -> None:
    out = sampling.eval_indices(n, frames, stride, clips)
    assert len(out) == clips
    assert all(len(c) == frames and all(0 <= i < n for i in c) for c in out)
    starts = [c[0] for c in out]
    assert starts == sorted(starts)
    if n >= frames and clips >= 2:
        assert starts[0] == 0 and out[-1][-1] == n - 1  # the K clips span the whole video
    if n >= frames and clips == 1:
        room = n - ((frames - 1) * sampling.effective_stride(n, frames, stride) + 1)
        assert abs(starts[0] - room / 2) <= 0.5  # centre clip


def test_auto_stride_and_shapes() -> None:
    assert sampling.auto_stride([40] * 5, 8) == 2
    assert sampling.auto_stride([16] * 5, 8) == 1
    assert sampling.auto_stride([300], 8) == 4
    assert resized_shape(320, 240, 128) == (171, 128)
    assert resized_shape(240, 320, 128) == (128, 171)
    assert crop_offsets(128, 171, 112, 3) == [(8, 0), (8, 29), (8, 59)]
    assert crop_offsets(36, 36, 32, 1) == [(2, 2)]
