"""Where and how a stage computes: the precision a recipe asks for on this machine, and the one-line description of
the processes a stage runs as (count, backend, DeepSpeed ZeRO stage)."""

from __future__ import annotations

from typing import Any

from pipeline.core.errors import ConfigError


def precision(setting: str = "auto") -> dict:
    """How a stage computes (``run.precision``), and what TrainingArguments and from_pretrained need.

    Weights are always loaded in fp32: with bf16 the forward runs under autocast (``bf16=True`` for the Trainer,
    ``mixed_precision="bf16"`` for accelerate), so AdamW steps fp32 master weights. Stepping bf16 weights directly
    loses most small updates: at lr 3e-6 a bf16 N(0, 0.02) weight keeps nearly every entry unchanged. DeepSpeed
    keeps its own fp32 master copy when its config enables bf16."""
    import torch

    cuda = torch.cuda.is_available()
    if setting == "auto":
        bf16 = cuda and torch.cuda.is_bf16_supported()
    elif setting == "bf16":
        if cuda and not torch.cuda.is_bf16_supported():
            raise ConfigError("run.precision: bf16 is not supported by this GPU (use fp32 or auto)")
        bf16 = True
    else:
        bf16 = False
    return {"bf16": bf16, "use_cpu": not cuda, "dtype": torch.float32}


def describe_processes(state: Any) -> str:
    """One line on how the stage runs: process count, backend, DeepSpeed ZeRO stage."""
    import os

    kind = (
        "DeepSpeed"
        if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
        else str(state.distributed_type).split(".")[-1]
    )
    kind = {"NO": "single process"}.get(kind, kind)
    zero = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    backend = getattr(state, "backend", None)
    return (
        f"{state.num_processes} process(es), {kind}"
        + (f" ZeRO-{zero}" if zero and kind == "DeepSpeed" else "")
        + (f", {backend}" if backend else "")
    )
