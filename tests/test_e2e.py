"""The whole pipeline driven through the real CLI (subprocesses, real encoded videos), on CPU.

prepare -> train -> macs -> rank -> prune -> finetune -> port -> eval; VIB on a CNN-LSTM and
its port; early exits -> WISE -> early-exit eval. Tiny sizes and 1 epoch: this checks that
the commands fit together and that their JSON is what reports rely on, not accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_vcc


def vcc_json(ws: Path, *args: str) -> dict:
    """Run `vcc -w WS ARGS --format json`; stdout must be exactly one JSON document."""
    proc = run_vcc("-w", str(ws), *args, "--format", "json")
    assert proc.returncode == 0, f"vcc {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout)


def test_pipeline_through_the_cli(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    prep = vcc_json(ws, "prepare", "synthetic", "--name", "syn", "--classes", "3", "--videos-per-class", "4",
                    "--frames", "16", "--size", "32")
    assert prep["name"] == "syn" and len(prep["classes"]) == 3 and prep["skipped"] == []
    assert prep["counts"]["train"] + prep["counts"]["test"] == 12

    train = vcc_json(ws, "train", "--data", "syn", "--name", "base", "--epochs", "1", "--device", "cpu",
                     "--workers", "0", "--batch-size", "4")
    assert Path(train["model"]).is_file()
    assert (ws / "runs" / "base" / "metrics.jsonl").is_file()

    macs = vcc_json(ws, "macs", "base")
    assert macs["input"] == [3, 8, 32, 32] and macs["macs"] > 0 and macs["uncounted"] == []

    ranking = vcc_json(ws, "rank", "base", "--data", "syn", "--method", "taylor", "--batches", "2", "--device", "cpu")
    ranking_file = ranking["files"]["ranking"]
    assert Path(ranking_file).is_file()

    pruned = vcc_json(ws, "prune", "base", "--method", "taylor", "--target-macs", "0.5", "--ranking", ranking_file,
                      "--name", "pruned", "--device", "cpu", "--latency-runs", "2")
    assert pruned["after"]["macs"] <= 0.55 * pruned["before"]["macs"]
    assert pruned["after"]["params"] < pruned["before"]["params"]

    vcc_json(ws, "finetune", "pruned", "--data", "syn", "--name", "pruned-ft", "--epochs", "1", "--device", "cpu",
             "--batch-size", "4")
    port = vcc_json(ws, "port", "pruned-ft", "--name", "pruned-dense", "--latency-runs", "2")
    assert port["changed"] is False  # physically pruned already: ports to an equal artefact

    # no --data: the dataset recorded in the artefact, handed down base -> pruned -> pruned-ft -> pruned-dense
    ev = vcc_json(ws, "eval", "pruned-dense", "--clips", "2", "--device", "cpu")
    assert ev["dataset"] == "syn"
    for key in ("clip_top1", "clip_top5", "video_top1", "video_top5", "latency_ms", "clips_per_s"):
        assert key in ev
    assert 0.0 <= ev["video_top1"] <= 1.0 and ev["videos"] == prep["counts"]["test"]
    assert ev["clips"] == 2 * ev["videos"]

    # VIB on a CNN-LSTM, then its dense port.
    proc = run_vcc("-w", str(ws), "train", "--data", "syn", "--arch", "cnn_lstm", "--option", "backbone=tiny",
                   "--name", "lstm", "--epochs", "1", "--device", "cpu", "--workers", "0", "--batch-size", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    vib = vcc_json(ws, "prune", "lstm", "--method", "vib", "--data", "syn", "--epochs", "1", "--name", "lstm-vib",
                   "--device", "cpu", "--workers", "0")
    assert Path(ws / "runs" / "lstm-vib" / "model.safetensors").is_file()
    assert vib["lstm_params_before"] >= vib["lstm_params_after"]
    dense = vcc_json(ws, "port", "lstm-vib", "--name", "lstm-dense", "--latency-runs", "2")
    assert dense["max_abs_diff"] <= 1e-4

    # Early exits on the trained backbone, WISE, and an early-exit eval.
    proc = run_vcc("-w", str(ws), "train", "--init", "base", "--exits", "auto", "--kd", "progressive",
                   "--name", "exits", "--epochs", "1", "--device", "cpu", "--workers", "0", "--batch-size", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    exit_macs = vcc_json(ws, "macs", "exits")
    cum = [e["macs"] for e in exit_macs["exits"]]
    assert cum == sorted(cum) and len(cum) >= 2
    wise = vcc_json(ws, "wise", "exits", "--iters", "20", "--thresholds", "0:1.1:3", "--device", "cpu")
    assert set(wise["methods"]) >= {"wise", "vanilla", "constant"}
    assert [r["threshold"] for r in wise["methods"]["wise"]] == pytest.approx([0.0, 0.55, 1.1])
    assert wise["methods"]["wise"][-1]["macs"] >= wise["methods"]["wise"][0]["macs"]
    early = vcc_json(ws, "eval", "exits", "--data", "syn", "--threshold", "0.5", "--clips", "1", "--device", "cpu")
    assert 0.0 <= early.get("video_top1", early.get("accuracy", 0.0)) <= 1.0

    # Every model artefact written above is in the workspace and loads through `vcc macs`.
    runs = sorted(p.name for p in (ws / "runs").iterdir())
    for name in ("base", "pruned", "pruned-ft", "pruned-dense", "lstm", "lstm-vib", "lstm-dense", "exits"):
        assert name in runs


def test_demo_quick_runs_the_whole_job(tmp_path: Path) -> None:
    """`vcc demo --quick`: every stage produces a row and leaves a loadable artefact."""
    ws = tmp_path / "ws"
    doc = vcc_json(ws, "demo", "--quick")
    stages = [r["stage"] for r in doc["rows"]]
    assert stages[:4] == ["trained r3d_tiny", "pruned (taylor, 50% MACs)", "finetuned", "ported (dense)"]
    assert any("VIB" in s for s in stages) and any("WISE" in s for s in stages)
    rows = {r["stage"]: r for r in doc["rows"]}
    assert rows["pruned (taylor, 50% MACs)"]["macs"] <= 0.55 * rows["trained r3d_tiny"]["macs"]
    for r in doc["rows"]:  # every model row is timed (side by side), the WISE row is a sweep
        assert ("WISE" in r["stage"]) == (r["latency_ms"] is None), r
        assert "WISE" in r["stage"] or r["latency_threads"] >= 1
    for path in doc["runs"].values():
        assert Path(path).is_file()
    macs = vcc_json(ws, "macs", "demo-ported")
    assert macs["macs"] == rows["ported (dense)"]["macs"]
