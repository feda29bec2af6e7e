"""`vcc prepare` on generated UCF101 / HMDB51 / UCF11 / folder trees (real split lists, real videos)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import UCF_SPLITS, run_vcc
from vcc.cli import app
from vcc.core.data.manifest import load_dataset
from vcc.core.data.prepare import (
    UCF11_TEST_GROUPS,
    prepare_folder,
    prepare_hmdb51,
    prepare_ucf11,
    prepare_ucf101,
)
from vcc.core.data.probe import CACHE_NAME
from vcc.core.data.synthetic import decord_reads_size, encode_video, render_video
from vcc.core.errors import UsageError, VccError
from vcc.core.workspace import Workspace

UCF_CLASSES = ("ApplyEyeMakeup", "Hammering", "HammerThrow", "HandStandPushups")


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real 10-frame 32 px MPEG-4 AVI that every tree links to."""
    path = tmp_path_factory.mktemp("clip") / "clip.avi"
    encode_video(path, render_video("up", 10, 32, np.random.default_rng(0)))
    return path


def _place(clip: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.link(clip, dest)


def _bad_files(folder: Path, clip: Path) -> dict[str, str]:
    """Zero-byte, truncated and not-a-video files; returns name -> expected reason prefix."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero.avi").write_bytes(b"")
    data = clip.read_bytes()
    (folder / "truncated.avi").write_bytes(data[:200])
    (folder / "text.avi").write_text("this is not a video\n" * 20)
    return {"zero.avi": "empty file", "truncated.avi": "undecodable", "text.avi": "undecodable"}


# ---------------------------------------------------------------- UCF101 with the real lists


@pytest.fixture(scope="module")
def ucf(tmp_path_factory: pytest.TempPathFactory, clip: Path) -> dict:
    """A UCF-101 tree holding groups g01-g09 of four classes (archive spelling HandstandPushups)."""
    base = tmp_path_factory.mktemp("ucf")
    root = base / "UCF-101"
    lines = []
    for f in ("trainlist01.txt", "testlist01.txt"):
        lines += (UCF_SPLITS / f).read_bytes().decode().splitlines()
    made = []
    for ln in lines:
        rel = ln.split()[0]
        cls = rel.split("/")[0]
        if cls in UCF_CLASSES and re.search(r"_g0[1-9]_", rel):
            folder = "HandstandPushups" if cls == "HandStandPushups" else cls
            _place(clip, root / folder / rel.split("/")[1])
            made.append(rel)
    # three listed videos are broken
    broken = sorted(r for r in made if r.startswith("ApplyEyeMakeup/") and "_g01_" in r)[:3]
    for rel, (name, _) in zip(broken, _bad_files(base / "bad", clip).items(), strict=True):
        (root / rel).unlink()
        os.link(base / "bad" / name, root / rel)
    ws = Workspace(base / "ws")
    res = prepare_ucf101(ws, base, UCF_SPLITS, split=1)
    return {"ws": ws, "res": res, "made": made, "broken": broken, "n_lines": len(lines), "root": root, "base": base}


def test_ucf101_labels_follow_classind(ucf: dict) -> None:
    res = ucf["res"]
    assert res.name == "ucf101" and len(res.classes) == 101
    assert res.classes[34:37] == ["Hammering", "HammerThrow", "HandStandPushups"]  # not sorted()
    assert res.classes[46:48] == ["JumpingJack", "JumpRope"]
    info = load_dataset(res.path)
    assert len(info.entries) == len(ucf["made"]) - 3
    for e in info.entries:
        folder = Path(e.path).parent.name
        assert folder.lower() == info.classes[e.label].lower()
        assert e.n_frames == 10 and (e.width, e.height) == (32, 32)
    assert {info.classes[e.label] for e in info.entries} == set(UCF_CLASSES)
    hsp = [e for e in info.entries if info.classes[e.label] == "HandStandPushups"]
    assert hsp and all("/HandstandPushups/" in e.path for e in hsp)  # case-insensitive resolution
    assert info.counts["train"] > 0 and info.counts["test"] > 0  # split 1: test groups g01-g07


def test_ucf101_reports_skipped(ucf: dict) -> None:
    skipped = ucf["res"].skipped
    reasons = {s["path"]: s["reason"] for s in skipped}
    assert sum(r == "missing" for r in reasons.values()) == ucf["n_lines"] - len(ucf["made"])
    bad = [(p, r) for p, r in reasons.items() if r != "missing"]
    assert len(bad) == 3
    assert sorted(r.split(" ")[0].rstrip(":") for _, r in bad) == ["empty", "undecodable", "undecodable"]


def test_ucf101_cli_json_rerun_and_cache(ucf: dict) -> None:
    ws: Workspace = ucf["ws"]
    env = {"VCC_HOME": str(ws.root)}
    args = ("prepare", "ucf101", "--root", str(ucf["base"]), "--splits", str(UCF_SPLITS), "--name", "u1", "--format", "json")
    proc = run_vcc(*args, env=env, check=True, timeout=120)
    doc = json.loads(proc.stdout)  # stdout is exactly one JSON document
    assert set(doc) == {"name", "path", "classes", "counts", "skipped"}
    assert doc["name"] == "u1" and doc["counts"] == ucf["res"].counts
    assert {tuple(sorted(s)) for s in doc["skipped"]} == {("path", "reason")}
    # the probe cache answers for unchanged files: poison one entry and see it used
    cache_path = ws.datasets_dir / CACHE_NAME
    cache = json.loads(cache_path.read_text())
    victim = load_dataset(ws.dataset_dir("u1")).entries[0].path
    key = next(k for k in cache["entries"] if k.startswith(victim + "|"))
    cache["entries"][key]["n_frames"] = 999
    cache_path.write_text(json.dumps(cache))
    proc = run_vcc(*args, env=env, check=True, timeout=120)
    assert json.loads(proc.stdout) == doc  # idempotent
    assert load_dataset(ws.dataset_dir("u1")).entries[0].n_frames == 999
    st = os.stat(victim)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # changed file: probed again
    prepare_ucf101(ws, ucf["base"], UCF_SPLITS, name="u1")
    assert load_dataset(ws.dataset_dir("u1")).entries[0].n_frames == 10
    assert not [p for p in ws.datasets_dir.iterdir() if p.name.endswith((".tmp", ".old"))]


def test_ucf101_bad_arguments(ucf: dict, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="classInd"):
        prepare_ucf101(ucf["ws"], ucf["base"], tmp_path)
    proc = run_vcc("prepare", "ucf101", "--root", str(tmp_path / "nope"), "--splits", str(UCF_SPLITS), env={"VCC_HOME": str(tmp_path / "w")})
    assert proc.returncode == 2 and proc.stderr.startswith("error: --root") and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- HMDB51

HOSTILE = ["(Glide)_Cartwheel_&_more!!_f_cm_np1_le_med_0.avi", "It's_$HOME_`x`;rm_-rf_brush_hair_h_nm_np1_ri_goo_1.avi", "Ärger (2) brush_hair_u_cm_np1_fr_med_2.avi"]


def test_hmdb51_split_files(tmp_path: Path, ws: Workspace, clip: Path) -> None:
    root, lists = tmp_path / "hmdb51_org", tmp_path / "testTrainMulti_7030_splits"
    lists.mkdir()
    expected = {"train": 0, "test": 0}
    for cls in ("brush_hair", "cartwheel", "ride_bike"):
        lines = []
        for i, tag in enumerate([1, 1, 2, 0, 1, 2]):
            fname = HOSTILE[i % 3] if i < 3 else f"{cls}_video_{i}.avi"
            fname = f"{cls}_{fname}"
            _place(clip, root / cls / fname)
            lines.append(f"{fname} {tag}" + " " * (i % 3))  # trailing spaces
            if tag:
                expected["train" if tag == 1 else "test"] += 1
        (lists / f"{cls}_test_split1.txt").write_bytes(("\r\n" if cls == "ride_bike" else "\n").join(lines).encode() + b"\n")
        (lists / f"{cls}_test_split2.txt").write_text("")
    (lists / "ride_bike_test_split1.txt").write_text((lists / "ride_bike_test_split1.txt").read_text() + "gone.avi 2\n")
    expected["test"] += 1  # listed but missing: skipped
    res = prepare_hmdb51(ws, tmp_path, tmp_path)
    assert res.classes == ["brush_hair", "cartwheel", "ride_bike"]
    assert res.counts == {"train": expected["train"], "test": expected["test"] - 1}
    assert [s["reason"] for s in res.skipped] == ["missing"] and res.skipped[0]["path"].endswith("gone.avi")
    info = load_dataset(res.path)
    names = {Path(e.path).name for e in info.entries}
    assert f"brush_hair_{HOSTILE[1]}" in names and f"cartwheel_{HOSTILE[2]}" in names
    assert all(Path(e.path).is_file() for e in info.entries)
    with pytest.raises(VccError, match="no usable videos"):
        prepare_hmdb51(ws, tmp_path, tmp_path, split=2)


# ---------------------------------------------------------------- UCF11


@pytest.fixture
def ucf11_root(tmp_path: Path, clip: Path) -> Path:
    root = tmp_path / "action_youtube_naudio"
    for cls, short in (("basketball", "shooting"), ("biking", "biking")):
        for g in (1, 2, 7, 21, 25):
            for c in (1, 2):
                _place(clip, root / cls / f"v_{short}_{g:02d}" / f"v_{short}_{g:02d}_{c:02d}.avi")
        _place(clip, root / cls / "Annotation" / f"v_{short}_01_01.avi")  # ignored
        (root / cls / "Annotation" / f"v_{short}_01_01.xgtf").write_text("<xml/>")
    return tmp_path


def _groups(info) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {"train": set(), "test": set()}
    for e in info.entries:
        out[e.split].add(int(re.search(r"_(\d\d)_\d\d\.avi$", e.path).group(1)))
    return out


def test_ucf11_group_split_and_folds(ucf11_root: Path, ws: Workspace) -> None:
    res = prepare_ucf11(ws, ucf11_root)
    info = load_dataset(res.path)
    assert res.classes == ["basketball", "biking"] and res.name == "ucf11"
    assert not any("Annotation" in e.path for e in info.entries)
    g = _groups(info)
    assert g == {"train": {1, 2, 7}, "test": {21, 25}} and {21, 25} <= set(UCF11_TEST_GROUPS)
    res7 = prepare_ucf11(ws, ucf11_root, fold=7)
    assert res7.name == "ucf11-fold7" and res7.counts == {"train": 16, "test": 4}
    assert _groups(load_dataset(res7.path)) == {"train": {1, 2, 21, 25}, "test": {7}}
    r = CliRunner().invoke(app, ["-w", str(ws.root), "prepare", "ucf11", "--root", str(ucf11_root), "--fold", "26"])
    assert r.exit_code == 2


# ---------------------------------------------------------------- any folder


def test_folder_containers_val_ratio_and_corrupt(tmp_path: Path, ws: Workspace) -> None:
    root = tmp_path / "my videos"
    video = render_video("sideways", 12, 32, np.random.default_rng(1))
    for cls, ext, codec in (("a", "mp4", "libx264"), ("b", "mkv", "mpeg4"), ("d", "mpg", "mpeg1video")):
        for i in range(5):
            encode_video(root / cls / f"{cls}{i}.{ext}", video, codec=codec)
    # PyAV's libvpx encoder fails to open once decord's bundled FFmpeg is loaded: encode in a fresh process
    code = (
        "import sys, numpy as np; from pathlib import Path; from vcc.core.data.synthetic import encode_video, render_video; "
        "v = render_video('sideways', 12, 32, np.random.default_rng(1)); "
        "[encode_video(Path(sys.argv[1]) / f'c{i}.webm', v, codec='libvpx') for i in range(5)]"
    )
    subprocess.run([sys.executable, "-c", code, str(root / "c")], check=True, timeout=60)
    expected_bad = _bad_files(root / "a", root / "a" / "a0.mp4")
    (root / "a" / "notes.txt").write_text("ignored")
    r = CliRunner().invoke(app, ["-w", str(ws.root), "prepare", "folder", "--root", str(root), "--val-ratio", "0.4", "--format", "json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["name"] == "my-videos" and doc["classes"] == ["a", "b", "c", "d"]
    assert doc["counts"] == {"train": 12, "test": 8}
    got = {Path(s["path"]).name: s["reason"] for s in doc["skipped"]}
    assert set(got) == set(expected_bad)
    for name, prefix in expected_bad.items():
        assert got[name].startswith(prefix), got
    info = load_dataset(ws.dataset_dir("my-videos"))
    assert {Path(e.path).suffix for e in info.entries} == {".mp4", ".mkv", ".webm", ".mpg"}
    assert all(e.n_frames == 12 for e in info.entries)
    # a failed prepare leaves the existing dataset untouched
    empty = tmp_path / "empty"
    (empty / "x").mkdir(parents=True)
    (empty / "x" / "bad.avi").write_bytes(b"")
    with pytest.raises(VccError, match="no usable videos"):
        prepare_folder(ws, empty, name="my-videos", replace=True)
    assert load_dataset(ws.dataset_dir("my-videos")).counts == {"train": 12, "test": 8}


def test_folder_presplit_and_min_frames(tmp_path: Path, ws: Workspace, clip: Path) -> None:
    for split in ("train", "val"):
        for cls in ("jump", "run"):
            for i in range(2):
                _place(clip, tmp_path / "t" / split / cls / f"{i}.avi")
    res = prepare_folder(ws, tmp_path / "t")
    assert res.classes == ["jump", "run"] and res.counts == {"train": 4, "test": 4}
    with pytest.raises(VccError, match=r"too short \(10 frames < 11\)"):
        prepare_folder(ws, tmp_path / "t", min_frames=11, name="short")  # the clips have 10 frames


# ---------------------------------------------------------------- synthetic through the CLI


def test_probe_skips_widths_decord_misreads(ws: Workspace, tmp_path: Path) -> None:
    """A video decord 0.6 decodes into 4 or 6 "channels" is skipped at prepare, not found at train."""
    misread = next(s for s in (48, 24, 16, 32, 40) if not decord_reads_size(s))
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        for i, size in enumerate((misread, 40 if misread != 40 else 56)):
            (tmp_path / "v" / cls).mkdir(parents=True, exist_ok=True)
            encode_video(tmp_path / "v" / cls / f"{i}.avi", rng.integers(0, 255, (16, size, size, 3), dtype=np.uint8))
    res = prepare_folder(ws, tmp_path / "v", name="narrow")
    assert sorted(Path(s["path"]).name for s in res.skipped) == ["0.avi", "0.avi"]
    assert all(f"decord misreads frames {misread} px wide" in s["reason"] for s in res.skipped)


def test_prepare_synthetic_cli(ws: Workspace) -> None:
    import typer

    from vcc.core.data.synthetic import DEFAULTS

    proc = run_vcc("prepare", "synthetic", "--classes", "3", "--videos-per-class", "4", "--frames", "8", "--size", "32", "--name", "syn", "--format", "json", check=True, timeout=120)
    doc = json.loads(proc.stdout)
    assert doc == {"name": "syn", "path": str(ws.root / "datasets" / "syn"), "classes": ["up", "down", "sideways"],
                   "counts": {"train": 9, "test": 3}, "skipped": []}
    assert load_dataset(ws.dataset_dir("syn")).counts == {"train": 9, "test": 3}
    held = json.loads(run_vcc("prepare", "synthetic", "--classes", "3", "--videos-per-class", "4", "--frames", "8", "--size", "32",
                              "--holdout", "0.34", "--name", "syn-held", "--format", "json", check=True, timeout=120).stdout)
    assert held["counts"] == {"train": 6, "test": 3, "val": 3}  # one of each class's three training videos
    a, b = load_dataset(ws.dataset_dir("syn")), load_dataset(ws.dataset_dir("syn-held"))
    assert [(Path(e.path).name, e.split) for e in a.entries if e.split == "test"] == [(Path(e.path).name, e.split) for e in b.entries if e.split == "test"]
    bad = run_vcc("prepare", "synthetic", "--size", "33", "--name", "x")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == ["error: --size must be an even number >= 16, got 33"]
    # decord 0.6 misreads some narrow widths (RGB rows padded into extra "channels"): refused up front
    misread = next(s for s in (48, 24, 16, 32, 40) if not decord_reads_size(s))
    bad = run_vcc("prepare", "synthetic", "--size", str(misread), "--name", "x")
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and f"--size {misread}: decord 0.6 misreads" in lines[0], bad.stderr
    for alt in re.findall(r"--size (\d+)", lines[0].split("try")[1]):
        assert decord_reads_size(int(alt))
    assert not (ws.root / "datasets" / "x").exists()
    # the CLI's defaults are the library's defaults
    cmd = typer.main.get_command(app).commands["prepare"].commands["synthetic"]
    defaults = {p.name: p.default for p in cmd.params}
    for key in ("classes", "videos_per_class", "frames", "size", "seed"):
        assert defaults[key] == DEFAULTS[key], key


# ---------------------------------------------------------------- --holdout: a validation split carved out of train


def _group_sides(info, pattern: str) -> dict[tuple[int, str], set[str]]:
    """(class, group) -> the splits its videos are in."""
    sides: dict[tuple[int, str], set[str]] = {}
    for e in info.entries:
        sides.setdefault((e.label, re.search(pattern, Path(e.path).name).group(1)), set()).add(e.split)
    return sides


def test_ucf101_holdout_moves_whole_groups(ucf: dict) -> None:
    res = prepare_ucf101(ucf["ws"], ucf["base"], UCF_SPLITS, split=1, name="ucf-val", holdout=0.3)
    info = load_dataset(res.path)
    base = ucf["res"].counts
    assert res.counts["test"] == base["test"] and res.counts["train"] + res.counts["val"] == base["train"]
    # split 1 trains on g08-g25; this tree has g08 and g09 only, so one whole group of two moves
    assert sum(len(s) for s in _group_sides(info, r"_g(\d\d)_c\d\d").values() if s == {"val"}) == len(UCF_CLASSES)
    sides = _group_sides(info, r"_g(\d\d)_c\d\d")
    assert all(len(s) == 1 for s in sides.values())  # a group (actor/scene) is never on two sides
    for label in {e.label for e in info.entries}:
        splits = {e.split for e in info.entries if e.label == label}
        assert {"train", "val"} <= splits, info.classes[label]
    assert json.loads((res.path / "dataset.json").read_text())["options"]["holdout"] == 0.3


def test_ucf11_holdout_cli_json(ucf11_root: Path, ws: Workspace) -> None:
    r = CliRunner().invoke(app, ["-w", str(ws.root), "prepare", "ucf11", "--root", str(ucf11_root), "--holdout", "0.3", "-f", "json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["counts"] == {"train": 8, "test": 8, "val": 4}  # one of three training groups per class
    sides = _group_sides(load_dataset(ws.dataset_dir(doc["name"])), r"_(\d\d)_\d\d\.avi$")
    assert all(len(s) == 1 for s in sides.values())
    table = CliRunner().invoke(app, ["-w", str(ws.root), "prepare", "ucf11", "--root", str(ucf11_root), "--holdout", "0.3"])
    assert table.exit_code == 0 and "val" in table.output
    bad = CliRunner().invoke(app, ["-w", str(ws.root), "prepare", "ucf11", "--root", str(ucf11_root), "--holdout", "1"])
    assert bad.exit_code == 2


def test_hold_out_without_groups_keeps_a_training_video_per_class() -> None:
    from vcc.core.data.manifest import VideoEntry
    from vcc.core.data.prepare import hold_out

    entries = [VideoEntry(f"/v/{c}_{i}.avi", c, "train", 10, 25.0, 32, 32) for c in range(3) for i in range(c * 4 + 1)]
    entries.append(VideoEntry("/v/t.avi", 1, "test", 10, 25.0, 32, 32))
    hold_out(entries, ["a", "b", "c"], 0.25)
    per = {c: [e.split for e in entries if e.label == c] for c in range(3)}
    assert per[0] == ["train"]  # a single video stays in train
    assert per[1].count("val") == 1 and per[1].count("test") == 1  # round(5 * 0.25) = 1; test untouched
    assert per[2].count("val") == 2 and per[2].count("train") == 7  # round(9 * 0.25) = 2
    again = [VideoEntry(e.path, e.label, "train" if e.split == "val" else e.split, 10, 25.0, 32, 32) for e in entries]
    hold_out(again, ["a", "b", "c"], 0.25)
    assert [e.split for e in again] == [e.split for e in entries]  # deterministic


# ---------------------------------------------------------------- user-trial findings (session 7)


def test_symlinked_ucf101_tree_keeps_listed_names_and_groups(tmp_path: Path, ws: Workspace, clip: Path) -> None:
    """A tree of symlinks (a content-addressed store, DVC, git-annex) keeps the listed names, so the
    holdout still finds each clip's gXX group (it used to read the shared link target's name)."""
    root = tmp_path / "UCF-101"
    for cls in UCF_CLASSES:
        for g in (1, 2, 8, 9, 10, 11):
            for c in (1, 2):
                dest = root / cls / f"v_{cls}_g{g:02d}_c{c:02d}.avi"
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.symlink_to(clip)
    res = prepare_ucf101(ws, tmp_path, UCF_SPLITS, split=1, holdout=0.5, name="linked")
    assert res.counts["val"] > 0 and res.counts["train"] > 0
    info = load_dataset(res.path)
    assert all(Path(e.path).is_symlink() and Path(e.path).name.startswith("v_") for e in info.entries)
    sides = _group_sides(info, r"_g(\d+)_")
    assert all(len(s) == 1 for s in sides.values())  # no group on both sides


def test_folder_train_val_test_tree_keeps_all_three(tmp_path: Path, ws: Workspace, clip: Path) -> None:
    for split, n in (("train", 3), ("val", 2), ("test", 1)):
        for cls in ("jump", "run"):
            for i in range(n):
                _place(clip, tmp_path / "t" / split / cls / f"{i}.avi")
    res = prepare_folder(ws, tmp_path / "t")
    assert res.counts == {"train": 6, "val": 4, "test": 2} and res.skipped == []


def test_split_list_names_match_any_unicode_form(tmp_path: Path, ws: Workspace, clip: Path) -> None:
    """A file saved in NFD (macOS) is found from a list written in NFC."""
    import unicodedata

    root, lists = tmp_path / "hmdb", tmp_path / "splits"
    lists.mkdir()
    nfc = unicodedata.normalize("NFC", "café_crème_{}.avi")
    lines = []
    for i, tag in enumerate((1, 1, 2)):
        _place(clip, root / "kick" / unicodedata.normalize("NFD", nfc.format(i)))
        lines.append(f"{nfc.format(i)} {tag}")
    (lists / "kick_test_split1.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    res = prepare_hmdb51(ws, root, lists)
    assert res.counts == {"train": 2, "test": 1} and res.skipped == []


def test_prepare_is_quiet_and_plain_about_bad_files(tmp_path: Path, ws: Workspace, clip: Path) -> None:
    """decord's C++ log lines stay off stderr, skip reasons carry no source locations, and the
    warnings (a replaced dataset, a class with no training video) are one line each."""
    root = tmp_path / "vids"
    for cls in ("a", "b"):
        for i in range(3):
            _place(clip, root / cls / f"{i}.avi")
    (root / "empty").mkdir()
    _bad_files(root / "a", clip)
    (root / "b" / "cut.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200)
    first = run_vcc("prepare", "synthetic", "--classes", "2", "--videos-per-class", "2", "--frames", "8", "--size", "20",
                    "--name", "vids", env={"VCC_HOME": str(ws.root)})
    assert first.returncode == 0, first.stderr
    # another source under a taken name: refused at once (before probing), one line, nothing replaced
    refused = run_vcc("prepare", "folder", "--root", str(root), "-f", "json", env={"VCC_HOME": str(ws.root)})
    assert refused.returncode == 2 and refused.stdout == "" and refused.stderr.strip().splitlines() == [
        "error: dataset 'vids' exists, prepared from synthetic; give another --name to keep both, or --replace to "
        "overwrite it (runs trained on it then see the new one)"]
    assert json.loads((ws.root / "datasets" / "vids" / "dataset.json").read_text())["source"] == "synthetic"
    res = run_vcc("prepare", "folder", "--root", str(root), "--replace", "-f", "json", env={"VCC_HOME": str(ws.root)})
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    reasons = [s["reason"] for s in doc["skipped"]]
    assert len(reasons) == 4 and not any(re.search(r"\.cc:\d+|\[\d\d:\d\d", r) for r in reasons), reasons
    assert not re.search(r"video_reader\.cc|@ 0x[0-9a-f]+\]|ERROR opening", res.stderr), res.stderr
    assert "warning: replaced dataset 'vids', which was prepared from synthetic" in res.stderr
    assert "warning: 1 of 3 classes have no training videos: empty" in res.stderr
    again = run_vcc("prepare", "folder", "--root", str(root), "-f", "json", env={"VCC_HOME": str(ws.root)})
    assert again.returncode == 0 and "replaced" not in again.stderr  # the same prepare again refreshes, no --replace


def test_unwritable_workspace_fails_before_probing(tmp_path: Path, clip: Path) -> None:
    _place(clip, tmp_path / "v" / "a" / "0.avi")
    _place(clip, tmp_path / "v" / "b" / "0.avi")
    (tmp_path / "file").write_text("not a folder")
    res = run_vcc("-w", str(tmp_path / "file"), "prepare", "folder", "--root", str(tmp_path / "v"))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "probe" not in res.stderr, res.stderr


def test_relative_workspace_records_usable_paths(tmp_path: Path) -> None:
    """`-w rel` (or a relative VCC_HOME): the manifest must not record the staging folder's
    cwd-relative path; training from another directory reads the videos."""
    import subprocess
    import sys

    def vcc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "vcc", *args], cwd=cwd, capture_output=True, text=True, timeout=300)

    proc = vcc("-q", "-w", "wsrel", "prepare", "synthetic", "--classes", "2", "--videos-per-class", "2", "--frames", "8",
               "--size", "32", "--name", "s", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    first = json.loads((tmp_path / "wsrel" / "datasets" / "s" / "manifest.jsonl").read_text().splitlines()[0])
    assert ".tmp" not in first["path"] and not first["path"].startswith("wsrel")
    (tmp_path / "elsewhere").mkdir()
    proc = vcc("-q", "-w", str(tmp_path / "wsrel"), "train", "-d", "s", "--epochs", "1", "--name", "t", "-f", "json",
               cwd=tmp_path / "elsewhere")
    assert proc.returncode == 0 and "cannot load" not in proc.stderr, proc.stderr
