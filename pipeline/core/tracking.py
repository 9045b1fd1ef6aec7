"""Weights & Biases for every stage: one W&B run per stage, grouped by the recipe's run name.

The stages log through this one small tracker rather than transformers' WandbCallback because PPO is our own
loop (no Trainer) and every stage must use the same metric names (``stage/group/name``), the same run identity
(a resumed stage continues its W&B run) and the same secret handling. Only the main process logs.

Mode ``auto`` is online when an API key is configured (``WANDB_API_KEY`` or a netrc entry) and offline otherwise.
Keys are read by wandb from the environment only; they are never written into configs, cards or checkpoints.
"""

from __future__ import annotations

import hashlib
import netrc
import os
from pathlib import Path
from typing import Any

from pipeline.core.config import Recipe, recipe_hash, to_dict
from pipeline.core.rundir import RunDir


def resolve_mode(mode: str) -> str:
    if os.environ.get("WANDB_MODE") in ("disabled", "offline", "online") and mode == "auto":
        return os.environ["WANDB_MODE"]
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        rc = netrc.netrc()
        if any(host in rc.hosts for host in ("api.wandb.ai",)):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


class Tracker:
    """Logs metrics and tables to W&B on the main process; does nothing elsewhere or when disabled."""

    def __init__(self, recipe: Recipe, stage: str, is_main: bool, extra_config: dict | None = None):
        self.stage = stage
        self.run = None
        self.mode = resolve_mode(recipe.tracking.mode)
        if not is_main or self.mode == "disabled":
            return
        import wandb

        from pipeline.core.notices import git_commit

        t = recipe.tracking
        wandb_dir = RunDir.of(recipe).wandb
        wandb_dir.mkdir(parents=True, exist_ok=True)
        # A stable id per (run, stage, recipe) so that a resumed stage continues the same W&B run.
        run_id = hashlib.sha256(f"{recipe.run.name}/{stage}/{recipe_hash(recipe)}".encode()).hexdigest()[:16]
        self.run = wandb.init(
            project=t.project,
            entity=t.entity,
            name=t.run_name or f"{recipe.run.name}-{stage}",
            group=recipe.run.name,
            job_type=stage,
            tags=list(t.tags) + [stage],
            id=run_id,
            resume="allow",
            dir=str(wandb_dir),
            mode=self.mode,
            config={
                "recipe": to_dict(recipe),
                "recipe_hash": recipe_hash(recipe),
                "git_commit": git_commit(),
                "stage": stage,
                **(extra_config or {}),
            },
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )
        self.run.define_metric(f"{stage}/step")
        self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")

    @property
    def active(self) -> bool:
        return self.run is not None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log({**metrics, f"{self.stage}/step": step})

    def table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows), f"{self.stage}/step": step})

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None

    @property
    def directory(self) -> Path | None:
        return Path(self.run.dir).parent if self.run is not None else None
