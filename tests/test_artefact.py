"""Artefacts: round trips (pruned shapes too), bad files, atomic writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import SHARED_VIDEOS
from vcc.core.artefact import (
    ModelMeta,
    dataset_ref,
    input_spec,
    load_model,
    load_tensors,
    provenance,
    read_doc,
    read_model_meta,
    recorded_dataset,
    save_model,
    save_tensors,
    sha256_file,
)
from vcc.core.errors import ArtefactError
from vcc.core.models import build_model
from vcc.core.workspace import Workspace, atomic_dir, atomic_write_text


def _meta(arch: str = "r3d_tiny", n: int = 5) -> ModelMeta:
    return ModelMeta(arch=arch, num_classes=n, classes=[f"c{i}" for i in range(n)], input=input_spec(8, 32))


def test_round_trip_identical_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("r3d_tiny", 5).eval()
    path = save_model(tmp_path / "m.safetensors", model, _meta())
    loaded, meta = load_model(path)
    x = torch.randn(2, 3, 8, 32, 32)
    assert torch.equal(model(x), loaded(x))
    assert meta.classes == [f"c{i}" for i in range(5)]
    assert meta.provenance["vcc_version"]


def _shrink_conv_pair(model: nn.Module, keep: int) -> None:
    """Hand-prune layer1.0.conv1's output channels (and what consumes them)."""
    blk = model.layer1[0]
    idx = torch.arange(keep)
    conv1, bn1, conv2 = blk.conv1, blk.bn1, blk.conv2
    conv1.weight = nn.Parameter(conv1.weight.data[idx].clone())
    conv1.out_channels = keep
    for name in ("weight", "bias"):
        setattr(bn1, name, nn.Parameter(getattr(bn1, name).data[idx].clone()))
    bn1.running_mean = bn1.running_mean[idx].clone()
    bn1.running_var = bn1.running_var[idx].clone()
    bn1.num_features = keep
    conv2.weight = nn.Parameter(conv2.weight.data[:, idx].clone())
    conv2.in_channels = keep


def test_pruned_model_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("r3d_tiny", 5).eval()
    _shrink_conv_pair(model, 7)
    path = save_model(tmp_path / "p.safetensors", model, _meta())
    loaded, _ = load_model(path)
    assert loaded.layer1[0].conv1.out_channels == 7
    x = torch.randn(1, 3, 8, 32, 32)
    assert torch.allclose(model(x), loaded(x))


def test_not_an_artefact_and_truncated(tmp_path: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello world, not a safetensors file")
    with pytest.raises(ArtefactError):
        load_model(junk)
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(plain))
    with pytest.raises(ArtefactError, match="not a vcc artefact"):
        load_model(plain)
    good = save_model(tmp_path / "g.safetensors", build_model("r3d_tiny", 5), _meta())
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtefactError):
        load_model(cut)


def test_weights_that_do_not_fit_arch(tmp_path: Path) -> None:
    model = build_model("r3d_tiny", 5)
    path = tmp_path / "m.safetensors"
    state = model.state_dict()
    state.pop("fc.bias")
    doc = _meta().to_json()
    save_tensors(path, state, doc)
    with pytest.raises(ArtefactError, match="do not fit"):
        load_model(path)


def test_tensor_artefact_kind_checked(tmp_path: Path) -> None:
    p = save_tensors(tmp_path / "r.safetensors", {"x": torch.ones(3)}, {"format": "vcc-ranking"})
    tensors, doc = load_tensors(p, "vcc-ranking")
    assert doc["format"] == "vcc-ranking" and tensors["x"].sum() == 3
    with pytest.raises(ArtefactError, match="expected"):
        load_tensors(p, "vcc-model")
    assert read_doc(p)["format_version"] == 1
    with pytest.raises(ArtefactError, match="'vcc-ranking' artefact, expected 'vcc-model'"):
        read_model_meta(p)
    meta = ModelMeta(arch="r3d_tiny", num_classes=3, options={"shortcut": "A"}, classes=list("abc"), input=input_spec(8, 32))
    m = save_model(tmp_path / "m.safetensors", build_model("r3d_tiny", num_classes=3, shortcut="A"), meta)
    got = read_model_meta(m)
    assert (got.arch, got.classes, got.options, got.frames, got.size) == ("r3d_tiny", list("abc"), {"shortcut": "A"}, 8, 32)


def test_atomic_writes_leave_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "d"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
    atomic_write_text(tmp_path / "f.json", json.dumps({"a": 1}))
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_resolve_model_by_run_name(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    run = ws.run_dir("r1", create=True)
    save_model(run / "model.safetensors", build_model("r3d_tiny", 5), _meta())
    assert ws.resolve_model("r1") == run / "model.safetensors"
    from vcc.core.errors import VccError

    with pytest.raises(VccError, match="neither"):
        ws.resolve_model("nope")
    with pytest.raises(VccError, match="not found"):
        ws.resolve_model(str(tmp_path / "missing.safetensors"))
    with pytest.raises(VccError, match=r"run 'r1' has no last\.safetensors: it holds model\.safetensors"):
        ws.resolve_model("r1:last")  # a run without that file is named as such, not as an unknown run


def test_artefacts_record_their_dataset_and_children_inherit_it(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from vcc.core.errors import UsageError

    ws = Workspace(tmp_path / "ws")
    folder = ws.datasets_dir / "syn"
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text("{}")
    parent, child, other = tmp_path / "p.safetensors", tmp_path / "c.safetensors", tmp_path / "o.safetensors"
    meta = _meta()
    meta.provenance = provenance(dataset=dataset_ref(SimpleNamespace(name="syn", root=folder)))
    save_model(parent, build_model("r3d_tiny", 5), meta)
    meta.provenance = provenance(parent=parent)  # made from the parent, with no dataset of its own
    save_model(child, build_model("r3d_tiny", 5), meta)
    assert recorded_dataset(child) == {"name": "syn", "path": str(folder.resolve())} == recorded_dataset(read_model_meta(child))
    meta.provenance = provenance(parent=parent, dataset={"name": "ucf", "path": "/nowhere"})  # its own dataset wins
    save_model(other, build_model("r3d_tiny", 5), meta)
    assert recorded_dataset(other)["name"] == "ucf" and recorded_dataset(tmp_path / "missing.safetensors") is None

    assert ws.resolve_dataset_of(None, recorded_dataset(child), "c") == folder.resolve()
    assert ws.resolve_dataset_of("syn", None, "c") == folder  # --data always wins
    moved = {"name": "syn", "path": str(tmp_path / "gone")}  # the folder moved, the name is still here
    assert ws.resolve_dataset_of(None, moved, "c") == ws.datasets_dir / "syn"
    with pytest.raises(UsageError, match=r"made with dataset 'ucf' \(/nowhere\), which is not there any more: give --data"):
        ws.resolve_dataset_of(None, recorded_dataset(other), "o")
    with pytest.raises(UsageError, match="--data is required: m does not record the dataset"):
        ws.resolve_dataset_of(None, None, "m")


def test_new_run_dir_refuses_an_existing_run(tmp_path: Path) -> None:
    from vcc.core.errors import UsageError

    ws = Workspace(tmp_path)
    (ws.run_dir("exits", create=True) / "model.safetensors").write_bytes(b"x")
    with pytest.raises(UsageError, match="run 'exits' already exists"):
        ws.new_run_dir("exits", "wise-exits")
    assert ws.new_run_dir(None, "exits") == ("exits-2", ws.run_dir("exits-2"))
    assert not ws.run_dir("exits-2").exists()
    ws.run_dir("killed", create=True)  # the empty folder a SIGKILLed command left: its name is free
    assert ws.new_run_dir("killed", "x") == ("killed", ws.run_dir("killed"))


@pytest.mark.parametrize("bad", ["-rf", ".hidden", "a/b", "", "x y"])
def test_run_and_dataset_names_say_the_rule(bad: str) -> None:
    from vcc.core.errors import UsageError
    from vcc.core.workspace import check_name

    with pytest.raises(UsageError, match=r"use letters, digits, '_', '\.', '\+', '-', starting with a letter or digit$"):
        check_name(bad, "run name")
    assert check_name("a-1.b_c+d", "run name") == "a-1.b_c+d"


def test_atomic_dir_without_replace_refuses_a_folder_made_meanwhile(tmp_path: Path) -> None:
    """Two commands finishing into one new run name: the second is refused (exit 2), its temp folder
    removed, the first one's files untouched."""
    from vcc.core.errors import UsageError
    from vcc.core.workspace import atomic_dir

    with atomic_dir(tmp_path / "r", replace=False) as first:
        (first / "a").write_text("first")
    with pytest.raises(UsageError, match=r"'r' already exists in .* \(made meanwhile by another command") as err:
        with atomic_dir(tmp_path / "r", replace=False) as second:
            (second / "b").write_text("second")
    assert err.value.exit_code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"] and sorted(p.name for p in (tmp_path / "r").iterdir()) == ["a"]


def test_atomic_writes_get_the_umask_mode_not_private(tmp_path: Path) -> None:
    """Files and folders written through temp siblings end with an ordinary open/mkdir's mode
    (0644/0755 under umask 022), not mkstemp/mkdtemp's private 0600/0700: shared workspaces."""
    import os
    import stat

    from vcc.core.workspace import atomic_dir, atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "f.json", "{}")
        with atomic_dir(tmp_path / "d") as tmp:
            atomic_write_text(tmp / "g.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "d" / "g.txt").stat().st_mode) == 0o644


def test_plain_names_are_the_workspaces_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder in the current directory named like a workspace run or dataset does not shadow it;
    ./NAME reaches the folder."""
    from vcc.core.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    (ws.runs_dir / "base").mkdir(parents=True)
    (ws.runs_dir / "base" / "model.safetensors").write_bytes(b"x")
    (ws.datasets_dir / "syn").mkdir(parents=True)
    (ws.datasets_dir / "syn" / "dataset.json").write_text("{}")
    cwd = tmp_path / "cwd"
    (cwd / "base").mkdir(parents=True)  # a config folder that happens to share the run's name
    (cwd / "syn").mkdir()
    (cwd / "syn" / "dataset.json").write_text("{}")
    monkeypatch.chdir(cwd)
    assert ws.resolve_model("base") == ws.runs_dir / "base" / "model.safetensors"
    assert ws.resolve_dataset("syn") == ws.datasets_dir / "syn"
    assert ws.resolve_dataset("./syn") == Path("./syn")


@pytest.mark.parametrize(
    ("name", "needle"),
    [("model.onnx", "it is an ONNX model"), ("weights.pth", "PyTorch checkpoint: start from its weights with `vcc train --init"),
     ("clip.avi", "it is a video"), ("notes.txt", None)],
)
def test_a_file_that_is_not_an_artefact_says_what_it_looks_like(tmp_path: Path, name: str, needle: str | None) -> None:
    """vcc macs/eval/port on an ONNX export, a .pth or a video: the one-line error says what to do instead."""
    path = tmp_path / name
    if name.endswith(".pth"):
        torch.save({"w": torch.ones(2)}, path)
    elif name.endswith(".avi"):
        shutil.copy(SHARED_VIDEOS / "test.avi", path)
    else:
        path.write_bytes(b"\x08\x07\x12\x07pytorch" * 8)
    with pytest.raises(ArtefactError, match="is not a readable safetensors file") as err:
        read_doc(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert (needle in msg) if needle else ("; it" not in msg)


def test_sha256_file_is_remembered_but_follows_a_rewrite(tmp_path: Path) -> None:
    import hashlib
    import os

    p = tmp_path / "m.bin"
    p.write_bytes(b"a" * 1000)
    assert sha256_file(p) == hashlib.sha256(b"a" * 1000).hexdigest()
    p.write_bytes(b"b" * 1000)  # same size: the new mtime tells the file changed
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert sha256_file(p) == hashlib.sha256(b"b" * 1000).hexdigest()
    p.write_bytes(b"c" * 10)  # another size
    assert sha256_file(p) == hashlib.sha256(b"c" * 10).hexdigest()
