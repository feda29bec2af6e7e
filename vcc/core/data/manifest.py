"""Prepared datasets on disk: ``dataset.json`` (classes, counts, source) + ``manifest.jsonl``.

``manifest.jsonl`` holds one video per line: path, label, split, n_frames, fps, width, height, and
``keys`` (keyframes ``[[index, pts], ...]``), ``pts`` (every frame's timestamp, packed) and
``skip_gap`` where the fast reader reads the video exactly (:mod:`vcc.core.data.fastread`).
Paths inside the dataset folder (generated videos) are stored relative to it, so the folder can
move; other paths are absolute. :func:`load_dataset` returns absolute paths.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vcc.core.errors import VccError

FORMAT = "vcc-dataset"
FORMAT_VERSION = 1
SPLITS = ("train", "test")
# Optional splits: present only when a prepare asked for them (`--holdout`: "val", carved out of train).
OPTIONAL_SPLITS = ("val",)


def split_counts(splits: Any) -> dict[str, int]:
    """{"train": n, "test": n} plus "val" when there is one, from an iterable of split names."""
    c = Counter(splits)
    return {s: c.get(s, 0) for s in SPLITS} | {s: c[s] for s in OPTIONAL_SPLITS if c.get(s)}


@dataclass
class VideoEntry:
    """One video of a prepared dataset."""

    path: str
    label: int
    split: str
    n_frames: int
    fps: float
    width: int
    height: int
    keys: list[list[int]] | None = None  # keyframes for vcc.core.data.fastread (None: decord reads it)
    pts: str | None = None  # timestamps for the fast reader (fastread.pack_pts; None: it counts frames)
    skip_gap: int = 0  # fastread.Scan.skip_gap (0: the fast reader decodes every frame)

    @classmethod
    def from_probe(cls, path: str, label: int, split: str, probe: Any) -> VideoEntry:
        """The entry of a video as :func:`vcc.core.data.probe.probe_video` found it (a usable Probe)."""
        return cls(path, label, split, probe.n_frames, probe.fps, probe.width, probe.height, probe.keys, probe.pts, probe.skip_gap)


@dataclass
class DatasetInfo:
    """A prepared dataset: class names (label order) and its videos."""

    name: str
    root: Path
    classes: list[str]
    entries: list[VideoEntry]
    source: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> list[VideoEntry]:
        """The entries of split `name` ("train", "test", or "val" where prepared), in manifest order."""
        if name not in SPLITS and not any(e.split == name for e in self.entries):
            raise VccError(f"dataset {self.name!r} has no split {name!r} (splits: {', '.join(self.counts)})")
        return [e for e in self.entries if e.split == name]

    @property
    def counts(self) -> dict[str, int]:
        """Number of videos per split."""
        return split_counts(e.split for e in self.entries)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class PrepareResult:
    """What every `prepare_*` returns."""

    name: str
    path: Path
    classes: list[str]
    counts: dict[str, int]
    skipped: list[dict[str, str]]
    warnings: list[str] = field(default_factory=list)  # for stderr; not part of the JSON document

    def doc(self) -> dict[str, Any]:
        """The `vcc prepare --format json` document."""
        return {
            "name": self.name,
            "path": str(self.path),
            "classes": list(self.classes),
            "counts": dict(self.counts),
            "skipped": [{"path": s["path"], "reason": s["reason"]} for s in self.skipped],
        }


def _keys(value: Any) -> list[list[int]] | None:
    """A manifest line's keyframes, or None when absent or not a list of [index, pts] pairs."""
    if not isinstance(value, list) or not value:
        return None
    try:
        return [[int(i), int(p)] for i, p in value]
    except (TypeError, ValueError):
        return None


def load_dataset(path: str | Path) -> DatasetInfo:
    """Read a prepared dataset folder (the one holding dataset.json and manifest.jsonl)."""
    root = Path(path)
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise VccError(f"{root} is not a prepared dataset (no dataset.json); run `vcc prepare`")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        classes = [str(c) for c in meta["classes"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise VccError(f"{meta_path} is not a valid dataset.json: {exc}") from None
    entries: list[VideoEntry] = []
    man = root / "manifest.jsonl"
    if not man.is_file():
        raise VccError(f"{root} has no manifest.jsonl; re-run `vcc prepare`")
    for i, line in enumerate(man.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            p = Path(d["path"])
            entries.append(
                VideoEntry(
                    path=str(p if p.is_absolute() else root / p),
                    label=int(d["label"]),
                    split=str(d["split"]),
                    n_frames=int(d["n_frames"]),
                    fps=float(d.get("fps") or 0.0),
                    width=int(d.get("width") or 0),
                    height=int(d.get("height") or 0),
                    keys=_keys(d.get("keys")),
                    pts=d["pts"] if isinstance(d.get("pts"), str) else None,
                    skip_gap=max(0, int(d.get("skip_gap") or 0)),
                )
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise VccError(f"{man}:{i}: bad manifest line: {exc}") from None
        if not 0 <= entries[-1].label < len(classes):
            raise VccError(f"{man}:{i}: label {entries[-1].label} out of range for {len(classes)} classes")
    return DatasetInfo(
        name=str(meta.get("name") or root.name),
        root=root,
        classes=classes,
        entries=entries,
        source=str(meta.get("source", "")),
        options=dict(meta.get("options") or {}),
    )


def write_dataset(
    folder: Path,
    name: str,
    classes: list[str],
    entries: list[VideoEntry],
    *,
    source: str,
    options: dict[str, Any] | None = None,
    skipped: list[dict[str, str]] | None = None,
) -> dict[str, int]:
    """Write dataset.json + manifest.jsonl into `folder` (normally a temp dir of `atomic_dir`).

    Entry paths under `folder` are stored relative to it. Returns the split counts.
    """
    folder = Path(folder)
    lines = []
    for e in entries:
        d = asdict(e)
        if d["keys"] is None:
            del d["keys"], d["pts"], d["skip_gap"]
        elif d["pts"] is None:
            del d["pts"]
        p = Path(e.path)
        if p.is_absolute() and p.is_relative_to(folder):
            d["path"] = p.relative_to(folder).as_posix()
        lines.append(json.dumps(d, ensure_ascii=False))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
    counts = split_counts(e.split for e in entries)
    per_class = Counter((e.split, e.label) for e in entries)
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "source": source,
        "classes": list(classes),
        "counts": counts,
        "per_class": {cls: {s: per_class.get((s, i), 0) for s in counts} for i, cls in enumerate(classes)},
        "options": dict(options or {}),
        "skipped": list(skipped or []),
    }
    (folder / "dataset.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return counts
