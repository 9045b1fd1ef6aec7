"""Why a training stage stops on bad numbers, how every process checks the weights it holds, and the test hooks that
make a stage fail on purpose."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from pipeline.core.errors import RunError


class NonFiniteLossError(RunError, RuntimeError):
    """Training produced a NaN or infinite loss, gradient norm or weight."""


def held(param: Any) -> Any:
    """The part of a parameter this process holds: under ZeRO-3 its partition (``ds_tensor``; outside a gather the
    parameter itself is an empty placeholder, so checking it would check nothing), else the parameter."""
    return getattr(param, "ds_tensor", param)


def nonfinite_ranks(parameters: Iterable[Any]) -> list[int]:
    """The ranks of the processes that hold a non-finite weight, the same list on every process: each checks what
    it holds (``held``), then the flags are summed over the job. Call on every process."""
    import torch
    import torch.distributed as dist

    bad = any(not bool(torch.isfinite(held(p)).all()) for p in parameters)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [0] if bad else []
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flags = torch.zeros(dist.get_world_size(), device=device)
    flags[dist.get_rank()] = float(bad)
    dist.all_reduce(flags)
    return [i for i, f in enumerate(flags.tolist()) if f]


FAULT_ENV = "GEMMA_RLHF_INJECT_NAN"
ERROR_ENV = "GEMMA_RLHF_INJECT_ERROR"


def _asked(env: str, spec: str) -> str | None:
    """The value of ``env`` with its ``@<rank>`` suffix removed, when it is meant for this process."""
    value = os.environ.get(env, "")
    value, _, rank = value.partition("@")
    if rank and rank != os.environ.get("RANK", "0"):
        return None
    return value if value.startswith(spec) else None


def poison_if_asked(stage: str, step: int, model: Any, after_step: bool = False) -> None:
    """Fault injection for the test suite: with ``GEMMA_RLHF_INJECT_NAN=<stage>:<step>`` one weight is set to NaN
    just before that optimizer step (SFT, RM) or PPO update, so the stage's own non-finite checks, its exit code
    and what it leaves behind are exercised end to end, through make. ``<stage>:<step>:grad`` makes that weight's
    gradient NaN instead (the loss stays finite); ``<stage>:<step>:after`` writes the NaN after the update's optimizer
    steps (``after_step``), into the part of the weight this process holds (its ZeRO-3 partition); a trailing
    ``@<rank>`` poisons that process only."""
    spec = _asked(FAULT_ENV, f"{stage}:{step}")
    if spec is None or spec.endswith(":after") != after_step:
        return
    if spec not in (f"{stage}:{step}", f"{stage}:{step}:grad", f"{stage}:{step}:after"):
        return
    import torch

    weight = next((p for p in model.parameters() if held(p).numel() and p.requires_grad), None)
    if weight is None:
        return
    if spec.endswith(":grad"):
        print(f"[{stage}] {FAULT_ENV}: one weight's gradient becomes NaN from step {step}", flush=True)
        weight.register_hook(lambda g: g * float("nan"))
        return
    with torch.no_grad():
        held(weight).view(-1)[0] = float("nan")
    # What a check of the parameters themselves sees (the check this hook's tests guard against): under ZeRO-3 the
    # partitioned weight is an empty placeholder outside a gather, so such a check passes.
    naive = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    print(
        f"[{stage}] {FAULT_ENV}: setting one weight to NaN {'after' if after_step else 'before'} step {step} "
        f"(rank {os.environ.get('RANK', '0')}; a check of the parameters themselves finds them finite: {naive})",
        flush=True,
    )


def fail_if_asked(stage: str, where: str, step: int) -> None:
    """Fault injection for the test suite: with ``GEMMA_RLHF_INJECT_ERROR=<stage>:<where>:<step>[@<rank>]`` the
    stage raises a NonFiniteLossError at that point (``sample``: in PPO's sampler) of that update, on that process
    only, as a sampler finding non-finite logits on one rank would."""
    if _asked(ERROR_ENV, f"{stage}:{where}:{step}") != f"{stage}:{where}:{step}":
        return
    raise NonFiniteLossError(
        f"{ERROR_ENV}: non-finite logits in the sampler at update {step} (rank {os.environ.get('RANK', '0')})"
    )
