"""Reward functions: Python callables that score PPO's responses beside the reward model, or instead of it.

A recipe names each by import path (``package.module:function``, or ``path/to/file.py:function`` for a file outside
any package) with a weight (``ppo.reward_functions``). A function is called once per rollout batch of a process with
keyword arguments, one list entry per response:

    prompts    the last user turn of each prompt (str)
    responses  each decoded response, up to its stop token, without special tokens (str)
    ended      whether the response ended its turn on ``<end_of_turn>`` (bool)
    <column>   every other column of the prompt rows (a math set's ``answer`` reaches its checker)

and returns one finite number per response (a list, tuple or 1-D tensor). Accepting ``**kwargs`` keeps a function
working when a dataset has columns it does not read. The score PPO optimises is

    score = reward_model_weight * standardised reward-model score + sum_i weight_i * f_i(...)

(``combine``; the functions alone under ``ppo.reward_model: none``), then ``reward_clip`` and the missing-stop
penalty as for the reward model's score alone (``pipeline.core.ppo_math.final_scores``). A function that raises,
returns the wrong number of values or a non-finite one stops the stage in one line naming it and the prompt.

TRL's ``GRPOTrainer(reward_funcs=..., reward_weights=...)`` takes callables the same way (as ``prompts`` and
``completions``); this module is ours because our PPO loop is.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.core.errors import RunError

RESERVED = ("prompts", "responses", "ended")
"""The keyword arguments every reward function receives; a prompt column of one of these names is refused."""


class RewardFunctionError(RunError, RuntimeError):
    """A reward function failed on a rollout batch: it raised, or returned the wrong count or a non-finite value."""


def load_function(path: str, root: Path | None = None) -> Callable[..., Any]:
    """The callable at ``module:attr`` or ``file.py:attr`` (relative files from ``root``, then the working folder).
    Raises ValueError with the reason in one line (the recipe check names the key)."""
    module_name, sep, attr = path.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{path!r} is not 'package.module:function' or 'path/to/file.py:function'")
    if module_name.endswith(".py"):
        candidates = [Path(module_name)] if Path(module_name).is_absolute() else []
        candidates += [(root or Path.cwd()) / module_name, Path.cwd() / module_name]
        file = next((c for c in candidates if c.is_file()), None)
        if file is None:
            raise ValueError(f"file {module_name!r} does not exist")
        name = f"reward_functions_{abs(hash(str(file.resolve())))}"
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.spec_from_file_location(name, file)
            if spec is None or spec.loader is None:
                raise ValueError(f"{module_name!r} cannot be imported as a Python file")
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            except Exception as e:  # noqa: BLE001 - the user's file: one line naming it and the error
                raise ValueError(f"importing {module_name!r} raised {type(e).__name__}: {e}") from None
            sys.modules[name] = module
    else:
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # noqa: BLE001 - the user's module: one line naming it and the error
            raise ValueError(f"module {module_name!r} does not import ({type(e).__name__}: {e})") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ValueError(f"{path!r} is a {type(fn).__name__}, not a function")
    return fn


@dataclass
class RewardFunction:
    """One of the recipe's reward functions, loaded."""

    name: str  # the metric's name: reward/<name>
    path: str  # as the recipe writes it
    weight: float
    fn: Callable[..., Any]


def load_all(specs: Sequence[Any], root: Path | None = None) -> list[RewardFunction]:
    """The recipe's ``ppo.reward_functions`` (each with ``function``, ``weight`` and ``name``), loaded in order."""
    out = []
    for spec in specs:
        try:
            fn = load_function(spec.function, root)
        except ValueError as e:
            raise RewardFunctionError(f"ppo.reward_functions: {e}") from None
        out.append(RewardFunction(spec.name or default_name(spec.function), spec.function, float(spec.weight), fn))
    return out


def default_name(path: str) -> str:
    """A function's metric name when the recipe gives none: its attribute name."""
    return path.rpartition(":")[2]


def _shown(prompt: str) -> str:
    return repr(prompt if len(prompt) <= 80 else prompt[:77] + "...")


def call(
    f: RewardFunction, prompts: list[str], responses: list[str], ended: list[bool], columns: dict[str, list]
) -> list[float]:
    """``f`` on one batch: one finite float per response, or RewardFunctionError naming the function and the prompt
    (when the batch call raises, the rows are retried one at a time to find the prompt that makes it raise)."""
    n = len(prompts)

    def run(rows: range) -> Any:
        pick = lambda xs: [xs[i] for i in rows]  # noqa: E731
        return f.fn(
            prompts=pick(prompts),
            responses=pick(responses),
            ended=pick(ended),
            **{k: pick(v) for k, v in columns.items()},
        )

    try:
        out = run(range(n))
    except Exception as e:  # noqa: BLE001 - the user's function: one line naming it, the prompt and the error
        culprit = 0
        for i in range(n):
            try:
                run(range(i, i + 1))
            except Exception:  # noqa: BLE001
                culprit = i
                break
        raise RewardFunctionError(
            f"reward function {f.name} ({f.path}) raised {type(e).__name__}: {e} (prompt {_shown(prompts[culprit])})"
        ) from None
    if isinstance(out, torch.Tensor):
        out = out.detach().float().reshape(-1).tolist() if out.dim() <= 1 else None
    try:
        values = [float(v) for v in out]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise RewardFunctionError(
            f"reward function {f.name} ({f.path}) returned {type(out).__name__}, not one number per response "
            f"(prompt {_shown(prompts[0])})"
        ) from None
    if len(values) != n:
        raise RewardFunctionError(
            f"reward function {f.name} ({f.path}) returned {len(values)} values for {n} responses "
            f"(prompt {_shown(prompts[0])})"
        )
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise RewardFunctionError(
                f"reward function {f.name} ({f.path}) returned {v} for prompt {_shown(prompts[i])} "
                f"(response {_shown(responses[i])})"
            )
    return values


def combine(
    rm_scores: torch.Tensor | None, rm_weight: float, function_scores: torch.Tensor | None, weights: Sequence[float]
) -> torch.Tensor:
    """(B,) ``rm_weight * rm_scores + sum_i weights[i] * function_scores[i]``; ``function_scores`` is (F, B) or None,
    ``rm_scores`` (B,) (already standardised) or None. At least one of the two is given."""
    parts = []
    if rm_scores is not None:
        parts.append(rm_weight * rm_scores.float())
    if function_scores is not None and len(weights):
        w = torch.tensor(list(weights), dtype=torch.float32, device=function_scores.device)
        parts.append((w.unsqueeze(1) * function_scores.float()).sum(0))
    if not parts:
        raise ValueError("no reward: neither a reward model nor a reward function")
    return parts[0] if len(parts) == 1 else parts[0] + parts[1]


@dataclass
class PromptRows:
    """What reward functions read of each rollout row's prompt: its last user turn and its row's other columns."""

    prompts: list[str]
    columns: dict[str, list]

    def take(self, index: Sequence[int]) -> PromptRows:
        return PromptRows(
            [self.prompts[i] for i in index], {k: [v[i] for i in index] for k, v in self.columns.items()}
        )

    @classmethod
    def read(cls, messages: Sequence[str], columns: Sequence[str | None] | None, where: str) -> PromptRows:
        """From the data stage's prompt columns: ``messages`` (JSON turns) and ``columns`` (JSON objects). Every row
        gets every column any row has (None where it lacks it); a column named like an argument is refused."""
        prompts = [json.loads(m)[-1]["content"] for m in messages]
        rows = [json.loads(c) if c else {} for c in (columns or [None] * len(prompts))]
        names = sorted({k for r in rows for k in r})
        clash = [k for k in names if k in RESERVED]
        if clash:
            raise RewardFunctionError(
                f"{where}: prompt column {clash[0]!r} has the name of a reward function's own argument "
                f"({', '.join(RESERVED)}): rename it with the dataset's columns mapping"
            )
        return cls(prompts, {k: [r.get(k) for r in rows] for k in names})


def function_scores(
    functions: Sequence[RewardFunction], rows: PromptRows, responses: list[str], ended: list[bool]
) -> dict[str, list[float]]:
    """Each function's scores of one batch, by name (``call`` checks each)."""
    return {f.name: call(f, rows.prompts, responses, ended, rows.columns) for f in functions}
