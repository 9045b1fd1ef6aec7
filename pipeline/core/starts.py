"""Where a stage's model starts: the run's SFT checkpoint, or a model the recipe names (``ppo.init_from``,
``dpo.init_from``, ``rm.init_from``): a hub id, a local folder in hub layout (an instruct model, a copy of a
checkpoint of this pipeline), or an embedded model. ``needs`` is the chain of stages each stage requires under a
recipe (what ``make <stage>`` runs first, and what ``make plan`` shows)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.checkpoint import require_checkpoint
from pipeline.core.config import ModelConfig, Recipe
from pipeline.core.errors import InputError
from pipeline.core.loading import model_location
from pipeline.core.locations import EMBEDDED_PREFIX, looks_local, resolve_path
from pipeline.core.rundir import LINEAGE, MODEL_CONFIG, RunDir


@dataclass(frozen=True)
class Start:
    """A stage's starting model."""

    location: str  # what from_pretrained reads: a local folder (absolute) or a hub id
    written: str  # as the recipe writes it (or the SFT checkpoint's path)
    role: str  # its lineage key: "sft" (the run's SFT checkpoint) or "init" (a model the recipe names)
    ours: bool  # a checkpoint this pipeline wrote (complete, with notices and lineage)

    @property
    def local(self) -> Path | None:
        p = Path(self.location)
        return p if p.is_absolute() and p.exists() else None

    @property
    def what(self) -> str:
        """How messages name it."""
        return "the SFT checkpoint" if self.role == "sft" else f"the start model {self.written!r}"

    @property
    def foreign(self) -> bool:
        """Not written by this pipeline: the consistency gate compares its vocabulary, not its chat template."""
        return not self.ours

    def lineage(self) -> dict[str, Path]:
        """Its W&B lineage input (``sft``, or ``init`` for a local start model; a hub model has no artifact)."""
        return {self.role: self.local} if self.local is not None else {}

    def card_base(self, recipe: Recipe) -> str | None:
        """The ``base_model`` a stage started here names, when it is not the recipe's (None: the recipe's)."""
        return None if self.role == "sft" else self.base_model(recipe)

    def base_model(self, recipe: Recipe) -> str:
        """The model a derivative of this start names as its ``base_model``: a hub model itself; a checkpoint of this
        pipeline the base its lineage records; any other folder the recipe's ``model.name_or_path``."""
        if self.local is None:
            return self.location
        if self.ours:
            lineage = json.loads((self.local / LINEAGE).read_text(encoding="utf-8"))
            return (lineage.get("base_model") or {}).get("id") or recipe.model.name_or_path
        return recipe.model.name_or_path


def named_start(recipe: Recipe, key: str, value: str) -> Start:
    """The model ``key`` (``ppo.init_from``...) names. A local folder must hold a model (``config.json``); one this
    pipeline wrote must be complete and carry its notices. A hub id is read when the stage loads it (a gated or
    absent one gives the loader's one-line message)."""
    if value.startswith(EMBEDDED_PREFIX):
        return Start(model_location(ModelConfig(name_or_path=value)), value, "init", False)
    if looks_local(value):
        folder = resolve_path(value)
        if not folder.exists():
            raise InputError(f"{key} {value!r}: {folder} does not exist (train it first, or correct the path)")
        if not (folder / MODEL_CONFIG).is_file():
            raise InputError(f"{key} {value!r}: {folder} is not a model folder (it has no {MODEL_CONFIG})")
        ours = (folder / LINEAGE).is_file()
        if ours:
            folder = require_checkpoint(folder, f"the {key} checkpoint")
        return Start(str(folder.resolve()), value, "init", ours)
    return Start(value, value, "init", False)


def sft_start(recipe: Recipe) -> Start:
    path = require_checkpoint(RunDir.of(recipe).stage("sft").final, "the SFT checkpoint (run `make sft` first)")
    return Start(str(path), str(path), "sft", True)


def policy_start(recipe: Recipe, stage: str) -> Start:
    """Where PPO's or DPO's policy and reference start: ``<stage>.init_from``, else the run's SFT checkpoint."""
    init_from = getattr(recipe, stage).init_from
    return named_start(recipe, f"{stage}.init_from", init_from) if init_from else sft_start(recipe)


def rm_start(recipe: Recipe) -> Start:
    """Where the reward model starts: ``rm.init_from``, else PPO's start (``ppo.init_from`` or the SFT checkpoint)."""
    if recipe.rm.init_from:
        return named_start(recipe, "rm.init_from", recipe.rm.init_from)
    return policy_start(recipe, "ppo")


STAGES = ("data", "sft", "rm", "ppo", "dpo", "report")
"""The Makefile's stage targets, in the order a chain runs them."""


def needs(recipe: Recipe, stage: str) -> list[str]:
    """The stages ``stage`` requires under ``recipe``, in the order they run (``data`` first), without itself."""
    direct = {
        "data": [],
        "sft": ["data"],
        "rm": ["data"] + ([] if recipe.rm.init_from or recipe.ppo.init_from else ["sft"]),
        "ppo": ["data"] + ([] if recipe.ppo.init_from else ["sft"]) + (["rm"] if recipe.ppo.uses_reward_model else []),
        "dpo": ["data"] + ([] if recipe.dpo.init_from else ["sft"]),
        "report": ["ppo"],
    }
    if stage not in direct:
        raise ValueError(f"unknown stage {stage!r} (known: {', '.join(direct)})")
    wanted: set[str] = set()
    todo = list(direct[stage])
    while todo:
        s = todo.pop()
        if s not in wanted:
            wanted.add(s)
            todo.extend(direct[s])
    return [s for s in STAGES if s in wanted]
