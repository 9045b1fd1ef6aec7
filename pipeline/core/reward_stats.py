"""A reward model judged on held-out preference pairs: the pair metrics (pure functions), the statistics stored
beside its weights (``reward_stats.json``: the mean and std PPO normalises scores with, the held-out accuracy), and
the gate that refuses to optimise against a reward model below ``rm.min_accuracy``."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.core.errors import InputError
from pipeline.core.rundir import REWARD_STATS, IncompleteError


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


# --------------------------------------------------------------------------------------------------------------
# The reward model's statistics and the gate PPO applies to them
# --------------------------------------------------------------------------------------------------------------


class RewardModelGateError(InputError, RuntimeError):
    """The reward model is not good enough to optimise against."""


@dataclass(frozen=True)
class RewardStats:
    """``rm/final/reward_stats.json``: the reward model judged on held-out pairs."""

    mean: float
    """Mean reward over every held-out response (PPO's ``normalize_reward`` subtracts it)."""
    std: float
    """Standard deviation of those rewards (PPO's ``normalize_reward`` divides by it)."""
    accuracy: float
    """Held-out pairwise accuracy (the gate's measure)."""
    pairs: int
    """Held-out pairs scored."""
    scored_at: str
    """The token the reward is read at (PPO rollouts must stop on it)."""

    def write(self, folder: str | Path) -> None:
        (Path(folder) / REWARD_STATS).write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, folder: str | Path) -> RewardStats | None:
        """The statistics stored with a reward model, or None for a checkpoint that has none."""
        path = Path(folder) / REWARD_STATS
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                float(raw["mean"]), float(raw["std"]), float(raw["accuracy"]), int(raw["pairs"]), raw["scored_at"]
            )
        except (ValueError, KeyError, TypeError) as e:
            raise IncompleteError(
                f"{path} is not a reward model's statistics file ({type(e).__name__}: {e})"
            ) from None


def warn_on_stderr(message: str) -> None:
    print(f"warning {message}", file=sys.stderr, flush=True)


def check_gate(
    rm_dir: str | Path, min_accuracy: float, override: bool, warn: Callable[[str], None] = warn_on_stderr
) -> float:
    """The reward model's held-out accuracy. Below ``min_accuracy`` it raises RewardModelGateError, or, when
    ``override`` lets the run start anyway, hands the reason to ``warn`` (the caller prints it its own way)."""
    stats = RewardStats.read(rm_dir)
    if stats is None:
        raise RewardModelGateError(f"{rm_dir} has no {REWARD_STATS}: it was not written by the reward-model stage")
    if stats.accuracy < min_accuracy:
        msg = (
            f"the reward model at {rm_dir} has held-out pairwise accuracy {stats.accuracy:.3f}, below "
            f"rm.min_accuracy {min_accuracy}: PPO against it would optimise noise. Improve the reward model (data, "
            "epochs), lower rm.min_accuracy, or set ppo.ignore_rm_gate=true to start anyway"
        )
        if not override:
            raise RewardModelGateError(msg)
        warn(f"(ppo.ignore_rm_gate): {msg}")
    return stats.accuracy
