"""Prepare public datasets (UCF101, HMDB51, UCF11) and any class-per-folder tree.

Every prepare probes each listed video (bounded parallelism, cached by path/size/mtime),
skips bad ones with a reason (missing, empty, undecodable, too short), and writes
``datasets/<name>/`` (dataset.json + manifest.jsonl) atomically. Source videos stay where they are;
the manifest holds their absolute paths.

Label order:
* UCF101: classInd.txt order (1-based), never sorted() (which would swap Hammering/HammerThrow).
* HMDB51, UCF11, folder: class names sorted alphabetically (the datasets' usual order).

UCF11 split: by group (``v_<class>_<GG>``), never one group on both sides. The default holds out
groups 21-25 (:data:`UCF11_TEST_GROUPS`); ``fold=K`` (1..25) holds out group K only
(25-fold leave-one-group-out).
"""

from __future__ import annotations

import json
import os
import random
import re
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vcc.core.data.manifest import PrepareResult, VideoEntry, write_dataset
from vcc.core.data.probe import ProbeCache, probe_many
from vcc.core.errors import UsageError, VccError
from vcc.core.progress import ProgressFn
from vcc.core.workspace import Workspace, atomic_dir, check_name

__all__ = [
    "PrepareResult",
    "prepare_ucf101",
    "prepare_hmdb51",
    "prepare_ucf11",
    "prepare_folder",
    "VIDEO_EXTS",
    "UCF11_TEST_GROUPS",
]

VIDEO_EXTS = {".avi", ".mp4", ".mkv", ".webm", ".mpg", ".mpeg", ".mov", ".m4v", ".flv", ".wmv", ".3gp", ".ogv", ".ts"}
UCF11_TEST_GROUPS = (21, 22, 23, 24, 25)
DEFAULT_MIN_FRAMES = 8

# a candidate video: (path or None when unresolved, listed name, label, split)
Candidate = tuple[Path | None, str, int, str]


# ---------------------------------------------------------------- path helpers


def _fold(name: str) -> str:
    """A file name compared ignoring case and Unicode normal form (macOS writes NFD, lists say NFC)."""
    return unicodedata.normalize("NFC", name).casefold()


class CaseInsensitiveTree:
    """Resolves relative paths under `root` ignoring case and Unicode normal form (exact matches win)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._dirs: dict[Path, dict[str, str]] = {}

    def _listing(self, d: Path) -> dict[str, str]:
        if d not in self._dirs:
            try:
                names = os.listdir(d)
            except OSError:
                names = []
            self._dirs[d] = {_fold(n): n for n in sorted(names, reverse=True)}
        return self._dirs[d]

    def child(self, d: Path, name: str) -> Path | None:
        """`d / name` if it exists, else the entry of `d` matching `name` ignoring case and normal form (or None)."""
        if (d / name).exists():
            return d / name
        actual = self._listing(d).get(_fold(name))
        return d / actual if actual is not None else None

    def resolve(self, rel: str) -> Path | None:
        cur: Path | None = self.root
        for part in [p for p in re.split(r"[\\/]+", rel.strip()) if p not in ("", ".")]:
            cur = self.child(cur, part)
            if cur is None:
                return None
        return cur


def _find_child(root: Path, names: tuple[str, ...]) -> Path | None:
    """The first child of `root` whose name matches one of `names` (ignoring case)."""
    try:
        children = {c.name.lower(): c for c in root.iterdir() if c.is_dir()}
    except OSError:
        return None
    for n in names:
        if n.lower() in children:
            return children[n.lower()]
    return None


def _class_names(d: Path) -> list[str]:
    """The class folders of `d` (hidden ones skipped), sorted by name."""
    return sorted(c.name for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))


def _check_split(split: int, dataset: str) -> None:
    if split not in (1, 2, 3):
        raise UsageError(f"--split must be 1, 2 or 3 for {dataset}, got {split}")


def _need_dir(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UsageError(f"{what} {str(path)!r} is not a directory")
    return p


def _read_lines(path: Path) -> list[str]:
    """Lines of a text list, tolerating CRLF, a BOM and Latin-1 bytes; blank lines dropped."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


# ---------------------------------------------------------------- the common tail


def replaced_note(folder: Path, source: str, options: dict[str, Any], replace: bool = False) -> list[str]:
    """Refuse (UsageError) to overwrite a dataset prepared from another source or with other options,
    unless `replace`; then return the warning that says what was replaced. Re-running the same
    prepare (same source and options) refreshes the dataset silently."""
    try:
        prev = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if prev.get("source") == source and prev.get("options") == options:
        return []
    root = (prev.get("options") or {}).get("root")
    what = f"{prev.get('source', '?')}" + (f" {root}" if root else "") + (" with other options" if prev.get("source") == source else "")
    if not replace:
        raise UsageError(f"dataset {folder.name!r} exists, prepared from {what}; give another --name to keep both, or "
                         f"--replace to overwrite it (runs trained on it then see the new one)")
    return [f"replaced dataset {folder.name!r}, which was prepared from {what}"]


def empty_class_note(classes: list[str], entries: list[VideoEntry]) -> list[str]:
    """A warning naming the classes with no training video (a model cannot learn them)."""
    have = {e.label for e in entries if e.split == "train"}
    empty = [c for i, c in enumerate(classes) if i not in have]
    if not empty:
        return []
    shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
    return [f"{len(empty)} of {len(classes)} classes have no training videos: {shown}"]


def _build(
    ws: Workspace,
    name: str,
    classes: list[str],
    candidates: list[Candidate],
    *,
    source: str,
    options: dict[str, Any],
    min_frames: int,
    workers: int | None,
    progress: ProgressFn | None,
    skipped: list[dict[str, str]] | None = None,
    split_auto: tuple[float, int] | None = None,
    holdout: float = 0.0,
    group_of: Callable[[Path], Any] | None = None,
    replace: bool = False,
) -> PrepareResult:
    """Probe, skip, split (entries with split "auto" when `split_auto=(val_ratio, seed)`), hold out, write."""
    check_name(name, "dataset name")
    if min_frames < 1:
        raise UsageError(f"--min-frames must be at least 1, got {min_frames}")
    check_holdout(holdout)
    ws.check_writable(ws.datasets_dir)
    options = {**options, "min_frames": min_frames, **({"holdout": holdout} if holdout > 0 else {})}
    replaced = replaced_note(ws.dataset_dir(name), source, options, replace)  # before the long probing
    skipped = list(skipped or [])
    seen: set[Path] = set()
    to_probe: list[tuple[Path, int, str]] = []
    for path, listed, label, split in candidates:
        if path is None:
            skipped.append({"path": listed, "reason": "missing"})
            continue
        # absolute, but symlinks kept: the listed name carries the group (gXX) and the class
        path = Path(os.path.abspath(path))
        if path in seen:
            skipped.append({"path": str(path), "reason": "listed twice"})
            continue
        seen.add(path)
        to_probe.append((path, label, split))
    probes = probe_many([p for p, _, _ in to_probe], cache=ProbeCache.for_workspace(ws), workers=workers, progress=progress)
    entries: list[VideoEntry] = []
    for (path, label, split), pr in zip(to_probe, probes, strict=True):
        if not pr.ok:
            skipped.append({"path": str(path), "reason": pr.reason})
        elif pr.n_frames < min_frames:
            skipped.append({"path": str(path), "reason": f"too short ({pr.n_frames} frames < {min_frames})"})
        else:
            entries.append(VideoEntry.from_probe(str(path), label, split, pr))
    if split_auto is not None:
        _assign_splits(entries, classes, *split_auto)
    if holdout > 0:
        hold_out(entries, classes, holdout, group_of)
    if not entries:
        first = f" (first: {skipped[0]['path']}: {skipped[0]['reason']})" if skipped else ""
        raise VccError(f"no usable videos found for {source} dataset {name!r}{first}")
    warnings = replaced + empty_class_note(classes, entries)
    with atomic_dir(ws.dataset_dir(name)) as tmp:
        counts = write_dataset(tmp, name, classes, entries, source=source, options=options, skipped=skipped)
    return PrepareResult(name, ws.dataset_dir(name), list(classes), counts, skipped, warnings)


# ---------------------------------------------------------------- UCF101


def _ucf_lists_dir(splits: Path) -> Path:
    if (splits / "classInd.txt").is_file():
        return splits
    sub = _find_child(splits, ("ucfTrainTestlist",))
    if sub is not None and (sub / "classInd.txt").is_file():
        return sub
    raise UsageError(f"no classInd.txt in {splits} (expected the official ucfTrainTestlist folder)")


def parse_class_ind(path: Path) -> list[str]:
    """Class names in classInd.txt order (1-based indices, any line endings)."""
    by_index: dict[int, str] = {}
    for ln in _read_lines(path):
        parts = ln.split(None, 1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise VccError(f"{path}: bad line {ln!r} (expected 'INDEX ClassName')")
        by_index[int(parts[0])] = parts[1].strip()
    if sorted(by_index) != list(range(1, len(by_index) + 1)):
        raise VccError(f"{path}: class indices are not 1..{len(by_index)}")
    return [by_index[i] for i in range(1, len(by_index) + 1)]


def prepare_ucf101(
    ws: Workspace,
    root: str | Path,
    splits: str | Path,
    *,
    split: int = 1,
    name: str | None = None,
    min_frames: int = DEFAULT_MIN_FRAMES,
    workers: int | None = None,
    progress: ProgressFn | None = None,
    holdout: float = 0.0,
    replace: bool = False,
) -> PrepareResult:
    """UCF101 from the archive (`UCF-101/<Class>/*.avi`) and the official `ucfTrainTestlist`."""
    _check_split(split, "UCF101")
    root_dir = _need_dir(root, "--root")
    lists = _ucf_lists_dir(_need_dir(splits, "--splits"))
    video_root = _find_child(root_dir, ("UCF-101", "UCF101")) or root_dir
    classes = parse_class_ind(lists / "classInd.txt")
    lower = {c.lower(): i for i, c in enumerate(classes)}
    tree = CaseInsensitiveTree(video_root)
    candidates: list[Candidate] = []
    skipped: list[dict[str, str]] = []
    for split_name, fname in (("train", f"trainlist0{split}.txt"), ("test", f"testlist0{split}.txt")):
        lf = lists / fname
        if not lf.is_file():
            raise UsageError(f"{fname} not found in {lists}")
        for ln in _read_lines(lf):
            parts = ln.split()
            rel = parts[0]
            folder = re.split(r"[\\/]", rel)[0]
            if len(parts) > 1 and parts[1].isdigit():
                label = int(parts[1]) - 1
                if not 0 <= label < len(classes):
                    skipped.append({"path": rel, "reason": f"label {parts[1]} not in classInd.txt"})
                    continue
            elif folder.lower() in lower:
                label = lower[folder.lower()]
            else:
                skipped.append({"path": rel, "reason": f"class {folder!r} not in classInd.txt"})
                continue
            candidates.append((tree.resolve(rel), str(video_root / rel), label, split_name))
    options = {"root": str(root_dir.resolve()), "splits": str(lists.resolve()), "split": split}
    return _build(
        ws, name or ("ucf101" if split == 1 else f"ucf101-split{split}"), classes, candidates,
        source="ucf101", options=options, min_frames=min_frames, workers=workers, progress=progress, skipped=skipped,
        holdout=holdout, group_of=ucf101_group,
        replace=replace,
    )


# ---------------------------------------------------------------- HMDB51


def _hmdb_lists_dir(splits: Path, split: int) -> Path:
    pat = f"*_test_split{split}.txt"
    if any(splits.glob(pat)):
        return splits
    sub = _find_child(splits, ("testTrainMulti_7030_splits",))
    if sub is not None and any(sub.glob(pat)):
        return sub
    raise UsageError(f"no *_test_split{split}.txt files in {splits} (expected testTrainMulti_7030_splits)")


def prepare_hmdb51(
    ws: Workspace,
    root: str | Path,
    splits: str | Path,
    *,
    split: int = 1,
    name: str | None = None,
    min_frames: int = DEFAULT_MIN_FRAMES,
    workers: int | None = None,
    progress: ProgressFn | None = None,
    holdout: float = 0.0,
    replace: bool = False,
) -> PrepareResult:
    """HMDB51: `<root>/<class>/<name>.avi` and `<class>_test_split<N>.txt` lists (1 train, 2 test, 0 unused)."""
    _check_split(split, "HMDB51")
    root_dir = _need_dir(root, "--root")
    lists = _hmdb_lists_dir(_need_dir(splits, "--splits"), split)
    suffix = f"_test_split{split}.txt"
    files = {f.name[: -len(suffix)]: f for f in lists.iterdir() if f.name.endswith(suffix)}
    classes = sorted(files)
    if not classes:
        raise UsageError(f"no *{suffix} files in {lists}")
    video_root = root_dir
    if _find_child(root_dir, tuple(classes)) is None:
        video_root = _find_child(root_dir, ("hmdb51_org", "hmdb51")) or root_dir
    tree = CaseInsensitiveTree(video_root)
    candidates: list[Candidate] = []
    skipped: list[dict[str, str]] = []
    for label, cls in enumerate(classes):
        cls_dir = tree.resolve(cls)
        for ln in _read_lines(files[cls]):
            parts = ln.rsplit(None, 1)
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                skipped.append({"path": f"{cls}/{ln}", "reason": f"bad line in {files[cls].name}"})
                continue
            fname, tag = parts
            if tag == "0":
                continue
            rel = f"{cls}/{fname}"
            split_name = "train" if tag == "1" else "test"
            # the name may hold any character but '/': one folder entry, not a relative path
            path = tree.child(cls_dir, fname) if cls_dir is not None else None
            candidates.append((path, str(video_root / rel), label, split_name))
    options = {"root": str(root_dir.resolve()), "splits": str(lists.resolve()), "split": split}
    return _build(
        ws, name or ("hmdb51" if split == 1 else f"hmdb51-split{split}"), classes, candidates,
        source="hmdb51", options=options, min_frames=min_frames, workers=workers, progress=progress, skipped=skipped,
        holdout=holdout,
        replace=replace,
    )


# ---------------------------------------------------------------- UCF11

_UCF11_RE = re.compile(r"_(\d{1,2})_(\d{1,3})$")


def _ucf11_group(path: Path) -> int | None:
    m = _UCF11_RE.search(path.stem)
    if m:
        return int(m.group(1))
    m = re.search(r"_(\d{1,2})$", path.parent.name)
    return int(m.group(1)) if m else None


def prepare_ucf11(
    ws: Workspace,
    root: str | Path,
    *,
    fold: int | None = None,
    test_groups: tuple[int, ...] = UCF11_TEST_GROUPS,
    name: str | None = None,
    min_frames: int = DEFAULT_MIN_FRAMES,
    workers: int | None = None,
    progress: ProgressFn | None = None,
    holdout: float = 0.0,
    replace: bool = False,
) -> PrepareResult:
    """UCF11 (`action_youtube_naudio/<class>/v_<short>_<GG>/v_<short>_<GG>_<CC>.avi`), split by group.

    Groups in `test_groups` (default 21-25) are the test split; `fold=K` tests on group K only.
    """
    if fold is not None and not 1 <= fold <= 25:
        raise UsageError(f"--fold must be between 1 and 25, got {fold}")
    root_dir = _need_dir(root, "--root")
    video_root = _find_child(root_dir, ("action_youtube_naudio", "UCF11_updated_mpg", "UCF11")) or root_dir
    held = {fold} if fold is not None else set(test_groups)
    classes = _class_names(video_root)
    if not classes:
        raise UsageError(f"no class folders in {video_root}")
    candidates: list[Candidate] = []
    skipped: list[dict[str, str]] = []
    for label, cls in enumerate(classes):
        for path in sorted((video_root / cls).rglob("*")):
            rel_parts = path.relative_to(video_root / cls).parts
            if any(p.lower() == "annotation" for p in rel_parts) or path.suffix.lower() not in VIDEO_EXTS or not path.is_file():
                continue
            group = _ucf11_group(path)
            if group is None:
                skipped.append({"path": str(path), "reason": "no group number in the name (v_<class>_<GG>_<CC>)"})
                continue
            candidates.append((path, str(path), label, "test" if group in held else "train"))
    options = {"root": str(root_dir.resolve()), "fold": fold, "test_groups": sorted(held)}
    default = "ucf11" if fold is None else f"ucf11-fold{fold}"
    return _build(
        ws, name or default, classes, candidates,
        source="ucf11", options=options, min_frames=min_frames, workers=workers, progress=progress, skipped=skipped,
        holdout=holdout, group_of=_ucf11_group,
        replace=replace,
    )


# ---------------------------------------------------------------- any folder


def _class_videos(class_dir: Path) -> list[Path]:
    return sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in VIDEO_EXTS and not p.name.startswith("."))


def prepare_folder(
    ws: Workspace,
    root: str | Path,
    *,
    val_ratio: float = 0.2,
    seed: int = 0,
    name: str | None = None,
    min_frames: int = DEFAULT_MIN_FRAMES,
    workers: int | None = None,
    progress: ProgressFn | None = None,
    holdout: float = 0.0,
    replace: bool = False,
) -> PrepareResult:
    """Any `<root>/<class>/<video>` tree; `val_ratio` of each class (shuffled by `seed`) is the test split.

    A tree with `train/<class>/...` and `test/<class>/...` keeps its own split, and a `val/` (or
    `validation/`) beside them becomes the val split; `train/` + `val/` alone make train and test.
    """
    if not 0.0 <= val_ratio < 1.0:
        raise UsageError(f"--test-ratio must be in [0, 1), got {val_ratio}")
    root_dir = _need_dir(root, "--root")
    train_dir = _find_child(root_dir, ("train",))
    test_dir = _find_child(root_dir, ("test",))
    val_dir = _find_child(root_dir, ("val", "validation"))
    if test_dir is None:
        test_dir, val_dir = val_dir, None
    presplit = train_dir is not None and test_dir is not None
    candidates: list[Candidate] = []
    if presplit:
        parts = [("train", train_dir), *([("val", val_dir)] if val_dir is not None else []), ("test", test_dir)]
        classes = sorted({c for _, d in parts for c in _class_names(d)})
        for split_name, d in parts:
            for label, cls in enumerate(classes):
                if (d / cls).is_dir():
                    candidates += [(p, str(p), label, split_name) for p in _class_videos(d / cls)]
    else:
        classes = _class_names(root_dir)
        for label, cls in enumerate(classes):
            candidates += [(p, str(p), label, "auto") for p in _class_videos(root_dir / cls)]
    if not classes:
        raise UsageError(f"no class folders in {root_dir} (expected <class>/<video> files)")
    options = {"root": str(root_dir.resolve()), "val_ratio": None if presplit else val_ratio, "seed": seed, "presplit": presplit}
    default = re.sub(r"[^A-Za-z0-9_.+-]", "-", root_dir.resolve().name).strip("-.") or "folder"
    return _build(
        ws, name or default, classes, candidates,
        source="folder", options=options, min_frames=min_frames, workers=workers, progress=progress,
        split_auto=None if presplit else (val_ratio, seed), holdout=holdout,
        replace=replace,
    )


def _assign_splits(entries: list[VideoEntry], classes: list[str], val_ratio: float, seed: int) -> None:
    """Per class, a seeded shuffle puts round(n * val_ratio) usable videos (at least 1 of 2+) in test."""
    for label, cls in enumerate(classes):
        vids = [e for e in entries if e.label == label]
        order = list(range(len(vids)))
        random.Random(f"{seed}/{cls}").shuffle(order)
        n_test = int(round(len(vids) * val_ratio))
        if val_ratio > 0 and len(vids) >= 2:
            n_test = min(max(1, n_test), len(vids) - 1)
        test_idx = set(order[:n_test])
        for i, e in enumerate(vids):
            e.split = "test" if i in test_idx else "train"


def check_holdout(ratio: float) -> None:
    """UsageError unless 0 <= `ratio` < 1 (checked before any probing or generating)."""
    if not 0.0 <= ratio < 1.0:
        raise UsageError(f"--holdout must be in [0, 1), got {ratio}")


def hold_out(entries: list[VideoEntry], classes: list[str], ratio: float, group_of: Callable[[Path], Any] | None = None) -> None:
    """Move about `ratio` of each class's training videos to a "val" split, for choosing epochs.

    Where `group_of(path)` names a video's group (UCF101's gXX, UCF11's folders: clips of one
    scene), whole groups move, so no group is on both sides. Deterministic (a shuffle seeded by the
    class name); a class keeps at least one training group or video.
    """
    for cls_i, cls in enumerate(classes):
        train = [e for e in entries if e.label == cls_i and e.split == "train"]
        units: dict[Any, list[VideoEntry]] = {}
        for e in train:
            key = group_of(Path(e.path)) if group_of else None
            units.setdefault(("group", key) if key is not None else ("video", e.path), []).append(e)
        order = sorted(units, key=str)
        random.Random(f"holdout/{cls}").shuffle(order)
        want, taken = max(1, round(len(train) * ratio)), 0
        for unit in order[:-1]:
            if taken >= want:
                break
            for e in units[unit]:
                e.split = "val"
            taken += len(units[unit])


def ucf101_group(path: Path) -> int | None:
    """The group (actor/scene) of a UCF101 clip, from `v_<Class>_gXX_cYY.avi`."""
    m = re.search(r"_g(\d+)_c\d+$", path.stem, re.IGNORECASE)
    return int(m.group(1)) if m else None
