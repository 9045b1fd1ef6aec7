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
    and what it leaves behind are exercised end to end, through make. ``<stage>:<step>:grad`` makes that weight's
    gradient NaN instead (the loss stays finite); a trailing ``@<rank>`` poisons that process only."""
    spec = os.environ.get(FAULT_ENV, "")
    spec, _, rank = spec.partition("@")
    if rank and rank != os.environ.get("RANK", "0"):
        return
    if spec not in (f"{stage}:{step}", f"{stage}:{step}:grad"):
        return
    import torch

    weight = next((p for p in model.parameters() if p.numel() and p.requires_grad), None)  # ZeRO-3: maybe no shard
    if weight is None:
        return
    if spec.endswith(":grad"):
        print(f"[{stage}] {FAULT_ENV}: one weight's gradient becomes NaN from step {step}", flush=True)
        weight.register_hook(lambda g: g * float("nan"))
        return
    print(f"[{stage}] {FAULT_ENV}: setting one weight to NaN before step {step}", flush=True)
    with torch.no_grad():
        weight.view(-1)[0] = float("nan")
