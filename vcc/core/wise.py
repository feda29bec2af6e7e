"""WISE (Weighted Inference with Scaled Ensemble) and early-exit threshold sweeps.

Given every exit's logits L_1..L_E, exit k outputs sum_{j<=k} beta_kj * L_j. WISE learns each
beta_k on *training* logits by full-batch SGD on CE + lambda * ||beta_k||_1, clipping negative
weights to 0 after every step; the constant ensemble averages L_1..L_k; vanilla ICs use L_k.
A sample leaves at the first exit whose max softmax exceeds the threshold, else at the last,
and is charged the cumulative MACs of everything it ran (see :func:`vcc.core.exits.exit_macs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vcc.core.errors import UsageError, VccError
from vcc.core.exits import ensemble_macs  # noqa: F401 - re-exported: the sweeps charge it
from vcc.core.progress import ProgressFn

METHODS = ("wise", "vanilla", "constant")
LOGITS_FORMAT = "vcc-logits"


def parse_thresholds(spec: str) -> list[float]:
    """`start:stop:count` (inclusive, like numpy.linspace) or a comma list of values."""
    spec = spec.strip()
    try:
        if ":" in spec:
            parts = spec.split(":")
            if len(parts) != 3:
                raise ValueError
            start, stop, count = float(parts[0]), float(parts[1]), int(parts[2])
            if count < 1:
                raise ValueError
            if count == 1:
                return [start]
            return [start + (stop - start) * i / (count - 1) for i in range(count)]
        values = [float(v) for v in spec.split(",") if v.strip()]
        if not values:
            raise ValueError
        return values
    except ValueError:
        raise UsageError(f"--thresholds expects START:STOP:COUNT (e.g. 0:1.1:13) or a comma list, got {spec!r}") from None


# ---------------------------------------------------------------- ensembles


def _mask(n_exits: int) -> torch.Tensor:
    return torch.tril(torch.ones(n_exits, n_exits))


def vanilla_weights(n_exits: int) -> torch.Tensor:
    """Identity: exit k is its own IC."""
    return torch.eye(n_exits)


def constant_weights(n_exits: int) -> torch.Tensor:
    """Unweighted ensembles: exit k averages the logits of exits 1..k."""
    m = _mask(n_exits)
    return m / m.sum(1, keepdim=True)


def combine(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(E, N, C) logits, (E, E) lower-triangular weights -> (E, N, C) ensemble outputs."""
    w = weights.to(logits.dtype) * _mask(weights.shape[0]).to(logits.dtype)
    return torch.einsum("kj,jnc->knc", w, logits)


def fit_wise(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    lam: float = 3e-2,
    iters: int = 3000,
    lr: float = 0.01,
    momentum: float = 0.9,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """Learn WISE weights beta (E, E), lower triangular, non-negative, from training logits.

    Each row k minimises CE(sum_j beta_kj L_j, y) + lam * ||beta_k||_1 by full-batch SGD
    (momentum), negatives clipped to 0 after every step; rows start at the constant ensemble.
    """
    if logits.dim() != 3 or labels.shape[0] != logits.shape[1]:
        raise UsageError(f"expected logits (E, N, C) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if lam < 0 or iters < 0 or lr <= 0:
        raise UsageError("--lambda and --iters must be >= 0 and lr > 0")
    n_exits = logits.shape[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread hand-offs cost more than the maths
    try:
        return _fit_wise(logits, labels, n_exits, lam, iters, lr, momentum, progress)
    finally:
        torch.set_num_threads(threads)


def _fit_wise(logits: torch.Tensor, labels: torch.Tensor, n_exits: int, lam: float, iters: int, lr: float, momentum: float, progress: ProgressFn | None) -> torch.Tensor:
    x = logits.detach().double()
    y = labels.long()
    mask = _mask(n_exits).double()
    beta = constant_weights(n_exits).double().requires_grad_(True)
    opt = torch.optim.SGD([beta], lr=lr, momentum=momentum)
    for i in range(iters):
        out = torch.einsum("kj,jnc->knc", beta * mask, x)
        # Rows are independent: the sum of per-exit objectives has each row's own gradient.
        ce = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.repeat(n_exits), reduction="none").view(n_exits, -1).mean(1)
        loss = ce.sum() + lam * (beta * mask).abs().sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            beta.mul_(mask).clamp_(min=0.0)
        if progress and ((i + 1) % 50 == 0 or i + 1 == iters):
            progress("wise fit", i + 1, iters, {"loss": float(loss.detach())})
    return beta.detach().float()


# ---------------------------------------------------------------- early exit decisions and sweeps


def exit_decisions(outputs: torch.Tensor, threshold: float) -> torch.Tensor:
    """0-based exit per sample: the first exit whose max softmax > threshold, else the last."""
    conf = F.softmax(outputs.float(), dim=-1).amax(-1) > float(threshold)  # (E, N)
    conf[-1] = True
    return conf.int().argmax(0)


def exact_thresholds(outputs: torch.Tensor) -> list[float]:
    """Every threshold that can change a decision on these (E, N, C) outputs: 0 and each early exit's distinct confidence.

    A sample leaves exit k when its confidence is > the threshold, so sweeping these values traces the
    method's whole accuracy-vs-MACs curve on this data: any other threshold gives the exits one of
    them gives (some of them give the same exits as another).
    """
    conf = F.softmax(outputs[:-1].float(), dim=-1).amax(-1)
    return [0.0, *torch.unique(conf).tolist()]


def sweep(outputs: torch.Tensor, labels: torch.Tensor, cum_macs: Sequence[float], thresholds: Sequence[float]) -> list[dict[str, Any]]:
    """Accuracy, fair average MACs and exit shares per threshold."""
    from vcc.core.exits import average_macs

    n_exits, n = outputs.shape[0], outputs.shape[1]
    if len(cum_macs) != n_exits:
        raise VccError(f"{len(cum_macs)} MACs entries for {n_exits} exits")
    preds = outputs.argmax(-1)  # (E, N)
    rows = []
    for thr in thresholds:
        idx = exit_decisions(outputs, thr)
        pred = preds.gather(0, idx.view(1, -1))[0]
        counts = torch.bincount(idx, minlength=n_exits)
        rows.append({
            "threshold": round(float(thr), 6),
            "accuracy": int((pred == labels).sum()) / n if n else 0.0,
            "macs": average_macs(idx, cum_macs),
            "exits": [round(float(c) / max(1, n), 6) for c in counts],
        })
    return rows


def frontier_accuracy(rows: Sequence[dict[str, Any]], budget: float) -> float | None:
    """The best accuracy a method reaches with average MACs <= budget (None if none fits)."""
    ok = [r["accuracy"] for r in rows if r["macs"] <= budget * (1 + 1e-9)]
    return max(ok) if ok else None


# ---------------------------------------------------------------- the `vcc wise` pipeline


def run_wise(
    model_path: str | Path,
    data: Any,
    run_dir: str | Path,
    *,
    lam: float = 3e-2,
    iters: int = 3000,
    lr: float = 0.01,
    thresholds: Sequence[float] = tuple(parse_thresholds("0:1.1:13")),
    batch_size: int = 8,
    device: str = "auto",
    workers: int = 0,
    fit_split: str = "train",
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Save per-exit logits (train, test), fit WISE, sweep thresholds, write CSV/JSON/PNG in `run_dir`.

    WISE's weights are fitted on `fit_split`'s logits: "train" (the paper's choice) or "val", a
    split the exits never trained on (`vcc prepare --holdout`).

    Returns ``{"full": {"accuracy", "macs"}, "methods": {"wise"|"vanilla"|"constant": [rows]},
    "exits": [{exit, stage, macs}], "wise_weights": [[...]], "files": {...}}``.
    """
    from vcc.core.artefact import load_model, save_tensors, sha256_file
    from vcc.core.data.loader import make_loader
    from vcc.core.exits import collect_exit_logits, exit_macs_and_backbone, is_multi_exit
    from vcc.core.training import check_classes, dataset_info, resolve_device
    from vcc.core.workspace import atomic_write_json, atomic_write_text

    dev = resolve_device(device)
    model, meta = load_model(model_path, device=dev)
    if not is_multi_exit(meta):
        raise UsageError(f"{model_path} has no early exits (train some with `vcc train --init MODEL --exits auto --kd progressive`)")
    info = dataset_info(data)
    check_classes(meta, list(info.classes))
    table, backbone_macs = exit_macs_and_backbone(model, meta)
    cum = [float(r["macs"]) for r in table]
    full_macs = int(backbone_macs)  # the backbone alone: its final classifier, no exit heads
    if fit_split not in ("train", "val"):
        raise UsageError(f"--fit-split must be train or val, got {fit_split!r}")
    if fit_split == "val" and not info.counts.get("val"):
        raise UsageError(f"dataset {info.name!r} has no val split (prepare it with --holdout R to fit WISE on held-out videos)")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    tensors: dict[str, torch.Tensor] = {}
    for split in dict.fromkeys((fit_split, "train", "test")):
        if not info.split(split):
            raise VccError(f"dataset {info.name!r} has no {split!r} videos (WISE fits on {fit_split} and reports on test)")
        loader = make_loader(info, split, train=False, frames=meta.frames, size=meta.size, batch_size=batch_size, workers=workers)
        logits, labels, vidx = collect_exit_logits(model, loader, dev, meta, progress, task=f"logits {split}")
        tensors[f"{split}_logits"], tensors[f"{split}_labels"], tensors[f"{split}_video_idx"] = logits, labels, vidx

    beta = fit_wise(tensors[f"{fit_split}_logits"], tensors[f"{fit_split}_labels"], lam=lam, iters=iters, lr=lr, progress=progress)
    tensors["wise_weights"] = beta
    logits_path = run_dir / "logits.safetensors"
    save_tensors(logits_path, tensors, {
        "format": LOGITS_FORMAT,
        "model": str(model_path),
        "model_sha256": sha256_file(model_path),
        "exits": table,
        "classes": list(meta.classes),
        "wise": {"lambda": lam, "iters": iters, "lr": lr, "fit_split": fit_split},
    })

    test, labels = tensors["test_logits"], tensors["test_labels"]
    n_classes = test.shape[-1]
    weights = {"wise": beta, "vanilla": vanilla_weights(len(cum)), "constant": constant_weights(len(cum))}
    methods = {}
    for name in METHODS:
        macs = ensemble_macs(cum, n_classes, ensemble=name != "vanilla")
        methods[name] = sweep(combine(test, weights[name]), labels, macs, thresholds)
    full = {"accuracy": int((test[-1].argmax(-1) == labels).sum()) / max(1, len(labels)), "macs": full_macs}
    doc: dict[str, Any] = {
        "full": full,
        "methods": methods,
        "exits": table,
        "wise_weights": [[round(float(v), 6) for v in row[: i + 1]] for i, row in enumerate(beta)],
        "fit_split": fit_split,
        "num_classes": int(n_classes),  # WISE and constant ensembles pay k * num_classes MACs at exit k
        "files": {},
    }
    csv_path, json_path, png_path = run_dir / "tradeoff.csv", run_dir / "wise.json", run_dir / "tradeoff.png"
    atomic_write_text(csv_path, tradeoff_csv(methods))
    plot_tradeoff(png_path, methods, full)
    model_out = run_dir / "model.safetensors"
    save_wise_model(model_out, model, meta, beta, parent=model_path, info=info,
                    settings={"lambda": lam, "iters": iters, "lr": lr, "fit_split": fit_split})
    doc["files"] = {"model": str(model_out), "logits": str(logits_path), "csv": str(csv_path), "json": str(json_path),
                    "plot": str(png_path)}
    atomic_write_json(json_path, doc)
    return doc


def save_wise_model(path: str | Path, model: Any, meta: Any, weights: torch.Tensor, *, parent: str | Path, info: Any,
                    settings: dict[str, Any]) -> Path:
    """The multi-exit model with its WISE weights recorded, as one artefact: `vcc eval --threshold`
    then runs the weighted exits, and `vcc macs` charges their sums."""
    from vcc.core.artefact import dataset_ref, provenance, save_model
    from vcc.core.exits import with_combine

    out = with_combine(meta, weights)
    out.extra = {**out.extra, "wise": dict(settings)}
    out.provenance = provenance(parent, dataset=dataset_ref(info))
    model.combine = weights.detach().float().cpu()
    try:
        return save_model(path, model, out)
    finally:
        model.combine = None


def tradeoff_csv(methods: dict[str, list[dict[str, Any]]]) -> str:
    """method, threshold, accuracy, macs, exit_1..exit_E shares."""
    n_exits = max((len(r["exits"]) for rows in methods.values() for r in rows), default=0)
    lines = [",".join(["method", "threshold", "accuracy", "macs", *[f"exit_{i + 1}" for i in range(n_exits)]])]
    for name, rows in methods.items():
        for r in rows:
            lines.append(",".join([name, f"{r['threshold']:g}", f"{r['accuracy']:.6f}", f"{r['macs']:.0f}", *[f"{s:.6f}" for s in r["exits"]]]))
    return "\n".join(lines) + "\n"


def plot_tradeoff(path: str | Path, methods: dict[str, list[dict[str, Any]]], full: dict[str, Any]) -> Path:
    """Accuracy vs average MACs per video, one line per method, the full model as a star (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vcc.core.workspace import atomic_path

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, rows in methods.items():
        pts = sorted((r["macs"] / 1e6, r["accuracy"] * 100) for r in rows)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name)
    ax.scatter([full["macs"] / 1e6], [full["accuracy"] * 100], marker="*", s=120, c="k", label="full model", zorder=5)
    ax.set_xlabel("average MMACs per video")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("early exit trade-off")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
