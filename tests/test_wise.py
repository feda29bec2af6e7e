"""WISE: weight fitting (clipping, L1), threshold semantics, sweeps, and the `vcc wise` CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from tests.conftest import run_vcc
from vcc.cli import app
from vcc.core.errors import UsageError
from vcc.core.wise import (
    combine,
    constant_weights,
    exit_decisions,
    fit_wise,
    parse_thresholds,
    sweep,
    vanilla_weights,
)


def _logits(n: int = 300, classes: int = 5, signal: tuple[float, ...] = (0.5, 1.0, 2.0), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Exit logits whose label signal grows with depth (later exits are better)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    outs = []
    for s in signal:
        x = torch.randn(n, classes, generator=g)
        x[torch.arange(n), y] += s
        outs.append(x)
    return torch.stack(outs), y


def test_parse_thresholds_is_linspace() -> None:
    assert parse_thresholds("0:1.1:12") == pytest.approx(np.linspace(0, 1.1, 12).tolist())
    assert parse_thresholds("0.5:0.9:1") == [0.5]
    assert parse_thresholds("0.2, 0.9") == [0.2, 0.9]
    for bad in ("0:1", "a:b:c", "0:1:0", ""):
        with pytest.raises(UsageError):
            parse_thresholds(bad)


def test_fit_wise_is_lower_triangular_nonnegative_and_beats_constant() -> None:
    logits, y = _logits()
    beta = fit_wise(logits, y, lam=1e-3, iters=200, lr=0.05)
    assert beta.shape == (3, 3)
    assert torch.all(beta >= 0) and torch.all(torch.triu(beta, 1) == 0)

    def ce(w: torch.Tensor) -> float:
        out = combine(logits, w)
        return float(sum(F.cross_entropy(out[k], y) for k in range(3)))

    assert ce(beta) < ce(constant_weights(3)) - 0.05
    assert ce(beta) < ce(vanilla_weights(3))


def test_fit_wise_clips_harmful_exits_to_exactly_zero() -> None:
    logits, y = _logits(signal=(2.0, 2.0))
    logits[0] = -logits[0]  # exit 1 points away from the label: its weight wants to be negative
    beta = fit_wise(logits, y, lam=0.0, iters=200, lr=0.05)
    assert beta[0, 0] == 0.0 and beta[1, 0] == 0.0
    assert beta[1, 1] > 0.5


def test_fit_wise_l1_shrinks_weights() -> None:
    logits, y = _logits()
    free = fit_wise(logits, y, lam=0.0, iters=200, lr=0.05)
    shrunk = fit_wise(logits, y, lam=1.0, iters=200, lr=0.05)
    assert shrunk.sum() < 0.5 * free.sum()
    assert fit_wise(logits, y, lam=0.0, iters=0).equal(constant_weights(3))


def test_threshold_semantics_and_fair_sweep() -> None:
    logits, y = _logits(n=40)
    assert torch.all(exit_decisions(logits, 0.0) == 0)  # every max softmax is > 0
    assert torch.all(exit_decisions(logits, 1.01) == 2)  # none exceeds 1: the last exit
    cum = [10.0, 30.0, 100.0]
    rows = sweep(logits, y, cum, [0.0, 1.01])
    assert rows[0]["exits"] == [1.0, 0.0, 0.0] and rows[0]["macs"] == 10.0
    assert rows[1]["exits"] == [0.0, 0.0, 1.0] and rows[1]["macs"] == 100.0
    assert rows[0]["accuracy"] == pytest.approx(float((logits[0].argmax(1) == y).float().mean()))
    assert rows[1]["accuracy"] == pytest.approx(float((logits[2].argmax(1) == y).float().mean()))


def test_sweep_hand_example_charges_wrong_early_exits_too() -> None:
    # Two samples, label 0. Sample A is confidently WRONG at exit 1 (leaves there, pays 10);
    # sample B is unsure at exit 1 and leaves at exit 2 (pays 30, exits passed included).
    out = torch.tensor([
        [[0.0, 9.0], [0.0, 0.0]],  # exit 1: A confident class 1, B 50/50
        [[9.0, 0.0], [9.0, 0.0]],  # exit 2
    ])
    rows = sweep(out, torch.tensor([0, 0]), [10.0, 30.0], [0.9])
    assert rows[0] == {"threshold": 0.9, "accuracy": 0.5, "macs": 20.0, "exits": [0.5, 0.5]}


def test_constant_weights_average() -> None:
    want = torch.tensor([[1, 0, 0], [0.5, 0.5, 0], [1 / 3, 1 / 3, 1 / 3]])
    assert torch.allclose(constant_weights(3), want)


@pytest.fixture(scope="module")
def multi_exit_model(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """tiny_model with (untrained) ICs attached: enough to exercise the pipeline."""
    from vcc.core.artefact import load_model, save_model
    from vcc.core.exits import attach_exits

    model, meta = load_model(tiny_model)
    torch.manual_seed(0)
    model, meta = attach_exits(model, meta)
    path = tmp_path_factory.mktemp("wise") / "multi.safetensors"
    save_model(path, model, meta)
    return path


def test_vcc_wise_cli_json(session_ws, tiny_synthetic: Path, multi_exit_model: Path) -> None:
    env = {"VCC_HOME": str(session_ws.root)}
    proc = run_vcc("wise", str(multi_exit_model), "--data", str(tiny_synthetic), "--iters", "20", "--thresholds", "0:1.1:4",
                   "--name", "wise-cli", "--device", "cpu", "--format", "json", env=env)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # stdout is exactly one JSON document
    assert doc["full"]["macs"] > 0 and 0 <= doc["full"]["accuracy"] <= 1
    assert set(doc["methods"]) == {"wise", "vanilla", "constant"}
    for rows in doc["methods"].values():
        assert [r["threshold"] for r in rows] == pytest.approx(np.linspace(0, 1.1, 4).tolist())
        for r in rows:
            assert set(r) == {"threshold", "accuracy", "macs", "exits"}
            assert len(r["exits"]) == 4 and sum(r["exits"]) == pytest.approx(1.0)
        assert rows[0]["exits"][0] == 1.0 and rows[-1]["exits"][-1] == 1.0
    vanilla = doc["methods"]["vanilla"]
    assert vanilla[0]["macs"] == doc["exits"][0]["macs"] and vanilla[-1]["macs"] == doc["exits"][-1]["macs"]
    # WISE pays its weighted sums on top: k * C MACs at exit k; the full model is the backbone alone
    c = doc["num_classes"]
    assert doc["methods"]["wise"][0]["macs"] == doc["exits"][0]["macs"] + c
    assert doc["methods"]["wise"][-1]["macs"] == doc["exits"][-1]["macs"] + c * (1 + 2 + 3 + 4)
    assert isinstance(doc["full"]["macs"], int) and doc["full"]["macs"] < doc["exits"][-1]["macs"]
    assert vanilla[-1]["accuracy"] == doc["full"]["accuracy"]
    run = session_ws.root / "runs" / "wise-cli"
    assert (run / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "tradeoff.csv").read_text().splitlines()[0].startswith("method,threshold,accuracy,macs,exit_1")
    assert json.loads((run / "wise.json").read_text())["methods"] == doc["methods"]
    # -f csv: one trade-off table with a method column, a number per cell (a spreadsheet reads it)
    csv_text = run_vcc("wise", str(multi_exit_model), "--data", str(tiny_synthetic), "--iters", "20", "--thresholds", "0:1.1:4",
                       "--name", "wise-csv", "--device", "cpu", "--format", "csv", env=env).stdout
    block = csv_text.split("\n\n")[0].splitlines()
    assert block[0] == "method,threshold,acc %,MACs per video,% full,exit 1 %,exit 2 %,exit 3 %,exit 4 %"
    assert [ln.split(",")[0] for ln in block[1:]] == ["wise"] * 4 + ["vanilla"] * 4 + ["constant"] * 4
    assert all(ln.split(",")[3].isdigit() for ln in block[1:])
    from vcc.core.artefact import load_tensors

    tensors, meta = load_tensors(run / "logits.safetensors", expect_format="vcc-logits")
    assert tensors["train_logits"].shape[0] == 4 and tensors["test_logits"].shape[1] == len(tensors["test_labels"])
    assert meta["model_sha256"]


def test_vcc_wise_rejects_a_plain_model(ws, tiny_synthetic: Path, tiny_model: Path) -> None:
    res = CliRunner().invoke(app, ["wise", str(tiny_model), "--data", str(tiny_synthetic), "--device", "cpu"])
    assert res.exit_code == 2
    assert "has no early exits" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["wise", str(tiny_model), "--data", str(tiny_synthetic), "--thresholds", "1:2"])
    assert res.exit_code == 2 and "--thresholds" in res.output


def test_vcc_wise_fits_on_a_held_out_val_split(session_ws, tiny_synthetic: Path, multi_exit_model: Path, tmp_path: Path) -> None:
    from vcc.core.artefact import load_tensors
    from vcc.core.data.manifest import load_dataset, write_dataset
    from vcc.core.data.prepare import hold_out

    info = load_dataset(tiny_synthetic)
    entries = [dataclasses.replace(e, path=str(info.root / e.path)) for e in info.entries]
    hold_out(entries, info.classes, 0.34)
    held = tmp_path / "held"
    held.mkdir()
    write_dataset(held, "held", info.classes, entries, source="test")
    env = {"VCC_HOME": str(session_ws.root)}
    common = ("--data", str(held), "--iters", "50", "--thresholds", "0:1.1:4", "--device", "cpu", "--format", "json")
    on_val = json.loads(run_vcc("wise", str(multi_exit_model), *common, "--fit-split", "val", "--name", "wise-val", env=env, check=True).stdout)
    on_train = json.loads(run_vcc("wise", str(multi_exit_model), *common, "--name", "wise-train", env=env, check=True).stdout)
    assert on_val["fit_split"] == "val" and on_train["fit_split"] == "train"
    assert on_val["wise_weights"] != on_train["wise_weights"]  # fitted on other videos
    tensors, meta = load_tensors(session_ws.root / "runs" / "wise-val" / "logits.safetensors", expect_format="vcc-logits")
    assert meta["wise"]["fit_split"] == "val"
    n_val = sum(e.split == "val" for e in entries)
    assert n_val > 0 and len(tensors["val_video_idx"].unique()) == n_val
    assert tensors["val_logits"].shape[1] == len(tensors["val_labels"])
    assert on_val["methods"]["vanilla"] == on_train["methods"]["vanilla"]  # the same test sweep
    res = CliRunner().invoke(app, ["-w", str(session_ws.root), "wise", str(multi_exit_model), "--data", str(tiny_synthetic),
                                   "--fit-split", "val", "--name", "no-val"])
    assert res.exit_code == 2 and "no val split" in res.output
    assert not (session_ws.root / "runs" / "no-val").exists()  # nothing written


def test_exact_thresholds_trace_every_distinct_decision() -> None:
    """Any threshold gives the same exits as one of exact_thresholds (a fixed grid would miss most of them)."""
    from vcc.core.wise import exact_thresholds, exit_decisions

    torch.manual_seed(0)
    out = torch.randn(3, 40, 5) * 3
    out[0, :4] = out[0, 4:8]  # tied confidences collapse to one threshold
    exact = exact_thresholds(out)
    assert exact[0] == 0.0 and exact == sorted(exact) and len(exact) == 1 + 36 + 40
    decisions = {tuple(exit_decisions(out, t).tolist()) for t in exact}
    conf = F.softmax(out[:-1], -1).amax(-1).flatten()
    probes = torch.rand(500).tolist() + conf.tolist() + (conf - 1e-7).tolist() + [0.999999, 1.0, 1.1]
    seen = {tuple(exit_decisions(out, t).tolist()) for t in probes}
    assert seen == decisions and len(decisions) > 40


def test_vcc_wise_saves_a_model_that_runs_its_weights(session_ws, tiny_synthetic: Path, multi_exit_model: Path, tmp_path: Path) -> None:
    """`vcc wise` leaves a deployable artefact: the same exits plus their WISE weights, which
    `vcc eval --threshold` runs (and charges) and `vcc macs` counts; training drops them."""
    from vcc.core.artefact import load_model, load_tensors
    from vcc.core.exits import evaluate_early_exit, exit_macs, has_combine
    from vcc.core.wise import ensemble_macs, run_wise

    torch.manual_seed(0)
    run = tmp_path / "wise-model"
    doc = run_wise(multi_exit_model, tiny_synthetic, run, iters=200, lam=0.0, thresholds=[0.0, 0.3, 1.1], device="cpu")
    assert doc["files"]["model"] == str(run / "model.safetensors")
    tensors, _ = load_tensors(run / "logits.safetensors", expect_format="vcc-logits")
    beta = tensors["wise_weights"]
    wise_model, wmeta = load_model(run / "model.safetensors")
    plain, pmeta = load_model(multi_exit_model)
    assert has_combine(wmeta) and not has_combine(pmeta)
    assert torch.allclose(wise_model.combine, beta, atol=1e-6)
    assert not torch.allclose(beta, vanilla_weights(4))  # fitted, so running it is not the plain exits
    x = torch.randn(1, *wmeta.input_shape)
    exits_out = wise_model.forward_exits(x)
    for thr, k in ((0.0, 0), (1.1, 3)):  # leaves at the first exit, runs to the last: both WISE-weighted
        out, index = wise_model.forward_early(x, thr)
        assert index == k
        assert torch.allclose(out, combine(torch.stack(exits_out), beta)[k], atol=1e-5)
    for key, value in plain.state_dict().items():  # the exits themselves are untouched
        assert torch.equal(wise_model.state_dict()[key], value)
    raw = [r["macs"] for r in exit_macs(plain, pmeta)]
    charged = ensemble_macs(raw, 4, ensemble=True)
    for thr in (0.0, 0.3):
        own = evaluate_early_exit(wise_model, wmeta, tiny_synthetic, threshold=thr)
        given = evaluate_early_exit(plain, pmeta, tiny_synthetic, threshold=thr, combine=beta)
        vanilla = evaluate_early_exit(plain, pmeta, tiny_synthetic, threshold=thr)
        assert own["ensemble"] and given["ensemble"] and not vanilla["ensemble"]
        for key in ("accuracy", "clip_accuracy", "macs"):
            assert own[key] == given[key]
        assert [e["share"] for e in own["exits"]] == [e["share"] for e in given["exits"]]
        assert [e["macs"] for e in own["exits"]] == charged
    assert own["macs"] > 0
    first = evaluate_early_exit(wise_model, wmeta, tiny_synthetic, threshold=0.0)
    assert first["macs"] == raw[0] + 4  # every clip leaves at exit 1 and pays its 1*C weighted sum
    # the CLI: eval says it runs the weighted exits; macs charges their sums
    env = {"VCC_HOME": str(session_ws.root)}
    out = json.loads(run_vcc("eval", str(run / "model.safetensors"), "--data", str(tiny_synthetic), "--threshold", "0",
                             "--clips", "1", "--device", "cpu", "-f", "json", env=env, check=True).stdout)
    assert out["ensemble"] is True and out["macs"] == first["macs"]
    table = run_vcc("eval", str(run / "model.safetensors"), "--data", str(tiny_synthetic), "--threshold", "0",
                    "--clips", "1", "--device", "cpu", env=env, check=True).stdout
    assert "WISE-weighted" in table
    macs = json.loads(run_vcc("macs", str(run / "model.safetensors"), "-f", "json", env=env, check=True).stdout)
    assert [e["macs"] for e in macs["exits"]] == [int(m) for m in charged]
    # finetuning moves the logits the weights were fitted on: the result has none (and says so)
    ft = run_vcc("finetune", str(run / "model.safetensors"), "--data", str(tiny_synthetic), "-e", "1", "--name", "wise-ft",
                 "--device", "cpu", env=env, check=True)
    assert "WISE weights were dropped" in ft.stdout + ft.stderr
    ft_model, ft_meta = load_model(session_ws.root / "runs" / "wise-ft" / "model.safetensors")
    assert not has_combine(ft_meta) and ft_model.combine is None


def test_ensemble_weights_are_checked() -> None:
    from vcc.core.exits import combine_matrix, combine_rows

    m = combine_matrix([[1.0], [0.5, 0.5], [0.2, 0.3, 0.5]], 3)
    assert torch.equal(m, torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]]))
    rows = combine_rows(m)  # ragged, as the metadata stores it (float32 values, exactly)
    assert [len(r) for r in rows] == [1, 2, 3] and rows[2] == pytest.approx([0.2, 0.3, 0.5])
    assert torch.equal(combine_matrix(m, 3), m)
    with pytest.raises(UsageError, match="2 rows for 3 exits"):
        combine_matrix([[1.0], [0.5, 0.5]], 3)
    with pytest.raises(UsageError, match="cannot weigh later exits"):
        combine_matrix(torch.ones(3, 3), 3)
    with pytest.raises(UsageError, match="finite"):
        combine_matrix([[float("nan")], [0.5, 0.5], [0.2, 0.3, 0.5]], 3)
