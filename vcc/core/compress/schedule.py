"""Pruning schedules: Zhu & Gupta's automated gradual pruning (AGP, cubic)."""

from __future__ import annotations


def agp(final: float, step: int, steps: int, initial: float = 0.0) -> float:
    """Sparsity after `step` of `steps` (1-based): s_f + (s_i - s_f) * (1 - step/steps)^3."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    step = min(max(step, 0), steps)
    return final + (initial - final) * (1.0 - step / steps) ** 3


def agp_targets(final: float, steps: int, initial: float = 0.0) -> list[float]:
    """The AGP sparsity after each of `steps` steps (the last one is `final`)."""
    return [agp(final, t, steps, initial) for t in range(1, steps + 1)]


def macs_targets(keep: float, steps: int) -> list[float]:
    """MAC fractions to keep after each step, removing 1 - `keep` on the AGP curve."""
    return [1.0 - r for r in agp_targets(1.0 - keep, steps)]
