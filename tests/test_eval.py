"""Evaluation: aggregation maths, `vcc eval` JSON/CSV, crops and clips, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import run_vcc
from vcc.cli import app
from vcc.core.artefact import ModelMeta, input_spec, load_model, save_model
from vcc.core.data.manifest import load_dataset
from vcc.core.evaluate import (
    add_paired_latency,
    confusion_matrix,
    measure_latency,
    topk_accuracy,
    video_accuracy,
    video_scores,
)
from vcc.core.models import build_model

runner = CliRunner()
KEYS = {"clip_top1", "clip_top5", "video_top1", "video_top5", "videos", "clips", "latency_ms", "clips_per_s"}


def test_video_score_is_mean_of_clip_softmax() -> None:
    # video 0: clips disagree, the confident clip wins on mean softmax; video 1: one clip only
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.3, 0.1], [0.0, 0.0, 2.0]])
    labels = torch.tensor([0, 0, 2])
    vidx = torch.tensor([7, 7, 3])
    scores, vlabels, vids = video_scores(logits, labels, vidx)
    assert vids.tolist() == [3, 7] and vlabels.tolist() == [2, 0]
    expect = (torch.softmax(logits[0], 0) + torch.softmax(logits[1], 0)) / 2
    assert torch.allclose(scores[1], expect)
    acc = video_accuracy(logits, labels, vidx, topk=(1, 2))
    assert acc["clip_top1"] == pytest.approx(2 / 3) and acc["video_top1"] == 1.0
    assert acc["clip_top2"] == pytest.approx(2 / 3)  # clip 1's top-2 is {1, 2}: misses label 0
    assert topk_accuracy(torch.eye(3), torch.tensor([0, 1, 0]), 1) == pytest.approx(2 / 3)
    assert topk_accuracy(torch.eye(3), torch.tensor([0, 1, 0]), 5) == 1.0  # k capped at C


def test_confusion_rows_are_true_class() -> None:
    cm = confusion_matrix(torch.tensor([1, 1, 0, 2]), torch.tensor([0, 1, 0, 2]), 3)
    assert cm == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]


def test_measure_latency_positive() -> None:
    model = build_model("r3d_tiny", num_classes=4)
    meta = ModelMeta(arch="r3d_tiny", num_classes=4, input=input_spec(8, 32))
    ms = measure_latency(model, meta, "cpu", batch=1, warmup=1, runs=3)
    assert 0 < ms < 10_000 and model.training  # mode restored


def test_paired_latency_times_each_model_in_its_row() -> None:
    model = build_model("r3d_tiny", num_classes=4).train()
    small = ModelMeta(arch="r3d_tiny", num_classes=4, classes=["a", "b", "c", "d"], input=input_spec(8, 32))
    large = ModelMeta(arch="r3d_tiny", num_classes=4, classes=["a", "b", "c", "d"], input=input_spec(16, 96))  # 18x the MACs
    fast, slow = {"macs": 1}, {"macs": 18}
    add_paired_latency([(slow, model, large), (fast, model, small)], runs=5)
    # in order, each its own row's; a wide margin, so that other jobs on the cores (one run under
    # load read 232 vs 155 ms for 9x the MACs) cannot swap them
    assert slow["latency_ms"] > 1.5 * fast["latency_ms"] > 0
    assert slow["latency_threads"] == fast["latency_threads"] == torch.get_num_threads()
    assert model.training  # its mode is restored


def test_inference_form_folds_batchnorm_and_keeps_outputs() -> None:
    from vcc.core.evaluate import inference_form

    torch.manual_seed(0)
    model = build_model("r3d_tiny", num_classes=4).eval()
    for m in model.modules():  # non-trivial BN statistics, so a wrong fold would show
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 3, 8, 32, 32)
    folded = inference_form(model, x, script=False)  # modules to look into (a frozen trace has none)
    assert folded is not model
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in folded.modules())
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules())  # the original is untouched


def test_eval_cli_json(ws, tiny_synthetic, tiny_model) -> None:
    proc = run_vcc("eval", str(tiny_model), "--data", str(tiny_synthetic), "--clips", "2", "--device", "cpu", "-f", "json", check=True)
    doc = json.loads(proc.stdout)
    assert KEYS <= doc.keys()
    assert doc["videos"] == 8 and doc["clips"] == 16
    for k in ("clip_top1", "clip_top5", "video_top1", "video_top5"):
        assert 0.0 <= doc[k] <= 1.0
    assert doc["video_top5"] == 1.0  # 4 classes: top-5 always hits
    assert doc["latency_ms"] > 0 and doc["clips_per_s"] > 0
    assert doc["latency_busy_cores"] >= 0  # measured (Linux), not left out
    assert set(doc["per_class"]) == {"up", "down", "sideways", "still"}
    assert sum(map(sum, doc["confusion"])) == 8
    # video top-1 is the confusion matrix diagonal's share, exactly (a fraction in double, not float32)
    assert doc["video_top1"] == sum(doc["confusion"][i][i] for i in range(4)) / 8
    ds = load_dataset(tiny_synthetic).name
    assert Path(doc["confusion_csv"]) == tiny_model.parent / f"tiny_model.confusion-{ds}-test.csv"
    csv = Path(doc["confusion_csv"]).read_text().splitlines()
    assert csv[0].split(",")[1:] == ["up", "down", "sideways", "still"] and len(csv) == 5
    assert doc["latency_threads"] >= 1
    # the global --threads reaches torch (set before it is imported) and is reported with the latency
    train = json.loads(run_vcc("--threads", "1", "eval", str(tiny_model), "--data", str(tiny_synthetic), "--split", "train", "--clips", "1",
                               "--device", "cpu", "-f", "json", check=True).stdout)
    assert train["latency_threads"] == 1
    assert Path(train["confusion_csv"]).name == f"tiny_model.confusion-{ds}-train.csv"
    assert Path(doc["confusion_csv"]).read_text().splitlines() == csv  # the test split's file is kept
    assert "Traceback" not in proc.stderr


def test_eval_confusion_falls_back_to_workspace(ws, tiny_synthetic, tiny_model, tmp_path) -> None:
    """Where the model's folder refuses the confusion CSV, it goes to the workspace; the results survive."""
    import shutil

    model = tmp_path / "shared" / "m.safetensors"
    model.parent.mkdir()
    shutil.copy(tiny_model, model)
    tag = f"confusion-{load_dataset(tiny_synthetic).name}-test.csv"
    (model.parent / f"m.{tag}").mkdir()  # the CSV's name is taken by a folder: the write fails
    proc = run_vcc("eval", str(model), "--data", str(tiny_synthetic), "--clips", "1", "--device", "cpu", "-f", "json", check=True)
    doc = json.loads(proc.stdout)
    assert Path(doc["confusion_csv"]) == ws.root / "evals" / f"shared.m.{tag}"  # the folder's name too: no clash
    assert Path(doc["confusion_csv"]).read_text().startswith("true\\pred,up,down")
    assert sorted(f.name for f in model.parent.iterdir()) == [f"m.{tag}", "m.safetensors"]  # no temp files left
    # neither place writable (a read-only model store and workspace): the results still print, with a warning
    shutil.rmtree(ws.root / "evals")
    (ws.root / "evals").write_text("not a folder")
    proc = run_vcc("eval", str(model), "--data", str(tiny_synthetic), "--clips", "1", "--device", "cpu", "-f", "json")
    assert proc.returncode == 0, proc.stderr
    doc2 = json.loads(proc.stdout)
    assert doc2["confusion_csv"] is None and doc2["video_top1"] == doc["video_top1"]
    assert "warning: confusion matrix not saved" in proc.stderr


def test_eval_three_crops_matches_manual_aggregation(tiny_synthetic, tiny_model) -> None:
    """3 crops x 2 clips per video; the video score equals the hand-made mean of clip softmax."""
    from vcc.core.data.loader import make_loader
    from vcc.core.data.manifest import load_dataset
    from vcc.core.evaluate import evaluate

    info = load_dataset(tiny_synthetic)
    model, meta = load_model(tiny_model)
    out = evaluate(model, meta, info, split="test", clips=2, crops=3, batch_size=8, device="cpu", latency_runs=2)
    assert out["clips"] == 8 * 6 and out["videos"] == 8
    loader = make_loader(info, "test", train=False, frames=meta.frames, size=meta.size, batch_size=5, clips=2, crops=3)
    probs: dict[int, list[torch.Tensor]] = {}
    labels: dict[int, int] = {}
    with torch.no_grad():
        for x, y, v in loader:
            x = (x.float() / 255 - torch.tensor(meta.mean).view(1, 3, 1, 1, 1)) / torch.tensor(meta.std).view(1, 3, 1, 1, 1)
            for p, yy, vv in zip(torch.softmax(model(x), 1), y.tolist(), v.tolist(), strict=True):
                probs.setdefault(vv, []).append(p)
                labels[vv] = yy
    assert all(len(p) == 6 for p in probs.values())
    manual = sum(int(torch.stack(p).mean(0).argmax() == labels[v]) for v, p in probs.items()) / len(probs)
    assert out["video_top1"] == pytest.approx(manual)


def test_evaluate_without_latency_and_summary_row(tiny_synthetic, tiny_model) -> None:
    """latency_runs=0 skips timing (accuracy only); summarise_model times the model once itself."""
    from vcc.core.data.manifest import load_dataset
    from vcc.core.evaluate import evaluate, summarise_model

    info = load_dataset(tiny_synthetic)
    model, meta = load_model(tiny_model)
    timed = evaluate(model, meta, info, clips=1, device="cpu", latency_runs=1)
    untimed = evaluate(model, meta, info, clips=1, device="cpu", latency_runs=0)
    assert untimed["latency_ms"] is None and timed["latency_ms"] > 0
    assert {k: untimed[k] for k in ("video_top1", "clip_top1", "confusion")} == {k: timed[k] for k in ("video_top1", "clip_top1", "confusion")}
    row = summarise_model(model, meta, info, clips=1, latency_runs=2)
    assert row["latency_ms"] > 0 and row["video_top1"] == timed["video_top1"] and row["macs"] > 0


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["eval", "{model}", "--data", "nope"], 1, "dataset 'nope' not found"),
        (["eval", "ghost-run", "--data", "{data}"], 1, "ghost-run"),
        (["eval", "{model}", "--data", "{data}", "--crops", "2"], 2, "--crops must be 1 or 3"),
        (["eval", "{model}", "--data", "{data}", "--clips", "0"], 2, "--clips and --batch-size must be >= 1"),
        (["eval", "{model}", "--data", "{data}", "--split", "val"], 1, "'val'"),
        (["eval", "{model}", "--data", "{data}", "--threshold", "0.5"], 2, "multi-exit"),
        # a folder of raw videos for --data; a folder without a model for MODEL
        (["eval", "{model}", "--data", "{data}/videos"], 1, "/videos is a folder but not a prepared dataset (no dataset.json): "
                                                           "prepare it first with `vcc prepare folder --root"),
        (["eval", "{data}", "--data", "{data}"], 1, "is a folder without a model.safetensors (give a .safetensors file or a run)"),
    ],
)
def test_eval_bad_input(ws, tiny_synthetic, tiny_model, args, code, needle) -> None:
    args = [a.replace("{data}", str(tiny_synthetic)).replace("{model}", str(tiny_model)) for a in args]
    res = runner.invoke(app, ["--workspace", str(ws.root), *args])
    assert res.exit_code == code, res.output
    assert needle in res.output and "Traceback" not in res.output


def test_eval_class_mismatch(ws, tiny_synthetic) -> None:
    model = build_model("r3d_tiny", num_classes=4)
    meta = ModelMeta(arch="r3d_tiny", num_classes=4, classes=["a", "b", "c", "d"], input=input_spec(8, 32))
    path = ws.root / "abcd.safetensors"
    save_model(path, model, meta)
    res = runner.invoke(app, ["--workspace", str(ws.root), "eval", str(path), "--data", str(tiny_synthetic)])
    assert res.exit_code == 1
    assert "class mismatch" in res.output and "abcd.safetensors" in res.output and "'tiny'" in res.output


def test_median_ms_times_small_models_for_at_least_min_s() -> None:
    """Ten 1-ms forwards are too few to time a small model on a busy machine: min_s adds runs."""
    import time as _time

    from vcc.core.evaluate import median_ms

    calls = []

    def fn(_x: torch.Tensor) -> None:
        calls.append(1)
        _time.sleep(0.002)

    x = torch.zeros(1)
    median_ms(fn, x, warmup=2, runs=3)
    assert len(calls) == 5
    calls.clear()
    ms = median_ms(fn, x, warmup=2, runs=3, min_s=0.1)
    assert 2 + 0.1 / 0.004 <= len(calls) <= 2 + 0.1 / 0.002 + 1 and ms >= 2.0
    calls.clear()
    median_ms(fn, x, warmup=0, runs=1, min_s=10.0, most=7)
    assert len(calls) == 7  # `most` caps it


def test_eval_without_data_names_a_file_that_is_no_model_first(ws, tmp_path: Path) -> None:
    # the model is read before any dataset is looked for: a video given as the model gets the
    # artefact error and its hint, not "--data is required"
    import shutil

    from tests.conftest import SHARED_VIDEOS

    video = tmp_path / "clip.avi"
    shutil.copy(SHARED_VIDEOS / "test.avi", video)
    res = runner.invoke(app, ["eval", str(video)])
    assert res.exit_code == 1 and "it is a video" in res.output and "--data is required" not in res.output


def test_cpu_contention_counts_other_processes_not_this_one() -> None:
    """What flags a latency timed on a busy machine: another process's spinning counts, this
    process's own work (the timing itself) does not."""
    import subprocess
    import sys
    import time

    from vcc.core.sysinfo import CpuContention

    spin = "import time\nt = time.time()\nwhile time.time() - t < 4: pass\n"
    spinner = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.5)  # it is spinning
        with CpuContention() as other:
            time.sleep(1.0)  # idle here, one core busy there
    finally:
        spinner.kill()
        spinner.wait()
    assert other.others is not None and other.others > 0.6
    with CpuContention() as own:
        t = time.perf_counter()
        while time.perf_counter() - t < 0.6:  # busy here, alone
            pass
    assert own.others is not None and own.others < 0.4


def test_busy_note_names_the_worst_timing() -> None:
    from vcc.core.report import busy_note

    assert busy_note({"latency_ms": 1.0}) is None  # nothing measured, nothing said
    assert busy_note({"before": {"latency_busy_cores": 0.1}, "after": {"latency_busy_cores": 0.2}}) is None
    note = busy_note({"rows": [{"latency_busy_cores": 0.1}, {"latency_busy_cores": 1.3}]})
    assert note is not None and "kept 1.3 of" in note and "quiet machine" in note


def test_eval_says_when_the_machine_was_busy(ws, tiny_synthetic, tiny_model) -> None:
    """Under competing load the latency row gets a note (a warning on stderr for -f json)."""
    import subprocess
    import sys

    spin = "import time\nt = time.time()\nwhile time.time() - t < 60: pass\n"
    spinners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(2)]
    try:
        table = run_vcc("eval", str(tiny_model), "--data", str(tiny_synthetic), "--clips", "1", "--device", "cpu", check=True)
        js = run_vcc("eval", str(tiny_model), "--data", str(tiny_synthetic), "--clips", "1", "--device", "cpu", "-f", "json",
                     check=True)
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    assert "CPU cores busy while the latencies were timed" in table.stdout
    assert json.loads(js.stdout)["latency_busy_cores"] > 0.5
    assert "warning: other processes kept" in js.stderr
