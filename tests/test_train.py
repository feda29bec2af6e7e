"""Training: the fit loop, checkpoints and exact resume, KD, finetune, bad input, DDP (gloo)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

from tests.conftest import run_vcc
from vcc.cli import app
from vcc.core.artefact import ModelMeta, input_spec, load_model, read_doc, save_model
from vcc.core.models import build_model
from vcc.core.training import Loaders, TrainConfig, fit, kd_loss, lr_factor, weights_sha256

runner = CliRunner()
FAST = ["--epochs", "1", "--workers", "0", "--batch-size", "8", "--device", "cpu"]


def _cli(ws, *args: str):
    res = runner.invoke(app, ["--workspace", str(ws.root), *args])
    assert res.exit_code == 0, (res.output, res.exception)
    return res


def _state(path: Path) -> dict[str, torch.Tensor]:
    model, _ = load_model(path)
    return model.state_dict()


def _memory_loaders(n: int = 16, classes: int = 4, seed: int = 0) -> Loaders:
    """In-memory uint8 clips (batch format of the real loader) for loop-level tests."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 8, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % classes
    ds = TensorDataset(x, y, torch.arange(n))
    return Loaders(DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed)),
                   DataLoader(ds, batch_size=8), [f"c{i}" for i in range(classes)])


def _tiny(classes: int = 4) -> tuple[nn.Module, ModelMeta]:
    torch.manual_seed(0)
    model = build_model("r3d_tiny", num_classes=classes)
    meta = ModelMeta(arch="r3d_tiny", num_classes=classes, classes=[f"c{i}" for i in range(classes)], input=input_spec(8, 32))
    return model, meta


# ---------------------------------------------------------------- CLI: artefacts, metrics, resume


def test_train_cli_writes_artefacts_and_metrics(ws, tiny_synthetic) -> None:
    proc = run_vcc("train", "--data", str(tiny_synthetic), "--name", "r1", *FAST, "--format", "json", check=True)
    doc = json.loads(proc.stdout)  # stdout is exactly one JSON document
    run = ws.run_dir("r1")
    assert doc["run"] == "r1" and Path(doc["model"]) == run / "model.safetensors"
    for f in ("model", "best", "last", "checkpoint"):
        assert (run / f"{f}.safetensors").is_file()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["epoch"] == 1 and 0.0 <= rec["val_video_top1"] <= 1.0 and rec["train_loss"] > 0
    model, meta = load_model(run / "model.safetensors")
    assert meta.arch == "r3d_tiny" and meta.classes == ["up", "down", "sideways", "still"]
    assert meta.frames == 8 and meta.size == 32
    assert meta.provenance["metrics"]["epoch"] == 1 and "val_video_top1" in meta.provenance["metrics"]
    ckpt = json.loads((run / "checkpoint.json").read_text())
    assert ckpt["epoch"] == 1 and ckpt["config"]["epochs"] == 1
    assert "Traceback" not in proc.stderr and "epoch 1/1" in proc.stderr
    assert doc["selected_on"] == "test"  # the synthetic set has no other split to choose the best epoch on


def test_train_table_says_the_best_epoch_was_chosen_on_test(ws, tiny_synthetic) -> None:
    proc = run_vcc("train", "--data", str(tiny_synthetic), "--name", "t1", "--epochs", "1", "--workers", "0", "--max-batches", "1", check=True)
    out = " ".join((proc.stdout + proc.stderr).split())
    assert "chosen on the test split" in out and "t1:last is the unselected model" in out


def test_best_epoch_is_chosen_on_a_prepared_val_split(ws, tiny_synthetic) -> None:
    """`vcc prepare folder --holdout`: training validates on "val", never on test."""
    run_vcc("prepare", "folder", "--root", str(tiny_synthetic / "videos"), "--holdout", "0.25", "--name", "held", check=True,
            env={"VCC_HOME": str(ws.root)})
    proc = run_vcc("train", "--data", "held", "--name", "h1", "--epochs", "2", "--workers", "0", "--max-batches", "1", "-f", "json",
                   check=True, env={"VCC_HOME": str(ws.root)})
    doc = json.loads(proc.stdout)
    assert doc["selected_on"] == "val"
    out = run_vcc("train", "--data", "held", "--name", "h2", "--epochs", "1", "--workers", "0", "--max-batches", "1",
                  check=True, env={"VCC_HOME": str(ws.root)})
    assert "chosen on the test split" not in " ".join(out.stdout.split())


def test_resume_refuses_settings_it_would_ignore_and_notes_a_longer_run(ws, tiny_synthetic) -> None:
    """--resume keeps the run's own data, arch and optimiser settings: changing them is an error
    (they used to be dropped silently); --epochs extends the run, and the summary says how."""
    _cli(ws, "train", "--data", str(tiny_synthetic), *FAST, "--epochs", "2", "--max-batches", "1", "--name", "r", "--stop-after", "1")
    bad = run_vcc("-w", str(ws.root), "train", "--resume", "r", "--data", str(tiny_synthetic), "--lr", "0.1", "-a", "r3d_tiny")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --resume continues a run with the settings it started with; --arch, --lr cannot change "
        "(with --resume: --epochs to extend it, --workers, --device, --data where its dataset is now)"]
    out = " ".join(_cli(ws, "train", "--resume", "r", "--epochs", "3", "--workers", "0").stdout.split())
    assert "--epochs 3 changed the run's length from 2: from epoch 2 on, the learning rate follows the cosine schedule" in out


def test_same_name_started_together_one_wins(ws, tiny_synthetic) -> None:
    """Two `vcc train --name X` at once: the folder is claimed atomically, so one trains and the
    other is refused; never one run folder with two trainings' files mixed."""
    cmd = [sys.executable, "-m", "vcc", "-w", str(ws.root), "train", "--data", str(tiny_synthetic), *FAST,
           "--max-batches", "1", "--name", "par"]
    procs = [subprocess.Popen(cmd + ["--seed", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    assert "run 'par' already exists" in next(err for rc, err in results if rc == 2)
    seed = json.loads((ws.run_dir("par") / "run.json").read_text())["config"]["seed"]
    assert json.loads((ws.run_dir("par") / "checkpoint.json").read_text())["config"]["seed"] == seed
    assert [p.name for p in ws.runs_dir.iterdir() if p.name.startswith(".")] == []  # no staging folders left


def test_a_run_being_written_refuses_a_second_writer(ws, tiny_synthetic) -> None:
    """Two `vcc train --resume RUN` at once: the second finds the first's lock and stops; a lock
    left by a dead process (SIGKILL) is taken over."""
    _cli(ws, "train", "--data", str(tiny_synthetic), *FAST, "--epochs", "2", "--max-batches", "1", "--name", "lk", "--stop-after", "1")
    lock = ws.run_dir("lk") / ".lock"
    holder = subprocess.Popen(["sleep", "60"])  # a live process standing in for the first writer
    try:
        lock.write_text(str(holder.pid))
        res = runner.invoke(app, ["--workspace", str(ws.root), "train", "--resume", "lk", "--workers", "0"])
        assert res.exit_code == 1 and f"run 'lk' is being written by another vcc process (pid {holder.pid})" in res.output
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone now: its lock is stale and taken over; the run finishes and the lock goes
    _cli(ws, "train", "--resume", "lk", "--workers", "0")
    assert not lock.exists()


def test_resume_in_a_moved_workspace_uses_its_own_dataset(ws, tiny_synthetic, tmp_path) -> None:
    """A workspace copied elsewhere (rsync to a cluster) resumes its runs on its own copy of the
    dataset, even while the old copy still exists; --data points a run at a dataset that moved."""
    import shutil

    _cli(ws, "prepare", "folder", "--root", str(tiny_synthetic / "videos"), "--name", "syn")
    _cli(ws, "train", "--data", "syn", *FAST, "--epochs", "2", "--max-batches", "1", "--name", "m", "--stop-after", "1")
    moved = tmp_path / "moved ws é"
    shutil.copytree(ws.root, moved)
    res = runner.invoke(app, ["--workspace", str(moved), "train", "--resume", "m", "--workers", "0", "-f", "json"])
    assert res.exit_code == 0, res.output
    run = json.loads((moved / "runs" / "m" / "run.json").read_text())
    assert run["data"] == str(moved / "datasets" / "syn") and run["data_name"] == "syn"
    shutil.rmtree(moved / "datasets" / "syn")  # gone from the copy: --data says where it is
    _cli(ws, "train", "--data", "syn", *FAST, "--epochs", "2", "--max-batches", "1", "--name", "m2", "--stop-after", "1")
    shutil.copytree(ws.run_dir("m2"), moved / "runs" / "m2")
    res = runner.invoke(app, ["--workspace", str(moved), "train", "--resume", "m2", "--data", str(ws.datasets_dir / "syn"),
                              "--workers", "0"])
    assert res.exit_code == 0, res.output


def test_resume_is_bit_exact(ws, tiny_synthetic) -> None:
    """A run stopped after epoch 1 and resumed ends with the same weights as an uninterrupted one."""
    common = ["train", "--data", str(tiny_synthetic), "--epochs", "2", "--workers", "0", "--device", "cpu", "--seed", "3",
              "--max-batches", "1", "-f", "json"]
    _cli(ws, *common, "--name", "full")
    _cli(ws, *common, "--name", "part", "--stop-after", "1")
    part = ws.run_dir("part")
    assert json.loads((part / "checkpoint.json").read_text())["epoch"] == 1
    first = _state(part / "last.safetensors")
    res = _cli(ws, "train", "--resume", "part", "-f", "json")
    assert json.loads(res.stdout)["epochs"] == 2
    a, b = _state(ws.run_dir("full") / "last.safetensors"), _state(part / "last.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    assert not all(torch.equal(first[k], b[k]) for k in b)  # epoch 2 did train
    lines = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    full = [json.loads(x) for x in (ws.run_dir("full") / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert [r["train_loss"] for r in lines] == [r["train_loss"] for r in full]


def test_interrupt_mid_epoch_resumes_bit_exactly(tmp_path) -> None:
    """A KeyboardInterrupt after part of epoch 2 keeps epoch 1's checkpoint; resuming redoes epoch 2
    from its start and ends with the weights of an uninterrupted run (it used to continue from
    weights that had already taken epoch 2's batches, so they were applied twice)."""
    cfg = TrainConfig(epochs=3, device="cpu", warmup=0, workers=0, seed=5)
    model, meta = _tiny()
    whole = fit(model, meta, _memory_loaders(), cfg, tmp_path / "whole", epoch_hook=lambda e, m: {"hook": e})

    def boom(epoch: int, m: nn.Module) -> dict:
        if epoch == 1:  # epoch 2's batches have run
            raise KeyboardInterrupt
        return {"hook": epoch}

    with pytest.raises(KeyboardInterrupt):
        fit(_tiny()[0], meta, _memory_loaders(), cfg, tmp_path / "cut", epoch_hook=boom)
    summary = json.loads((tmp_path / "cut" / "checkpoint.json").read_text())
    assert summary["interrupted"] == {"epoch": 1, "batch": 1} and summary["epoch"] == 1
    assert read_doc(tmp_path / "cut" / "checkpoint.safetensors")["interrupted"] is None  # epoch 1's state, whole
    res = fit(_tiny()[0], meta, _memory_loaders(), cfg, tmp_path / "cut", resume=True, epoch_hook=lambda e, m: {"hook": e})
    assert [h["epoch"] for h in res.history] == [1, 2, 3] and res.history[0]["hook"] == 0
    assert [h["train_loss"] for h in res.history] == [h["train_loss"] for h in whole.history]
    a, b = _state(whole.last_path), _state(res.last_path)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"


def test_interrupt_in_the_first_epoch_resumes_from_the_start(tmp_path) -> None:
    cfg = TrainConfig(epochs=1, device="cpu", warmup=0, workers=0, seed=5)
    model, meta = _tiny()
    whole = fit(model, meta, _memory_loaders(), cfg, tmp_path / "whole")

    def boom(epoch: int, m: nn.Module) -> dict:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(_tiny()[0], meta, _memory_loaders(), cfg, tmp_path / "cut", epoch_hook=boom)
    assert json.loads((tmp_path / "cut" / "checkpoint.json").read_text())["epoch"] == 0
    res = fit(_tiny()[0], meta, _memory_loaders(), cfg, tmp_path / "cut", resume=True)
    a, b = _state(whole.last_path), _state(res.last_path)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def sigint_as_in_a_terminal():
    """Python's KeyboardInterrupt handler, also when pytest runs as a background job (SIGINT ignored from birth)."""
    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def _sigint_default() -> None:  # a child's SIGINT as in a terminal, whatever the parent ignores
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_at_a_batch_boundary_not_inside_running_code(tmp_path, sigint_as_in_a_terminal) -> None:
    """A real SIGINT only flags the stop: code running when it lands (here an epoch hook; in the wild
    decord's VideoReader.__del__, which swallowed it) finishes, and fit stops at the next batch."""
    model, meta = _tiny()
    cfg = TrainConfig(epochs=3, device="cpu", warmup=0, workers=0)
    finished = []

    def hook(epoch: int, m: nn.Module) -> dict:
        os.kill(os.getpid(), signal.SIGINT)
        finished.append(epoch)  # with Python's default handler, KeyboardInterrupt is raised above
        return {}

    with pytest.raises(KeyboardInterrupt):
        fit(model, meta, _memory_loaders(), cfg, tmp_path, epoch_hook=hook)
    assert finished == [0]
    doc = json.loads((tmp_path / "checkpoint.json").read_text())
    assert doc["interrupted"] == {"epoch": 1, "batch": 0} and doc["epoch"] == 1
    assert len(read_doc(tmp_path / "checkpoint.safetensors")["history"]) == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_exits_130_with_checkpoint(ws, tiny_synthetic, sig) -> None:
    """Ctrl-C, and SIGTERM (`kill`, a scheduler's preemption) alike: stop at a batch boundary, keep
    the last completed epoch's checkpoint, exit 130 with the resume hint."""
    env = {**os.environ, "VCC_HOME": str(ws.root)}
    proc = subprocess.Popen([sys.executable, "-m", "vcc", "train", "--data", str(tiny_synthetic), "--name", "cc", "--epochs", "1000",
                             "--workers", "0", "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=_sigint_default)
    ckpt = ws.run_dir("cc") / "checkpoint.json"
    deadline = time.time() + 120

    def epochs_done() -> int:
        try:
            return int(json.loads(ckpt.read_text())["epoch"])
        except (OSError, ValueError, KeyError):
            return 0

    while epochs_done() < 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert ckpt.exists()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=180)  # ~1.5 s when quiet; generous for a loaded 2-core CI box
    assert proc.returncode == 130, err
    assert "interrupted" in err and "--resume cc" in err and "Traceback" not in err
    doc = json.loads(ckpt.read_text())
    assert doc["epoch"] >= 1 and out == ""


# ---------------------------------------------------------------- loop semantics


def test_frozen_params_and_buffers_stay(tmp_path) -> None:
    model, meta = _tiny()
    model.register_buffer("fixed_mask", torch.rand(5))
    frozen_before = {k: v.clone() for k, v in model.layer1.state_dict().items()}
    model.layer1.requires_grad_(False)
    before_fc = model.fc.weight.detach().clone()
    mask = model.fixed_mask.clone()
    res = fit(model, meta, _memory_loaders(), TrainConfig(epochs=1, device="cpu", workers=0), tmp_path / "run")
    after = model.layer1.state_dict()
    assert all(torch.equal(frozen_before[k], after[k]) for k in frozen_before), "frozen layer (incl. BN stats) changed"
    assert torch.equal(model.fixed_mask, mask)
    assert not torch.equal(model.fc.weight, before_fc)
    assert res.best["epoch"] == 1


def test_param_groups_and_custom_criterion(tmp_path) -> None:
    model, meta = _tiny()
    seen = []

    def crit(m, x, y, epoch):
        seen.append(x.dtype)
        logits = m(x)
        return nn.functional.cross_entropy(logits, y) + 0.0 * logits.sum(), logits

    groups = [{"params": list(model.fc.parameters()), "lr": 0.5}, {"params": list(model.layer4.parameters()), "lr": 0.001}]
    before = model.conv1.weight.detach().clone()
    fit(model, meta, _memory_loaders(), TrainConfig(epochs=1, device="cpu", warmup=0, schedule="constant"), tmp_path, criterion=crit, param_groups=groups)
    assert seen and all(d == torch.float32 for d in seen)  # uint8 normalised before the criterion
    assert torch.equal(model.conv1.weight, before)  # not in any group


def test_kd_loss_is_hinton_form() -> None:
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    T = 3.0
    p = torch.softmax(t / T, 1)
    manual = (p * (p.log() - torch.log_softmax(s / T, 1))).sum(1).mean() * T * T
    assert torch.allclose(kd_loss(s, t, T), manual, atol=1e-6)
    assert kd_loss(t, t, T).abs() < 1e-6


def test_epoch_records_the_lr_it_trained_with(ws, tiny_synthetic) -> None:
    """The history's lr is the rate the epoch's batches used, not the scheduler's next one: step
    decay x0.1 every third of 6 epochs trains epochs 1-2 at the peak, 5-6 at a hundredth."""
    doc = json.loads(_cli(ws, "train", "--data", str(tiny_synthetic), *FAST, "--epochs", "6", "--max-batches", "1",
                          "--optimizer", "sgd", "--lr", "0.05", "--schedule", "step", "--warmup", "0", "-f", "json").stdout)
    assert [h["lr"] for h in doc["history"]] == [0.05, 0.05, 0.005, 0.005, 0.0005, 0.0005]


def test_lr_schedule_warmup_and_cosine() -> None:
    f = lr_factor(TrainConfig(epochs=4, warmup=1, schedule="cosine"), steps_per_epoch=10)
    assert f(0) < f(5) < f(9) <= 1.0
    assert f(10) == pytest.approx(1.0) and f(39) < 0.01
    g = lr_factor(TrainConfig(epochs=6, warmup=0, schedule="step", step_size=2, gamma=0.1), steps_per_epoch=5)
    assert g(0) == 1.0 and g(10) == pytest.approx(0.1) and g(29) == pytest.approx(0.01)


def test_kd_training_via_cli(ws, tiny_synthetic, tiny_model) -> None:
    res = _cli(ws, "train", "--data", str(tiny_synthetic), "--name", "kd", "--teacher", str(tiny_model), "--kd-alpha", "0.7",
               "--kd-temperature", "2", *FAST, "--max-batches", "1", "-f", "json")
    doc = json.loads(res.stdout)
    run = json.loads((ws.run_dir("kd") / "run.json").read_text())
    assert run["teacher"] == str(tiny_model) and run["config"]["kd_alpha"] == 0.7
    assert doc["history"][0]["train_loss"] > 0


def test_init_from_third_party_pth(ws, tiny_synthetic, tmp_path) -> None:
    torch.manual_seed(5)
    donor = build_model("r3d_tiny", num_classes=10)  # other class count: the head is skipped
    pth = tmp_path / "w.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in donor.state_dict().items()}}, pth)
    res = _cli(ws, "train", "--data", str(tiny_synthetic), "--name", "ini", "--init", str(pth), *FAST, "--max-batches", "1",
               "--lr", "1e-9", "--warmup", "0", "-f", "json")
    assert json.loads(res.stdout)["run"] == "ini"
    got = _state(ws.run_dir("ini") / "last.safetensors")
    # conv weights came from the donor (lr ~0 keeps them); the classifier did not
    assert torch.allclose(got["conv1.weight"], donor.state_dict()["conv1.weight"], atol=1e-6)
    assert got["fc.weight"].shape[0] == 4


def test_init_from_files_vcc_will_not_unpickle_says_why(tmp_path) -> None:
    """--init a JSON file, or a pickle holding objects: one line saying what is wrong, no torch advice."""
    from vcc.core.artefact import ArtefactError, import_weights

    text = tmp_path / "run.json"
    text.write_text('{"config": {}}')
    with pytest.raises(ArtefactError, match=r"not a PyTorch checkpoint \(.pth/.pt\) or a .safetensors file$"):
        import_weights(text)
    obj = tmp_path / "obj.pth"
    torch.save({"model": build_model("r3d_tiny", 4)}, obj)  # a whole module, not a state dict
    with pytest.raises(ArtefactError, match="holds Python objects besides tensors") as err:
        import_weights(obj)
    assert "arbitrary code" not in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- finetune keeps structure


def test_finetune_keeps_pruned_shapes_and_masks(ws, tiny_synthetic) -> None:
    import torch_pruning as tp

    from vcc.core.compress import magnitude  # noqa: F401 - registers the "masks" wrapper
    from vcc.core.models import apply_wrappers

    model, _ = _tiny()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 8, 32, 32))
    dg.get_pruning_group(model.layer1[0].conv1, tp.prune_conv_out_channels, idxs=[0, 1, 2, 3]).prune()
    wrappers = [{"name": "masks", "options": {"layers": ["layer2.0.conv1"]}}]
    model = apply_wrappers(model, wrappers)
    mask = (torch.rand_like(model.layer2[0].conv1.weight_mask) > 0.5).float()
    model.layer2[0].conv1.weight_mask.copy_(mask)
    meta = ModelMeta(arch="r3d_tiny", num_classes=4, classes=["up", "down", "sideways", "still"], input=input_spec(8, 32), wrappers=wrappers)
    src = ws.root / "pruned.safetensors"
    save_model(src, model, meta)
    res = _cli(ws, "finetune", str(src), "--data", str(tiny_synthetic), "--name", "ft", "--epochs", "1", "--workers", "0",
               "--device", "cpu", "--max-batches", "1", "-f", "json")
    doc = json.loads(res.stdout)
    tuned, tmeta = load_model(doc["model"])
    assert tuned.layer1[0].conv1.out_channels == 12 and tuned.layer1[0].bn1.num_features == 12
    assert tmeta.wrappers == wrappers
    assert torch.equal(tuned.layer2[0].conv1.weight_mask, mask)
    tuned(torch.randn(1, 3, 8, 32, 32))  # torch's prune hook recomputes weight = weight_orig * mask
    assert torch.all(tuned.layer2[0].conv1.weight[mask == 0] == 0)
    before = _state_model(model)
    assert not torch.equal(before["fc.weight"], tuned.state_dict()["fc.weight"])  # it did train
    assert tmeta.provenance["parent_sha256"] and tmeta.provenance["step"] == "finetune"


def _state_model(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["train", "--data", "nope"], 1, "dataset 'nope' not found"),
        (["train", "--resume", "ghost"], 1, "no resumable run 'ghost'"),
        (["train", "--data", "{data}", "--optimizer", "adam"], 2, "--optimizer must be one of"),
        (["train", "--data", "{data}", "--compile-mode", "fast"], 2, "--compile-mode must be one of"),
        (["train", "--data", "{data}", "--name", "neg", "--lr", "-1"], 2, "--lr must be > 0"),
        (["train", "--data", "{data}", "--arch", "resnet9000"], 2, "unknown arch"),
        (["train", "--data", "{data}", "--device", "cuda:7"], 2, "--device"),
        (["train"], 2, "--data NAME is required"),
        (["finetune", "missing.safetensors", "--data", "{data}"], 1, "missing.safetensors"),
        (["train", "--data", "{data}", "--arch", "s3d", "--frames", "4", "--size", "16"], 2,
         "s3d cannot take 4-frame 16x16 clips"),  # its pools shrink the clip to nothing: refused before any data loads
    ],
)
def test_bad_input_one_line(ws, tiny_synthetic, args, code, needle) -> None:
    if torch.cuda.device_count() > 7 and "cuda:7" in args:
        pytest.skip("machine has 8 GPUs")
    args = [a.replace("{data}", str(tiny_synthetic)) for a in args]
    res = runner.invoke(app, ["--workspace", str(ws.root), *args])
    assert res.exit_code == code, res.output
    assert needle in res.output and "Traceback" not in res.output
    assert not ws.runs_dir.is_dir() or not any(ws.runs_dir.iterdir()), "a failed command left a run folder"


def test_class_mismatch_names_both(ws, tiny_synthetic) -> None:
    model, meta = _tiny(classes=3)
    path = ws.root / "three.safetensors"
    save_model(path, model, meta)
    res = runner.invoke(app, ["--workspace", str(ws.root), "finetune", str(path), "--data", str(tiny_synthetic), "--epochs", "1"])
    assert res.exit_code == 1
    line = res.output.strip().splitlines()[-1]
    assert "class mismatch" in line and "3 classes" in line and "4" in line and "tiny" in line


def test_name_clash_is_refused(ws, tiny_synthetic) -> None:
    run = ws.run_dir("taken", create=True)
    (run / "model.safetensors").write_text("x")
    res = runner.invoke(app, ["--workspace", str(ws.root), "train", "--data", str(tiny_synthetic), "--name", "taken"])
    assert res.exit_code == 2 and "--resume taken" in res.output


# ---------------------------------------------------------------- distributed (gloo, 2 processes)


def test_torchrun_gloo_two_ranks_agree(ws, tiny_synthetic, tmp_path) -> None:
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not installed")
    hashes = tmp_path / "hashes"
    env = {**os.environ, "VCC_HOME": str(ws.root), "VCC_WEIGHTS_HASH_DIR": str(hashes), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "vcc", "train", "--data", str(tiny_synthetic),
                           "--name", "ddp", *FAST, "-f", "json"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)  # rank 0 alone printed the result
    r0, r1 = (hashes / "rank0.sha256").read_text(), (hashes / "rank1.sha256").read_text()
    assert r0 == r1
    model, _ = load_model(doc["last"])
    assert weights_sha256(model) == r0.strip()
    assert doc["history"][0]["epoch"] == 1


@pytest.mark.parametrize("opt", ["--epochs", "--frames", "--size"])
def test_zero_is_refused_not_taken_for_the_default(ws, tiny_synthetic, opt) -> None:
    """`--epochs 0` (a smoke-test variable) used to launch the default 20-epoch run."""
    proc = run_vcc("-w", str(ws.root), "train", "--data", str(tiny_synthetic), opt, "0", "--name", "z")
    assert proc.returncode == 2 and opt in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not ws.run_dir("z").exists()


@pytest.mark.parametrize(("args", "needle"), [
    (["--kd", "ce"], "--kd set early-exit training and need --exits"),
    (["--teachers", "a,b", "--kd-epochs", "1,1,1"], "--teachers, --kd-epochs set early-exit training and need --exits"),
    (["--exits", ""], "--exits needs auto or a comma list of stages"),
    (["--exits", "auto", "--kd-epochs", "1,1,1", "--epochs", "5"], "--kd-epochs 1,1,1 trains 3 epochs but --epochs is 5"),
])
def test_exit_training_options_that_would_be_ignored_are_errors(ws, tiny_synthetic, tiny_model, args, needle) -> None:
    proc = run_vcc("-w", str(ws.root), "train", "--data", str(tiny_synthetic), "--init", str(tiny_model), *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert not ws.runs_dir.exists() or not any(ws.runs_dir.iterdir())  # nothing written


def test_exits_option_delegates_and_eval_threshold(ws, tiny_synthetic, tiny_model) -> None:
    """`vcc train --exits` builds a multi-exit artefact (vcc.core.exits); `vcc eval --threshold` runs it."""
    res = _cli(ws, "train", "--data", str(tiny_synthetic), "--init", str(tiny_model), "--exits", "auto", "--kd", "ce",
               "--name", "ee", *FAST, "--max-batches", "1", "-f", "json")
    doc = json.loads(res.stdout)
    _, meta = load_model(doc["model"])
    assert any(w["name"] == "exits" for w in meta.wrappers) and meta.frames == 8
    # the result is the last epoch (progressive KD: the loss grows as stronger teachers take over, so
    # the lowest-loss epoch is an early one): best, model and last are one file, and the summary says so
    pkd = ["train", "--data", str(tiny_synthetic), "--init", str(tiny_model), "--exits", "auto", "--kd", "progressive",
           *FAST, "--epochs", "3", "--max-batches", "1"]
    doc = json.loads(_cli(ws, *pkd, "--name", "ee2", "-f", "json").stdout)
    assert doc["selected_on"] == "last" and doc["best_epoch"] == doc["epochs"] == 3
    assert Path(doc["best"]).read_bytes() == Path(doc["model"]).read_bytes() == Path(doc["last"]).read_bytes()
    table = " ".join(_cli(ws, *pkd, "--name", "ee3").stdout.split())
    assert "model: the last epoch (3)" in table and "lowest train loss" not in table and "val video top-1 % per exit" in table
    out = _cli(ws, "eval", "ee", "--data", str(tiny_synthetic), "--threshold", "0.5", "--clips", "1", "-f", "json")
    ev = json.loads(out.stdout)
    assert 0.0 <= ev["accuracy"] <= 1.0 and ev["videos"] == 8
    # the table follows plain eval's conventions: % accuracies, exact integer MACs, one row per exit
    csv_text = _cli(ws, "eval", "ee", "--data", str(tiny_synthetic), "--threshold", "0.5", "--clips", "1", "-f", "csv").stdout
    rows = dict(line.split(",", 1) for line in csv_text.split("\n\n")[0].splitlines()[1:])
    assert float(rows["video top1"]) == round(100 * ev["accuracy"], 2)
    assert rows["MACs at the last exit"] == str(ev["macs_full"]) and "e+" not in csv_text
    assert csv_text.split("\n\n")[1].splitlines()[0] == "exit,stage,cumulative MACs,clips leaving %"


@pytest.mark.slow
def test_compile_trains_and_saves_plain_weights(ws, tiny_synthetic) -> None:
    """--compile on CPU (inductor, needs a C compiler): the artefact holds the plain module's weights."""
    proc = run_vcc("train", "--data", str(tiny_synthetic), "--name", "c1", *FAST, "--compile", "--format", "json", check=True)
    doc = json.loads(proc.stdout)
    state = _state(Path(doc["model"]))
    assert state and not any(k.startswith("_orig_mod.") for k in state)
    run_vcc("eval", doc["model"], "--data", str(tiny_synthetic), "--device", "cpu", "-f", "json", check=True)
