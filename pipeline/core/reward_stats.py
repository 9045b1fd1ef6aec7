"""Pure functions for judging a reward model on held-out preference pairs."""

from __future__ import annotations

import math
from collections.abc import Sequence


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties getting the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; 0.0 when either side is constant (no linear relation to report)."""
    n = len(x)
    if n < 2:
        return 0.0
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else 0.0


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson on tie-averaged ranks)."""
    return pearson(ranks(x), ranks(y))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation."""
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / n)


def pair_metrics(
    chosen: Sequence[float], rejected: Sequence[float], chosen_len: Sequence[int], rejected_len: Sequence[int]
) -> dict[str, float]:
    """Pairwise accuracy (ties count as wrong), mean margin, reward mean/std per side, and the Spearman
    correlation of reward with response length over every response (a warning sign of length hacking)."""
    n = len(chosen)
    if n == 0 or n != len(rejected):
        raise ValueError(f"need as many chosen as rejected rewards, got {len(chosen)} and {len(rejected)}")
    c_mean, c_std = mean_std(chosen)
    r_mean, r_std = mean_std(rejected)
    all_rewards = list(chosen) + list(rejected)
    mean, std = mean_std(all_rewards)
    return {
        "accuracy": sum(c > r for c, r in zip(chosen, rejected)) / n,
        "margin": sum(c - r for c, r in zip(chosen, rejected)) / n,
        "chosen_mean": c_mean,
        "chosen_std": c_std,
        "rejected_mean": r_mean,
        "rejected_std": r_std,
        "reward_mean": mean,
        "reward_std": std,
        "length_spearman": spearman(all_rewards, list(chosen_len) + list(rejected_len)),
        "pairs": n,
    }
