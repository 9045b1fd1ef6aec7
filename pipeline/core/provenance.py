"""Where a checkpoint comes from: the ``Derivation`` a stage describes it with, the ``lineage.json`` record built
from it (parent and inputs nested, recipe, data manifest, commit, metrics), and keeping that record portable (no
absolute path of this machine in anything a checkpoint carries; digests of the full paths so a resumed stage can
still see a changed input). ``pipeline.core.notices`` writes it with the Gemma notices."""

from __future__ import annotations

import hashlib
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.config import recipe_hash, to_dict
from pipeline.core.locations import (
    EMBEDDED_PREFIX,
    REPO_ROOT,
    dataset_is_local,
    is_hub_id,
    looks_local,
    portable,
    scrub_paths,
)
from pipeline.core.rundir import RunDir, read_lineage, wandb_runs


@dataclass
class Derivation:
    """What one stage did to produce a checkpoint."""

    stage: str
    """Pipeline stage: sft, rm or ppo."""
    method: str
    """full, lora (adapter) or lora-merged."""
    run_name: str
    """Recipe run name."""
    base_model: str
    """The original Gemma model (hub id or local path)."""
    base_revision: str | None
    """Hub revision of the base model, when known."""
    parent: str
    """The checkpoint this one was trained from."""
    datasets: list[str]
    """Training data: hub dataset ids or local file paths."""
    recipe: dict
    """The resolved recipe."""
    recipe_hash: str
    """sha256 of the resolved recipe."""
    data_manifest: dict | None = None
    """The data stage's manifest (inputs, counts, tokenizer and template hashes)."""
    metrics: dict = field(default_factory=dict)
    """Final (or current) metrics of the stage."""
    step: int | None = None
    """Optimizer step of an intermediate checkpoint (None: final)."""
    terms_source: str | None = None
    """A local copy of the Gemma Terms of Use to include (recipe's model.terms_of_use)."""
    pipeline_tag: str = "text-generation"
    """Hub pipeline tag of the checkpoint."""
    extra_sections: list[str] = field(default_factory=list)
    """More model-card sections (markdown), e.g. a stage summary."""
    run_root: Path | None = None
    """The run directory: local paths are written relative to it (or to the repository), never absolute."""
    language: list[str] = field(default_factory=list)
    """The model's languages (the card's ``language``)."""
    inputs: dict[str, str] = field(default_factory=dict)
    """Other checkpoints this one was made with, by role (PPO: the reward model); their lineage is recorded."""
    tracking_runs: dict[str, str] = field(default_factory=dict)
    """W&B run URLs of the stages so far, by stage (linked from the card)."""


def stage_derivation(
    recipe,
    stage: str,
    method: str,
    parent: str | Path,
    datasets: list[str],
    data_manifest: dict,
    metrics: dict,
    step: int | None,
    pipeline_tag: str = "text-generation",
    inputs: dict[str, str] | None = None,
    base_model: str | None = None,
) -> Derivation:
    """A stage's Derivation, with everything that comes from the recipe filled in. ``inputs``: other checkpoints the
    stage was made with, by role (PPO: its reward model), recorded in the lineage beside the parent. ``base_model``:
    the model its card names as its base when it is not the recipe's (a stage started from ``init_from``)."""
    run = RunDir.of(recipe)
    return Derivation(
        stage=stage,
        method=method,
        run_name=recipe.run.name,
        base_model=base_model or recipe.model.name_or_path,
        base_revision=None if base_model and base_model != recipe.model.name_or_path else recipe.model.revision,
        parent=str(parent),
        datasets=datasets,
        recipe=to_dict(recipe),
        recipe_hash=recipe_hash(recipe),
        data_manifest=data_manifest,
        metrics=metrics,
        step=step,
        terms_source=recipe.model.terms_of_use,
        pipeline_tag=pipeline_tag,
        run_root=run.root,
        language=list(recipe.publish.language),
        inputs=dict(inputs or {}),
        tracking_runs={stage: r["url"] for stage, r in wandb_runs(run).items() if r.get("url")},
    )


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def hub_datasets(datasets: list[str]) -> list[str]:
    """The hub dataset ids among a recipe's dataset paths (decided on the paths as written: a local folder outside
    the repository is written by its name alone, which could look like a hub id)."""
    return [x for x in datasets if not dataset_is_local(x) and is_hub_id(x)]


def lineage_record(d: Derivation, commit: str) -> dict:
    """``lineage.json``'s content: what a checkpoint was made from, all the way up (the parent's and the inputs' own
    lineage records are nested), with the recipe, the data manifest, the code's commit and the metrics."""
    return {
        "stage": d.stage,
        "method": d.method,
        "step": d.step,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "base_model": {"id": d.base_model, "revision": d.base_revision},
        "parent": d.parent,
        "parent_lineage": read_lineage(d.parent),
        "inputs": {role: {"path": path, "lineage": read_lineage(path)} for role, path in d.inputs.items()},
        "datasets": d.datasets,
        "hub_datasets": hub_datasets(d.datasets),
        "data_manifest": d.data_manifest,
        "recipe_hash": d.recipe_hash,
        "recipe": d.recipe,
        "recipe_path_digests": path_digests(d.recipe, d.run_root),
        "git_commit": commit,
        "metrics": d.metrics,
    }


def flatten(d, prefix: str = "") -> dict:
    """A nested dict as ``{"a.b.c": value}``."""
    if isinstance(d, dict):
        out: dict = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def path_digests(recipe: dict, run_root: Path | None) -> dict[str, str]:
    """For each recipe key whose value is a local path written in a shorter portable form (a file outside the
    repository keeps its name alone), a digest of the full path: the lineage holds no absolute path, yet a resumed
    stage can still tell that ``/data/v1/x.jsonl`` became ``/data/v2/x.jsonl``."""
    return {
        k: hashlib.sha256(v.encode()).hexdigest()[:16]
        for k, v in flatten(recipe).items()
        if isinstance(v, str) and portable(v, run_root) != v
    }


_TEXT_SUFFIXES = (".json", ".md", ".yaml", ".yml", ".txt", ".jinja")
_SCRUB_MAX_BYTES = 16 << 20  # a tokenizer.json of a 262k vocabulary is ~33 MB and names no path


def known_paths(d: Derivation) -> dict[str, str]:
    """The absolute local paths a stage may have handed to other libraries (the base model, the parent, the inputs,
    the data), each with its portable form."""
    out = {}
    for p in [d.base_model, d.parent, *d.inputs.values(), *d.datasets, d.terms_source]:
        if p and not p.startswith(EMBEDDED_PREFIX) and looks_local(p):
            resolved = str(Path(p).expanduser().resolve() if Path(p).expanduser().is_absolute() else REPO_ROOT / p)
            out[resolved] = portable(resolved, d.run_root)
    return out


def scrub_text_files(ckpt: Path, run_root: Path | None, known: dict[str, str] | None = None) -> None:
    """Rewrite absolute local paths that other libraries wrote into a checkpoint's text files (PEFT's
    ``adapter_config.json`` and adapter card name the base model's folder) to their portable forms, so that nothing
    a checkpoint carries names this machine's folders."""
    for f in sorted(ckpt.rglob("*")):
        if not f.is_file() or f.suffix not in _TEXT_SUFFIXES or f.stat().st_size > _SCRUB_MAX_BYTES:
            continue
        text = f.read_text(encoding="utf-8", errors="surrogateescape")
        clean = scrub_paths(text, run_root, known)
        if clean != text:
            f.write_text(clean, encoding="utf-8", errors="surrogateescape")
