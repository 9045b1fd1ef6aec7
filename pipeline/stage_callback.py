"""The Trainer callback shared by the Trainer-driven stages (SFT and RM): W&B and console logging under
``stage/group/name`` keys with tokens/s, a stop on non-finite loss, grad norm or weights, and the notices and
completion marker on every resumable checkpoint the Trainer saves."""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
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


def stage_callback(
    stage: str,
    tracker: Any,
    mark: Callable[[Path, int, dict], None],
    shown: tuple[str, ...],
    on_evaluate: Callable[..., None] | None = None,
):
    """A TrainerCallback for ``stage``.

    ``mark(checkpoint_dir, step, metrics)`` gives a saved checkpoint its notices and marker (main process);
    ``shown`` names the metrics printed on the console line; ``on_evaluate(args, state, model)`` runs after each
    evaluation (e.g. the SFT prompt panel).
    """
    import torch
    from transformers import TrainerCallback

    from pipeline.checkpoint import last_good_note

    class StageCallback(TrainerCallback):
        def __init__(self) -> None:
            self.last: tuple[float, float] | None = None  # (time, num_tokens) at the previous log

        def on_log(self, args, state, control, logs=None, **kw):
            logs = dict(logs or {})
            for key in ("loss", "grad_norm", "eval_loss"):
                value = logs.get(key)
                if value is not None and not math.isfinite(value):
                    raise NonFiniteLossError(
                        f"non-finite {key} ({value}) at step {state.global_step}; stopping: "
                        f"{last_good_note(args.output_dir)}"
                    )
            now = time.perf_counter()
            if "num_tokens" in logs:
                if self.last is not None and now > self.last[0]:
                    logs["tokens_per_second"] = (logs["num_tokens"] - self.last[1]) / (now - self.last[0])
                self.last = (now, logs["num_tokens"])
            metrics = {}
            for k, v in logs.items():
                if isinstance(v, (int, float)):
                    group, name = ("eval", k[5:]) if k.startswith("eval_") else ("train", k)
                    metrics[f"{stage}/{group}/{name}"] = v
            tracker.log(metrics, step=state.global_step)
            if state.is_world_process_zero:
                line = " ".join(
                    f"{k.split('/', 2)[-1]} {v:.4g}" for k, v in metrics.items() if k.rsplit("/", 1)[-1] in shown
                )
                print(f"[{stage}] step {state.global_step}/{state.max_steps} {line}", flush=True)

        def on_step_begin(self, args, state, control, model=None, **kw):
            if model is not None:
                poison_if_asked(stage, state.global_step + 1, model)

        def on_save(self, args, state, control, model=None, **kw):
            if not state.is_world_process_zero:
                return
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            # Never mark a checkpoint whose weights went non-finite between two logs (ZeRO-3 shards that are not
            # local are empty here and pass; the logged loss and grad norm still catch them).
            if model is not None and not all(torch.isfinite(p).all() for p in model.parameters()):
                shutil.rmtree(ckpt, ignore_errors=True)
                raise NonFiniteLossError(
                    f"non-finite weights at step {state.global_step}; stopping: {last_good_note(args.output_dir)}"
                )
            last = next((h for h in reversed(state.log_history) if "loss" in h), {})
            mark(ckpt, state.global_step, {"train/loss": last.get("loss")})

        def on_evaluate(self, args, state, control, model=None, **kw):
            if on_evaluate is not None and model is not None:
                on_evaluate(args, state, model)

    return StageCallback()
