"""Weights & Biases for every stage: one W&B run per stage, grouped by the recipe's run name.

The stages log through this one small tracker rather than transformers' WandbCallback because PPO is our own
loop (no Trainer) and every stage must use the same metric names (``stage/group/name``), the same run identity
(a resumed stage continues its W&B run) and the same secret handling. Only the main process logs.

Mode ``auto`` is online when an API key is configured (``WANDB_API_KEY`` or a netrc entry) and offline otherwise.
Keys are read by wandb from the environment only; they are never written into configs, cards, checkpoints or the
run record.

Run identity: the first start of a stage draws a random W&B run id and records it, with where the run lives, in the
stage's folder (``StageDir.wandb_run``). A stage that resumes from a checkpoint finds the record and continues that
W&B run; a stage started from scratch (a new run folder, a deleted stage folder or deleted checkpoints) starts a new
W&B run, so two people with the same recipe, or a re-run after
deleting ``runs/<run>``, never write into one run.

W&B never stops a stage: when online start fails (network, credentials, timeout) the stage says so in one line and
logs offline into the same folder (``wandb sync`` uploads it later); when that fails too, it trains untracked.
"""

from __future__ import annotations

import contextlib
import netrc
import os
import re
import secrets
import string
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pipeline.core.config import Recipe, recipe_hash, to_dict
from pipeline.core.rundir import RunDir, checkpoints, is_complete, wandb_runs, write_wandb_run

# W&B's answer when a run id belonged to a run deleted on the server (ids of deleted runs are kept for days):
# "run <entity>/<project>/<id> was previously created and deleted; try a new run name" (HTTP 409; wandb issues
# #1192, #4897, #10669). Matched on the whole error text: when wandb retries it until init_timeout, the message
# follows the timeout on a later line ("while retrying: ...").
_DELETED_RUN = "previously created and deleted"


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


def new_run_id() -> str:
    """A random W&B run id (8 of [a-z0-9], wandb's own format; ``wandb.util.generate_id`` is gone in wandb 0.31)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _public_url(url: str | None) -> str | None:
    """The run URL without any user:password part (a base URL may carry one)."""
    if not url:
        return None
    parts = urlsplit(url)
    if parts.username or parts.password:
        url = urlunsplit(parts._replace(netloc=(parts.hostname or "") + (f":{parts.port}" if parts.port else "")))
    return url


def _reason(error: BaseException) -> str:
    """The first line of an error, without the API key should wandb ever echo it."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    key = os.environ.get("WANDB_API_KEY")
    return text.replace(key, "***") if key else text


def _artifact_name(*parts: str) -> str:
    # W&B artifact names allow letters, digits, '-', '_' and '.'; run names are free text.
    return re.sub(r"[^A-Za-z0-9_.-]", "-", "-".join(parts))


class Tracker:
    """Logs metrics, tables and artifacts to W&B on the main process; does nothing elsewhere or when disabled."""

    def __init__(self, recipe: Recipe, stage: str, is_main: bool, extra_config: dict | None = None):
        self.stage = stage
        self.run = None
        self.recipe = recipe
        self.mode = resolve_mode(recipe.tracking.mode)
        if not is_main or self.mode == "disabled":
            return
        import wandb

        from pipeline.core.provenance import git_commit

        t = recipe.tracking
        run_dir = RunDir.of(recipe)
        run_dir.wandb.mkdir(parents=True, exist_ok=True)
        # Continue the recorded W&B run only when the stage resumes from a checkpoint of that run; a stage trained
        # again from scratch (its checkpoints deleted, as the resume warning advises) starts a new W&B run.
        resumes = any(is_complete(c) for c in checkpoints(run_dir.stage(stage).checkpoints))
        saved = wandb_runs(run_dir).get(stage) if resumes else None
        run_id = saved["id"] if saved else new_run_id()

        def start(run_id: str, mode: str):
            try:
                return init(run_id, mode)
            except Exception:
                # wandb's service process keeps the id of a failed start claimed ("run ID ... is in use"), which
                # would refuse the offline start with that id: a fresh service frees it
                with contextlib.suppress(Exception):
                    wandb.teardown()
                raise

        def init(run_id: str, mode: str):
            return wandb.init(
                project=t.project,
                entity=t.entity,
                name=t.run_name or f"{recipe.run.name}-{stage}",
                group=recipe.run.name,
                job_type=stage,
                tags=list(t.tags) + [stage],
                id=run_id,
                resume="allow",
                dir=str(run_dir.wandb),
                mode=mode,
                config={
                    "recipe": to_dict(recipe),
                    "recipe_hash": recipe_hash(recipe),
                    "git_commit": git_commit(),
                    "stage": stage,
                    **(extra_config or {}),
                },
                settings=wandb.Settings(
                    console="auto" if t.console_logs else "off", x_disable_stats=not t.system_metrics
                ),
            )

        try:
            self.run = start(run_id, self.mode)
        except Exception as e:  # wandb raises its own errors, and OSError, TimeoutError, ... underneath
            if self.mode != "online":
                return self._untracked(f"W&B could not start ({_reason(e)})")
            error = e
            if saved and _DELETED_RUN in str(e):
                run_id = new_run_id()
                print(
                    f"[{stage}] W&B run {saved['id']} was deleted on the server; this stage continues in a new W&B "
                    f"run {run_id}",
                    file=sys.stderr,
                    flush=True,
                )
                try:
                    self.run = start(run_id, "online")
                except Exception as e2:
                    error = e2
            if self.run is None:
                try:
                    self.run = start(run_id, "offline")
                except Exception as e3:
                    return self._untracked(
                        f"W&B could not start online ({_reason(error)}) nor offline ({_reason(e3)})"
                    )
                self.mode = "offline"
                print(
                    f"[{stage}] warning: W&B is unreachable ({_reason(error)}); logging offline instead, upload "
                    f"later with `wandb sync {self.run.settings.sync_dir}`",
                    file=sys.stderr,
                    flush=True,
                )
        write_wandb_run(
            run_dir.stage(stage),
            {
                "id": self.run.id,
                "project": self.run.project or t.project,
                "entity": self.run.entity or t.entity,
                "mode": self.mode,
                "url": _public_url(self.run.url) if self.mode == "online" else None,
            },
        )
        self.run.define_metric(f"{stage}/step")
        self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")

    def _untracked(self, why: str) -> None:
        self.run = None
        print(f"[{self.stage}] warning: {why}; continuing without tracking", file=sys.stderr, flush=True)

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

    def log_lineage(self, final: Path, inputs: dict[str, Path] | None = None) -> None:
        """Log the stage's final checkpoint as a W&B model artifact and declare what it was made from, so W&B
        shows data -> SFT -> RM -> PPO.

        ``inputs`` maps an artifact's name (after ``<run name>-``) to its checkpoint folder, e.g. ``{"sft": ...,
        "rm": ...}``, the names the stages give their own outputs; the data folder (``<run name>-data``) is an input
        of every stage. Everything is referenced by ``file://`` path (W&B stores the files' checksums, not
        the files) unless ``tracking.upload_weights`` is set, which uploads the final checkpoint's files. An input
        is declared by rebuilding the artifact its stage logged from the same folder: the same files give the same
        digest, which W&B resolves to that version. A failure here is one warning line, never a failed stage."""
        if self.run is None or not self.recipe.tracking.log_artifacts:
            return
        try:
            name = self.recipe.run.name
            run_dir = RunDir.of(self.recipe)
            used = [(_artifact_name(name, "data"), "dataset", run_dir.data)]
            used += [(_artifact_name(name, stage), "model", Path(path)) for stage, path in (inputs or {}).items()]
            for artifact_name, kind, path in used:
                self._use(self._artifact(artifact_name, kind, path, upload=False))
            self.run.log_artifact(
                self._artifact(
                    _artifact_name(name, self.stage), "model", Path(final), self.recipe.tracking.upload_weights
                )
            )
        except Exception as e:  # artifact logging is a courtesy: the checkpoint is already saved
            print(
                f"[{self.stage}] warning: W&B artifacts not logged ({_reason(e)}); the checkpoint is at {final}",
                file=sys.stderr,
                flush=True,
            )

    def _artifact(self, name: str, kind: str, path: Path, upload: bool):
        import wandb

        artifact = wandb.Artifact(name, type=kind, metadata={"path": str(path.resolve())})
        if upload:
            # immutable: the finished checkpoint is never rewritten, so wandb uploads it from where it is instead of
            # copying every weight file into its staging area first
            artifact.add_dir(str(path), policy="immutable")
        else:
            artifact.add_reference(path.resolve().as_uri())
        return artifact

    def _use(self, artifact) -> None:
        if self.mode == "online":
            self.run.use_artifact(artifact)
        else:
            # wandb refuses use_artifact offline; this is the record use_artifact writes for a new artifact (log it,
            # mark it used once committed), which `wandb sync` replays.
            self.run._log_artifact(artifact, is_user_created=True, use_after_commit=True)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None

    @property
    def directory(self) -> Path | None:
        return Path(self.run.dir).parent if self.run is not None else None
