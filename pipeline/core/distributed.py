"""A training loop of our own on accelerate, the same on one process, under DDP and under DeepSpeed ZeRO-2/3: the
Accelerator and the engines of frozen models, stopping every process together on a non-finite loss or a step
DeepSpeed skipped, means over processes, and ZeRO-3 parameters gathered for generation.

DeepSpeed and TRL are imported only inside the functions that need them (no import-time cost or side effect)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from pipeline.core.faults import NonFiniteLossError

# ----------------------------------------------------------------------------------------------------------------
# The accelerator and the frozen models
# ----------------------------------------------------------------------------------------------------------------


def configure_deepspeed(
    accelerator_kwargs: dict, micro_batch_size: int, accumulation_steps: int, max_grad_norm: float, bf16: bool
) -> None:
    """DeepSpeed has no dataloader to infer sizes from in our loop: give it the micro-batch size, the accumulation
    steps (one optimizer step per minibatch) and the clipping norm. bf16 is DeepSpeed's ``torch_autocast`` over fp32
    weights, not its ``bf16`` mode: that mode casts the engine's weights to bf16 (and, through ``zero.Init`` under
    ZeRO-3, every model built while it is set, the frozen ones included), so the policy's log-probs would come from
    bf16 weights and the fp32 reference's from fp32 ones, and the first update's KL would not be 0. The weights stay
    fp32 as outside DeepSpeed; Adam steps them directly."""
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin()  # reads the launcher's settings (the accelerate config's deepspeed_config)
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch_size
    plugin.deepspeed_config["gradient_accumulation_steps"] = accumulation_steps
    plugin.deepspeed_config["gradient_clipping"] = max_grad_norm
    if bf16:
        plugin.deepspeed_config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    accelerator_kwargs["deepspeed_plugin"] = plugin


def make_accelerator(micro_batch_size: int, accumulation_steps: int, max_grad_norm: float, prec: dict) -> Any:
    """gloo on a CPU-only machine; bf16 autocast over fp32 weights when the run computes in bf16 (accelerate's under
    DDP, DeepSpeed's ``torch_autocast`` under DeepSpeed); DeepSpeed sized from the batch arithmetic (``prec``: what
    ``pipeline.core.loading.precision`` returns)."""
    from accelerate import Accelerator

    kwargs: dict[str, Any] = {"gradient_accumulation_steps": accumulation_steps}
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    if deepspeed:
        configure_deepspeed(kwargs, micro_batch_size, accumulation_steps, max_grad_norm, prec["bf16"])
    if prec["use_cpu"]:
        # On a CPU-only machine the process group is gloo; set up first (as transformers' Trainer does with
        # use_cpu), the Accelerator below keeps the launcher's DeepSpeed settings on top of it.
        from accelerate import PartialState

        PartialState(cpu=True)
    return Accelerator(mixed_precision="bf16" if prec["bf16"] and not deepspeed else "no", **kwargs)


def prepare_frozen(model: nn.Module, accelerator: Any, zero3: bool) -> Any:
    """A frozen model (reference, reward) on the device in the dtype it was loaded in (``ppo.frozen_precision``).
    Only ZeRO-3 needs an engine for it, to hold its parameters partitioned; that engine is built with DeepSpeed's
    bf16 and fp16 off, so it keeps the loaded dtype, and with the training engine's ``torch_autocast``. (TRL's
    ``prepare_deepspeed`` copies the training engine's config, whose bf16 section casts a frozen model to bf16
    whatever the recipe asked for.)"""
    if not zero3:
        return model.to(accelerator.device)
    import deepspeed

    hidden = model.config.get_text_config().hidden_size
    trained = accelerator.state.deepspeed_plugin.deepspeed_config
    config = {
        "train_micro_batch_size_per_gpu": trained["train_micro_batch_size_per_gpu"],
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 10 * hidden,
            "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        },
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }
    if "torch_autocast" in trained:
        # The same gathers as the policy's engine: under autocast ZeRO-3 gathers the weights of linear layers in
        # bf16, Gemma's tied embedding among them, so an engine without it would embed tokens differently.
        config["torch_autocast"] = trained["torch_autocast"]
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def parameter_dtypes(module: nn.Module | None) -> str | None:
    """``fp32``, ``bf16``, ``bf16/fp32``: the dtypes of a model's parameters (under ZeRO-3 of the local partitions,
    inside a DeepSpeed engine of its model); None for no model."""
    if module is None:
        return None
    module = module.module if hasattr(module, "module") else module
    kinds = {str(getattr(p, "ds_tensor", p).dtype).removeprefix("torch.") for p in module.parameters()}
    return "/".join(sorted(kinds)).replace("float32", "fp32").replace("bfloat16", "bf16")


# ----------------------------------------------------------------------------------------------------------------
# Generation under ZeRO-3
# ----------------------------------------------------------------------------------------------------------------


@contextmanager
def unwrapped_for_generation(model: Any, accelerator: Any, zero3: bool):
    """The bare prepared ``model`` for generate(); under ZeRO-3 with its parameters gathered once for the whole
    rollout, not per generated token (P12; TRL's helper). TRL is imported only then: importing it costs about 190 MB
    of resident memory."""
    if zero3:
        from trl.models.utils import unwrap_model_for_generation

        with unwrap_model_for_generation(model, accelerator) as unwrapped:
            yield unwrapped
    else:
        yield accelerator.unwrap_model(model)


@contextmanager
def gathered(module: nn.Module, zero3: bool):
    """A frozen DeepSpeed-inference model with its ZeRO-3 shards gathered (for generating from it)."""
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            yield module
    else:
        yield module


# ----------------------------------------------------------------------------------------------------------------
# Stopping together, and means over processes
# ----------------------------------------------------------------------------------------------------------------


def check_loss(acc: Any, loss: torch.Tensor, where: str, what: str = "loss") -> None:
    """Stop on a non-finite loss on any process, on every process at once: a process that raised alone would leave
    the others waiting in the gradient all-reduce until the launcher tears the group down. ``what`` names the loss
    in the message (``non-finite <what> (nan) at <where>``)."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if acc.num_processes > 1:
        bad = acc.reduce(bad, reduction="sum")
    if bad.item():
        here = f"{loss.item()}" if not torch.isfinite(loss.detach()) else "on another process"
        raise NonFiniteLossError(f"non-finite {what} ({here}) at {where}")


def check_deepspeed_step(engine: Any, where: str) -> None:
    """DeepSpeed takes the optimizer step inside ``backward`` and, finding non-finite gradients, skips it with a
    warning and carries on: a run would go on to the end without training. Stop instead, on every process (the
    overflow flag is reduced over processes), while the weights are still the last finite ones. With fp16 loss
    scaling a skipped step is how the scale is found, so it is left to DeepSpeed."""
    if engine.fp16_enabled() or engine.was_step_applied():
        return
    raise NonFiniteLossError(
        f"non-finite gradients at {where}: DeepSpeed skipped the optimizer step, the weights are unchanged"
    )


def gather_stats(acc: Any, stats: dict, sums: tuple[str, ...] = ()) -> dict[str, float]:
    """Means over processes (sums for the keys in ``sums``, counts), as plain floats."""
    out = {}
    for k, v in stats.items():
        v = torch.as_tensor(v, dtype=torch.float32, device=acc.device)
        out[k] = float(acc.reduce(v, reduction="sum" if k in sums else "mean"))
    return out


def pooled_means(acc: Any, totals: dict[str, tuple[float, int]]) -> dict[str, float]:
    """Means over every process's answers (sums and counts reduced, so a process with fewer answers of a kind
    weighs less); a measure no answer on any process has (no Korean answer: no switch rate) is left out."""
    keys = list(totals)
    t = torch.tensor([list(totals[k]) for k in keys], dtype=torch.float32, device=acc.device)
    t = acc.reduce(t, reduction="sum").tolist()
    return {k: s / n for k, (s, n) in zip(keys, t) if n > 0}
