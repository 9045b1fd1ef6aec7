"""Why a training stage stops on bad numbers, and the test hook that makes it happen on purpose."""

from __future__ import annotations

import os
from typing import Any


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss, gradient norm or weight."""


FAULT_ENV = "GEMMA_RLHF_INJECT_NAN"


def poison_if_asked(stage: str, step: int, model: Any) -> None:
    """Fault injection for the test suite: with ``GEMMA_RLHF_INJECT_NAN=<stage>:<step>`` one weight is set to NaN
    just before that optimizer step (SFT, RM) or PPO update, so the stage's own non-finite checks, its exit code
    and what it leaves behind are exercised end to end, through make."""
    if os.environ.get(FAULT_ENV) != f"{stage}:{step}":
        return
    import torch

    print(f"[{stage}] {FAULT_ENV}: setting one weight to NaN before step {step}", flush=True)
    with torch.no_grad():
        weight = next((p for p in model.parameters() if p.numel()), None)  # ZeRO-3: a rank may hold no shard
        if weight is not None:
            weight.view(-1)[0] = float("nan")
