"""The managed workspace: datasets/<name>/, runs/<name>/, and atomic writes."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vcc.core.errors import UsageError, VccError

ENV_VAR = "VCC_HOME"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def default_root() -> Path:
    """The workspace root: $VCC_HOME, else platformdirs' user data dir for "vcc"."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("vcc"))


def check_name(name: str, what: str = "name") -> str:
    """Validate a dataset or run name (letters, digits, _ . + -; no slashes)."""
    if not _NAME_RE.match(name or ""):
        raise UsageError(f"invalid {what} {name!r}: use letters, digits, '_', '.', '+', '-', starting with a letter or digit")
    return name


@dataclass(frozen=True)
class Workspace:
    """A vcc workspace directory."""

    root: Path

    def __post_init__(self) -> None:
        # absolute from the start: paths recorded in manifests and run files must not depend on
        # the directory a later command runs in (symlinks kept, as the user named them)
        object.__setattr__(self, "root", Path(os.path.abspath(Path(self.root).expanduser())))

    @classmethod
    def default(cls) -> Workspace:
        return cls(default_root())

    @property
    def datasets_dir(self) -> Path:
        return self.root / "datasets"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    def check_writable(self, folder: Path) -> None:
        """VccError unless `folder` (made if missing) takes a new file: checked before long work, not after it."""
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise VccError(f"cannot write to the workspace ({folder}): {exc.strerror or exc}") from None

    def dataset_dir(self, name: str) -> Path:
        return self.datasets_dir / check_name(name, "dataset name")

    def run_dir(self, name: str, create: bool = False) -> Path:
        path = self.runs_dir / check_name(name, "run name")
        if create:
            path.mkdir(parents=True, exist_ok=True)
        return path

    def datasets(self) -> list[str]:
        if not self.datasets_dir.is_dir():
            return []
        return sorted(p.name for p in self.datasets_dir.iterdir() if (p / "dataset.json").is_file())

    def runs(self) -> list[str]:
        if not self.runs_dir.is_dir():
            return []
        return sorted(p.name for p in self.runs_dir.iterdir() if p.is_dir())

    def resolve_dataset(self, name: str) -> Path:
        """The folder of a prepared dataset, or a one-line error listing the known ones."""
        path = Path(name)
        # a plain name is the workspace's dataset first (a folder of that name in the current
        # directory does not shadow it; write ./NAME for that folder)
        if _NAME_RE.match(name) and (self.datasets_dir / name / "dataset.json").is_file():
            return self.datasets_dir / name
        if path.is_dir() and (path / "dataset.json").is_file():
            return path
        known = ", ".join(self.datasets()) or "none; run `vcc prepare`"
        if path.is_dir():  # a folder of videos, not yet prepared
            raise VccError(f"{name} is a folder but not a prepared dataset (no dataset.json): "
                           f"prepare it first with `vcc prepare folder --root {name}`")
        raise VccError(f"dataset {name!r} not found in {self.datasets_dir} (known: {known})")

    def recorded_dataset_dir(self, path: str | None, name: str | None) -> Path | None:
        """Where a dataset recorded by its folder and name (a run's, an artefact's) is now: this
        workspace's dataset of that name (a moved or copied workspace uses its own copy), else the
        recorded folder; None when neither holds a prepared dataset."""
        if name and _NAME_RE.match(name) and (self.datasets_dir / name / "dataset.json").is_file():
            return self.datasets_dir / name
        if path and (Path(path) / "dataset.json").is_file():
            return Path(path)
        return None

    def resolve_dataset_of(self, data: str | None, recorded: dict[str, str] | None, model: str) -> Path:
        """`--data` if given, else the dataset `model`'s artefact records it was made with
        (`recorded`: artefact.recorded_dataset; :meth:`recorded_dataset_dir`)."""
        if data:
            return self.resolve_dataset(data)
        if not recorded:
            raise UsageError(f"--data is required: {model} does not record the dataset it was made with")
        found = self.recorded_dataset_dir(recorded.get("path"), recorded.get("name"))
        if found is None:
            raise UsageError(f"{model} was made with dataset {recorded.get('name')!r} ({recorded.get('path')}), "
                             "which is not there any more: give --data")
        return found

    def _named_run(self, spec: str) -> Path | None:
        """The run a plain `NAME` or `NAME:SUFFIX` names, if the workspace has it: a plain name is
        the workspace's run first (write ./NAME for a folder of that name)."""
        name = spec.partition(":")[0]
        if os.sep in spec or Path(spec).suffix == ".safetensors" or not _NAME_RE.match(name):
            return None
        run = self.runs_dir / name
        return run if run.is_dir() else None

    def resolve_model(self, spec: str) -> Path:
        """A model artefact from a `.safetensors` path or a run name (its model.safetensors).

        A run name may carry a suffix: `RUN:best`, `RUN:last`.
        """
        path = Path(spec).expanduser()
        if self._named_run(spec) is None and (path.suffix == ".safetensors" or os.sep in spec or path.exists()):
            if path.is_file():
                return path
            if path.is_dir() and (path / "model.safetensors").is_file():
                return path / "model.safetensors"
            if path.is_dir():
                raise VccError(f"{spec} is a folder without a model.safetensors (give a .safetensors file or a run)")
            raise VccError(f"model file not found: {spec}")
        name, _, which = spec.partition(":")
        if _NAME_RE.match(name):
            run = self.runs_dir / name
            candidates = [run / f"{which}.safetensors"] if which else [
                run / "model.safetensors",
                run / "best.safetensors",
                run / "last.safetensors",
            ]
            for cand in candidates:
                if cand.is_file():
                    return cand
            if run.is_dir():
                what = f"no {which}.safetensors" if which else "no model (model/best/last.safetensors)"
                raise VccError(f"run {name!r} has {what}: it holds {', '.join(sorted(p.name for p in run.iterdir())) or 'nothing'}")
        known = ", ".join(self.runs()) or "none"
        raise VccError(f"model {spec!r} is neither a .safetensors file nor a run in {self.runs_dir} (runs: {known})")

    def resolve_ranking(self, spec: str) -> Path:
        """A ranking from a file path or a `vcc rank` run name (its one ranking-*.safetensors;
        `RUN:METHOD` picks ranking-METHOD of a run that holds several). As for models, a plain
        name is the workspace's run first."""
        path = Path(spec).expanduser()
        name, _, method = spec.partition(":")
        run = self._named_run(spec)
        if run is None:
            if path.is_file():
                return path
            if path.suffix == ".safetensors" or os.sep in spec:
                raise VccError(f"ranking file not found: {spec}")
            raise VccError(f"ranking {spec!r} is neither a file nor a run in {self.runs_dir} (runs: {', '.join(self.runs()) or 'none'})")
        held = {f.stem.removeprefix("ranking-"): f for f in sorted(run.glob("ranking-*.safetensors"))}
        if method in held or (not method and len(held) == 1):
            return held[method or next(iter(held))]
        if not held:
            raise VccError(f"run {name!r} holds no ranking (make one with `vcc rank MODEL --name {name}`)")
        listed = ", ".join(held)
        raise VccError(f"run {name!r} holds no {method!r} ranking (it holds: {listed})" if method
                       else f"run {name!r} holds rankings {listed}: say which, e.g. {name}:{next(iter(held))}")

    def model_stem(self, model_path: Path) -> str:
        """:func:`model_stem` (a method for the commands' convenience)."""
        return model_stem(model_path)

    def new_run_dir(self, name: str | None, default_base: str) -> tuple[str, Path]:
        """(name, folder) of a run to create: `name` if given and free (else UsageError), or a free
        `default_base`, `default_base-2`, ... The folder is not made."""
        if name is None:
            name = self.unique_run_name(default_base)
        path = self.run_dir(name)
        self.check_writable(self.runs_dir)  # before the work, with a message that names the workspace
        if path.exists() and not (path.is_dir() and not any(path.iterdir())):  # an empty folder (a killed run) is free
            raise UsageError(f"run {name!r} already exists in {self.runs_dir}; choose another --name")
        return name, path

    def unique_run_name(self, base: str) -> str:
        """`base`, or `base-2`, `base-3`, ... whichever does not exist yet."""
        check_name(base, "run name")
        if not (self.runs_dir / base).exists():
            return base
        i = 2
        while (self.runs_dir / f"{base}-{i}").exists():
            i += 1
        return f"{base}-{i}"


# ---------------------------------------------------------------- atomic writes


@functools.cache
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_mode(path: Path, is_dir: bool) -> None:
    """Give a file or folder made by mkstemp/mkdtemp (private: 0600/0700) the mode an ordinary
    open/mkdir would have (0644/0755 under umask 022), so a shared workspace stays readable."""
    try:
        os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())
    except OSError:
        pass


def _tmp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    normal_mode(Path(tmp), is_dir=False)
    return Path(tmp)


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir/.lock` (this process's pid) for the block: a second `vcc train` or
    `--resume` on the same run fails at once instead of writing into it too. A lock whose
    process is gone (a crash, SIGKILL) is taken over."""
    lock = Path(run_dir) / ".lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid > 0 and pid != os.getpid() and _alive(pid):
                raise VccError(f"run {Path(run_dir).name!r} is being written by another vcc process (pid {pid})") from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
    else:
        raise VccError(f"cannot lock run {Path(run_dir).name!r} ({lock})")
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    tmp = _tmp_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write bytes to `path` atomically (temp file + fsync + rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def model_stem(model_path: str | Path) -> str:
    """A short name for a model in run names and logs: its run's name for a run's
    model/best/last.safetensors, else the file's stem; only characters run names allow."""
    p = Path(model_path)
    stem = p.parent.name if p.name in ("model.safetensors", "best.safetensors", "last.safetensors") else p.stem
    stem = "".join(c if c.isalnum() or c in "_.+-" else "-" for c in stem).strip(".-_+")
    return stem or "model"


@contextlib.contextmanager
def atomic_dir(path: str | Path, replace: bool = True) -> Iterator[Path]:
    """Build a directory in a temp sibling and move it into place only if the block succeeds.

    With replace=True an existing directory at `path` is swapped out after success.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    normal_mode(tmp, is_dir=True)
    try:
        yield tmp
        if not replace:
            try:
                os.rename(tmp, path)  # atomic; refuses an existing non-empty folder (one made meanwhile)
            except OSError as exc:
                if not path.exists():
                    raise
                raise UsageError(f"{path.name!r} already exists in {path.parent} (made meanwhile by another command?); "
                                 f"run again, or with another --name") from exc
            return
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
