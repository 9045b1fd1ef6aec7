"""The run directory: every folder and file one stage hands to another is named here, and read through here.

    runs/<run>/
      data/                                  the data stage's output (``DataOutput``)
        sft/ preference/ prompts/            {train,eval}.parquet
        tokenizer/                           the tokenizer every later stage uses
        manifest.json  recipe.yaml  rejects.jsonl  COMPLETE
      sft/  rm/  ppo/  dpo/                  a training stage (``StageDir``)
        checkpoints/checkpoint-N/            resumable; COMPLETE once fully written and carrying its notices
        final/                               the finished checkpoint: lineage.json, recipe.yaml, COMPLETE, ...
                                             rm: reward_stats.json; ppo: value/ (the value model, gae only);
                                             LoRA: adapter/
        metrics.jsonl                        ppo: one line per update
        wandb_run.json                       the stage's W&B run (id, project, entity, mode, url); kept to resume it
      report.md  report.json  report/        the run report and its plots
      .data.lock  .report.lock               held while the data stage or the report writes (pipeline.core.writer)
      publish/                               the clean model folder ``make publish`` uploads
      wandb/                                 W&B's local files

A stage never spells a file name of another stage: it asks this module for the path or for a typed reader
(``read_manifest``, ``RewardStats.read``, ``read_lineage``, ``read_metrics``, ``trainer_history``). The completion
marker (``COMPLETE``, written last) is what makes a folder finished; ``require_complete`` refuses anything else.
The reward model's quality gate lives here too, beside the reward statistics it reads.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import InputError

MARKER = "COMPLETE"
MANIFEST = "manifest.json"
RECIPE_FILE = "recipe.yaml"
REJECTS = "rejects.jsonl"
TOKENIZER = "tokenizer"
LINEAGE = "lineage.json"
REWARD_STATS = "reward_stats.json"
METRICS = "metrics.jsonl"
WANDB_RUN = "wandb_run.json"
TRAINER_STATE = "trainer_state.json"
MODEL_CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
CARD_FILE = "README.md"
NOTICE_FILE = "NOTICE"
TERMS = "GEMMA_TERMS_OF_USE"  # + the suffix of the copy it was made from (.md, .html, ...)
DATA_LOCK = ".data.lock"
REPORT_LOCK = ".report.lock"
ADAPTER = "adapter"
VALUE = "value"
DATA_SECTIONS = ("sft", "preference", "prompts")
TRAINING_STAGES = ("sft", "rm", "ppo", "dpo")
# Folders of the run with a W&B run of their own: the training stages and the benchmarks (``make eval``).
TRACKED_STAGES = (*TRAINING_STAGES, "eval")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class IncompleteError(InputError, RuntimeError):
    """A stage output is missing or was never finished."""


# --------------------------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageDir:
    """``runs/<run>/<stage>/`` of a training stage."""

    path: Path
    name: str

    @property
    def final(self) -> Path:
        return self.path / "final"

    @property
    def checkpoints(self) -> Path:
        """Where the resumable ``checkpoint-N`` folders are written."""
        return self.path / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return checkpoint_dir(self.checkpoints, step)

    @property
    def metrics(self) -> Path:
        """One JSON line per PPO update (ppo)."""
        return self.path / METRICS

    @property
    def wandb_run(self) -> Path:
        """The stage's W&B run record (pipeline.core.tracking): a resumed stage continues that run."""
        return self.path / WANDB_RUN


@dataclass(frozen=True)
class RunDir:
    """``runs/<run>/``: the folders of every stage and the report."""

    root: Path

    @classmethod
    def of(cls, recipe: Any) -> RunDir:
        return cls(recipe.run_dir)

    @property
    def data(self) -> Path:
        return self.root / "data"

    def stage(self, name: str) -> StageDir:
        if name not in TRACKED_STAGES:
            raise ValueError(f"no stage {name!r} (stages: {', '.join(TRACKED_STAGES)})")
        return StageDir(self.root / name, name)

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def report_images(self) -> Path:
        return self.root / "report"

    def eval_result(self, stage: str) -> Path:
        """``make eval``'s results for one model (``base`` or a stage), in the eval folder (``stage("eval")``)."""
        return self.stage("eval").path / f"{stage}.json"

    @property
    def publish(self) -> Path:
        """The export ``make publish`` uploads (``--dry-run`` stops there)."""
        return self.root / "publish"

    @property
    def wandb(self) -> Path:
        return self.root / "wandb"


def checkpoint_dir(folder: str | Path, step: int) -> Path:
    """The resumable checkpoint of ``step`` in ``folder`` (the Trainer's own naming, kept for PPO too)."""
    return Path(folder) / f"checkpoint-{step}"


def checkpoints(folder: str | Path) -> list[Path]:
    """The ``checkpoint-N`` directories in ``folder``, complete or not, oldest (smallest N) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


# --------------------------------------------------------------------------------------------------------------
# The completion marker
# --------------------------------------------------------------------------------------------------------------


def is_complete(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def require_complete(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise IncompleteError(f"{what} not found at {path}: run that stage first")
    if not is_complete(path):
        raise IncompleteError(
            f"{what} at {path} is incomplete (no {MARKER} marker): its stage was interrupted; re-run that stage"
        )
    return path


def read_marker(path: str | Path) -> dict:
    """What a completion marker records (its stage, kind, finish time); {} when there is none or it is unreadable."""
    try:
        raw = json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a new file, a rename) durable; best effort where the platform refuses."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_marker(folder: str | Path, info: dict | None = None) -> None:
    """Write the completion marker (last), durably."""
    data = {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(info or {})}
    with open(Path(folder) / MARKER, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())
    fsync_dir(Path(folder))


# --------------------------------------------------------------------------------------------------------------
# The data stage's output
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    """``data/manifest.json``: what the data stage read and wrote."""

    fingerprint: str
    """Identity of the output: inputs' bytes, data settings, tokenizer, formatter version, seed."""
    tokenizer: dict
    """Tokenizer fingerprint: hash, vocab_size, special_ids, chat_template_hash."""
    counts: dict
    """Rows per section and split, with the skipped and dropped counts."""
    seconds: float
    """Wall time of the data stage."""
    raw: dict
    """The whole manifest as written (recorded in every checkpoint's lineage)."""


def read_manifest(data_dir: str | Path) -> Manifest:
    path = Path(data_dir) / MANIFEST
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return Manifest(raw["fingerprint"], raw["tokenizer"], raw["counts"], raw["seconds"], raw)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise IncompleteError(
            f"{path} is not a data stage manifest ({type(e).__name__}: {e}); re-run `make data`"
        ) from None


def write_manifest(folder: str | Path, manifest: dict) -> None:
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")


def data_split(data_dir: str | Path, section: str, split: str) -> Path:
    """``data/<section>/<split>.parquet`` (section: sft, preference or prompts; split: train or eval)."""
    if section not in DATA_SECTIONS:
        raise ValueError(f"no data section {section!r} (sections: {', '.join(DATA_SECTIONS)})")
    return Path(data_dir) / section / f"{split}.parquet"


@dataclass(frozen=True)
class DataOutput:
    """A complete ``data/`` folder as the training stages read it."""

    path: Path
    manifest: Manifest

    @property
    def tokenizer(self) -> Path:
        return self.path / TOKENIZER

    def split(self, section: str, split: str) -> Path | None:
        """The split's parquet file, or None when the recipe gave the section no such split."""
        p = data_split(self.path, section, split)
        return p if p.is_file() else None


def data_output(run: RunDir, what: str = "the data stage output (run `make data` first)") -> DataOutput:
    path = require_complete(run.data, what)
    return DataOutput(path, read_manifest(path))


# --------------------------------------------------------------------------------------------------------------
# What a checkpoint records about itself
# --------------------------------------------------------------------------------------------------------------


def read_lineage(ckpt: str | Path) -> dict | None:
    """A checkpoint's ``lineage.json`` (written with its notices), or None when it has none or it is unreadable."""
    path = Path(ckpt) / LINEAGE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None


def lineage_metrics(ckpt: str | Path) -> dict:
    """The metrics a stage recorded in its checkpoint's lineage ({} when there are none)."""
    return (read_lineage(ckpt) or {}).get("metrics") or {}


def lineage_recipe(ckpt: str | Path, section: str) -> dict:
    """The recipe section (``ppo``, ``dpo``, ...) a checkpoint was written with, from its lineage ({} when there is
    none): what ran, whatever the recipe says now."""
    ran = ((read_lineage(ckpt) or {}).get("recipe") or {}).get(section)
    return ran if isinstance(ran, dict) else {}


def trainer_state(ckpt: str | Path) -> dict:
    """The Trainer's ``trainer_state.json`` of a resumable SFT or RM checkpoint."""
    return json.loads((Path(ckpt) / TRAINER_STATE).read_text(encoding="utf-8"))


def trainer_history(stage: StageDir) -> list[dict]:
    """The Trainer log history of a stage (from its newest resumable checkpoint; [] when there is none)."""
    ckpts = checkpoints(stage.checkpoints)
    return trainer_state(ckpts[-1]).get("log_history", []) if ckpts else []


# --------------------------------------------------------------------------------------------------------------
# PPO's metrics, one line per update
# --------------------------------------------------------------------------------------------------------------


def read_metrics(stage: StageDir) -> list[dict]:
    path = stage.metrics
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def keep_metrics_until(stage: StageDir, update: int) -> None:
    """Drop the lines after ``update`` (a resumed run rewrites the updates the killed run logged after its last
    checkpoint)."""
    stage.path.mkdir(parents=True, exist_ok=True)
    kept = [row for row in read_metrics(stage) if row["update"] <= update]
    stage.metrics.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")


def append_metrics(stage: StageDir, row: dict) -> None:
    with open(stage.metrics, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


# --------------------------------------------------------------------------------------------------------------
# The W&B run of each stage (written by pipeline.core.tracking when the stage's run starts)
# --------------------------------------------------------------------------------------------------------------

WANDB_RUN_KEYS = ("id", "project", "entity", "mode", "url")


def read_wandb_run(stage: StageDir) -> dict | None:
    """The stage's W&B run {id, project, entity, mode, url} (``url`` None for a run logged offline), or None when
    the stage has not started one or the record is unreadable."""
    try:
        raw = json.loads(stage.wandb_run.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("id"), str) or not raw["id"]:
        return None
    return {k: raw.get(k) for k in WANDB_RUN_KEYS}


def write_wandb_run(stage: StageDir, record: dict) -> None:
    """Only the record's keys are written (nothing else the caller holds can slip in, a secret least of all)."""
    stage.path.mkdir(parents=True, exist_ok=True)
    tmp = stage.wandb_run.with_name(WANDB_RUN + ".tmp")
    tmp.write_text(json.dumps({k: record.get(k) for k in WANDB_RUN_KEYS}, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, stage.wandb_run)


def wandb_runs(run: RunDir) -> dict[str, dict]:
    """The W&B run of every training stage that started one: stage -> its record (``read_wandb_run``)."""
    return {name: rec for name in TRAINING_STAGES if (rec := read_wandb_run(run.stage(name))) is not None}
