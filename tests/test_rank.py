"""Channel rankings (l1, l2, taylor, oracle), the ranking artefact, and sensitivity analysis."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vcc.cli import app
from vcc.core.artefact import load_model, load_tensors

runner = CliRunner()


def test_weight_norm_scores_are_filter_norms(tiny_model: Path) -> None:
    from vcc.core.compress.rank import rank

    model, meta = load_model(tiny_model)
    l1 = rank(model, meta, "l1")
    l2 = rank(model, meta, "l2")
    assert "fc" not in l1  # the classifier is never ranked
    assert {"conv1", "layer1.0.conv1", "layer4.0.downsample.0"} <= set(l1)
    w = model.layer2[0].conv1.weight.detach()
    assert torch.allclose(l1["layer2.0.conv1"], w.abs().sum(dim=(1, 2, 3, 4)))
    assert torch.allclose(l2["layer2.0.conv1"], w.pow(2).sum(dim=(1, 2, 3, 4)).sqrt())


def test_taylor_and_oracle_follow_their_definitions(tiny_model: Path, tiny_synthetic: Path) -> None:
    from vcc.core.compress.rank import rank

    model, meta = load_model(tiny_model)
    taylor = rank(model, meta, "taylor", data=tiny_synthetic, batches=2, batch_size=4)
    oracle = rank(model, meta, "oracle", data=tiny_synthetic, batches=2, batch_size=4)
    for name, s in taylor.items():
        assert s.shape == (dict(model.named_modules())[name].out_channels,)
        assert float(s.norm()) == pytest.approx(1.0, abs=1e-4)  # L2-normalised per layer
        assert torch.all(s >= 0)
    nonzero = [s for s in oracle.values() if float(s.max()) > 0]
    assert nonzero, "some channel must have a positive first-order contribution"
    for s in oracle.values():
        assert torch.all(s >= 0) and float(s.max()) <= 1.0 + 1e-6  # clipped at 0, divided by the layer max
    for s in nonzero:
        assert float(s.max()) == pytest.approx(1.0, abs=1e-5)
    # the gradients are real: Taylor scores are not a permutation of the weight norms
    assert not torch.equal(torch.argsort(taylor["layer3.0.conv1"]), torch.argsort(rank(model, meta, "l1")["layer3.0.conv1"]))


def test_rank_needs_data_for_taylor(tiny_model: Path, ws) -> None:
    res = runner.invoke(app, ["rank", str(tiny_model), "--method", "taylor"])
    assert res.exit_code == 2 and "--data is required" in res.output and "does not record the dataset" in res.output
    res = runner.invoke(app, ["rank", str(tiny_model), "--method", "l3"])
    assert res.exit_code == 2 and "--method must be one of" in res.output


def test_cli_rank_artefact_feeds_prune(ws, tiny_model: Path) -> None:
    res = runner.invoke(app, ["rank", str(tiny_model), "--method", "l1", "--name", "r", "--format", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    path = Path(doc["files"]["ranking"])
    assert path == ws.runs_dir / "r" / "ranking-l1.safetensors"
    tensors, meta = load_tensors(path, expect_format="vcc-ranking")
    assert meta["method"] == "l1" and meta["model_sha256"]
    assert {r["layer"] for r in doc["layers"]} == set(tensors)
    row = next(r for r in doc["layers"] if r["layer"] == "layer1.0.conv1")
    assert row["channels"] == 16 and row["min"] <= row["median"] <= row["max"]
    res = runner.invoke(app, ["prune", "--latency-runs", "2", str(tiny_model), "--method", "l1", "--ratio", "0.25", "--scope", "layer",
                              "--ranking", str(path), "--name", "from-ranking", "--format", "json"])
    assert res.exit_code == 0, res.output
    model, _ = load_model(ws.runs_dir / "from-ranking" / "model.safetensors")
    assert model.layer1[0].conv1.out_channels == 12
    # a ranking made with one method is refused for another
    res = runner.invoke(app, ["prune", "--latency-runs", "2", str(tiny_model), "--method", "l2", "--ratio", "0.25", "--ranking", str(path), "--name", "x"])
    assert res.exit_code == 2 and "made with --method l1" in res.output


def test_prune_takes_a_rank_run_by_name_and_its_method(ws, tiny_model: Path) -> None:
    """`vcc prune --ranking RUN` finds the run's ranking file and, without --method, prunes with its method."""
    assert runner.invoke(app, ["rank", str(tiny_model), "--method", "l2", "--name", "r"]).exit_code == 0
    res = runner.invoke(app, ["prune", "--latency-runs", "2", str(tiny_model), "--ranking", "r", "--ratio", "0.25",
                              "--scope", "layer", "--name", "byname", "--format", "json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["method"] == "l2"
    model, _ = load_model(ws.runs_dir / "byname" / "model.safetensors")
    assert model.layer1[0].conv1.out_channels == 12
    # a second ranking in the run: the bare name is ambiguous, RUN:METHOD picks one
    assert runner.invoke(app, ["rank", str(tiny_model), "--method", "l1", "--out", str(ws.runs_dir / "r" / "ranking-l1.safetensors")]).exit_code == 0
    for spec, code, needle in [("r", 1, "holds rankings l1, l2: say which, e.g. r:l1"), ("r:oracle", 1, "holds no 'oracle' ranking"),
                               ("byname", 1, "run 'byname' holds no ranking"), ("ghost", 1, "neither a file nor a run")]:
        res = runner.invoke(app, ["prune", str(tiny_model), "--ranking", spec, "--ratio", "0.25", "--name", "never"])
        assert res.exit_code == code and needle in res.output, (spec, res.output)
    assert not (ws.runs_dir / "never").exists()
    res = runner.invoke(app, ["prune", "--latency-runs", "2", str(tiny_model), "--ranking", "r:l1", "--ratio", "0.25", "--name", "picked",
                              "--format", "json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["method"] == "l1", res.output


def test_default_run_names_say_which_model(ws, tiny_model: Path) -> None:
    """Without --name, rank/prune/port runs are named after the model (a run's name, else the
    file's stem) and the method, numbered when taken."""
    names = []
    for _ in range(2):
        res = runner.invoke(app, ["rank", str(tiny_model), "--method", "l1", "--format", "json"])
        assert res.exit_code == 0, res.output
        names.append(Path(json.loads(res.stdout)["files"]["ranking"]).parent.name)
    assert names == ["rank-tiny_model-l1", "rank-tiny_model-l1-2"]
    res = runner.invoke(app, ["prune", "--latency-runs", "1", str(tiny_model), "--method", "l1", "--ratio", "0.25", "--format", "json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["run"] == "prune-tiny_model-l1"
    assert ws.model_stem(ws.runs_dir / "prune-tiny_model-l1" / "model.safetensors") == "prune-tiny_model-l1"
    assert ws.model_stem(Path("/x/My Model (v2).safetensors")) == "My-Model--v2"


def test_cli_sensitivity_writes_csv_png_and_table(ws, tiny_model: Path, tiny_synthetic: Path) -> None:
    res = runner.invoke(app, ["rank", str(tiny_model), "--data", str(tiny_synthetic), "--method", "l1", "--sensitivity",
                              "--ratios", "0.5", "--ignore", "layer[234].*", "--name", "sens", "--format", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    csv_path, png = Path(doc["files"]["csv"]), Path(doc["files"]["png"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(csv_path.open()))
    assert {r["ratio"] for r in rows} == {"0.0", "0.5"}
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    assert layers == ["conv1", "layer1.0.conv1"]  # the groups not touching the ignored stages, in network order
    half = [r for r in rows if r["ratio"] == "0.5"]
    base_macs = int(rows[0]["macs"])
    assert all(int(r["macs"]) < base_macs for r in half)  # every row really pruned something
    assert len(doc["sensitivity"]) == len(rows)


def test_sensitivity_lists_groups_in_network_order(tiny_model: Path, tiny_synthetic: Path) -> None:
    """The dependency graph finds residual groups first (layer4's before the stem); the table and
    the plot's legend follow the network instead, each group at its first conv."""
    from vcc.core.compress.prune import Surgeon, clone, example_input
    from vcc.core.compress.rank import rank
    from vcc.core.compress.sensitivity import sensitivity

    model, meta = load_model(tiny_model)
    rows = sensitivity(model, meta, tiny_synthetic, rank(model, meta, "l1"), [0.5])
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    groups = {g.root: g for g in Surgeon(clone(model), example_input(meta)).groups}
    assert set(layers) == set(groups) and len(rows) == 2 * len(groups)
    pos = {n: i for i, (n, _) in enumerate(model.named_modules())}
    first = [min(pos[n] for n in [root, *groups[root].members]) for root in layers]
    assert first == sorted(first)
    assert layers[0] == "conv1"
