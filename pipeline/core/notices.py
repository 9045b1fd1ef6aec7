"""What makes a saved checkpoint a distributable Gemma model derivative (Gemma Terms of Use, section 3.1).

Every checkpoint directory this pipeline writes, final or intermediate, gets:

* ``NOTICE`` reading exactly ``NOTICE_LINE``;
* a model card ``README.md`` with Hub front matter (``license: gemma``, ``base_model``, tags, datasets), a prominent
  "Modifications" section (stage, method, data, date, recipe hash, parent checkpoint) and the Gemma use
  restrictions stated as binding on recipients;
* a copy of the Gemma Terms of Use when the base model directory, the parent checkpoint or the recipe provides one
  (otherwise the card links to the terms and the stage warns once);
* a modification notice in the metadata of every ``.safetensors`` file and in ``config.json``;
* ``lineage.json``: base model id and revision, data manifest, recipe, git commit, metrics, parent lineage.

``write_notices`` is called by the one save path (pipeline/core/checkpoint.py) before the completion marker, so a
checkpoint without its notices is never complete; ``missing_notices`` checks a directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from data_prep.gemma_format import END_OF_TURN, GENERATION_PROMPT
from pipeline.core.config import recipe_hash, to_dict
from pipeline.core.embedded import EMBEDDED_MODELS, embedded_dir
from pipeline.core.locations import EMBEDDED_PREFIX, REPO_ROOT, is_hub_id, looks_local, portable, scrub_paths
from pipeline.core.rundir import (
    CARD_FILE,
    LINEAGE,
    MODEL_CONFIG,
    NOTICE_FILE,
    RECIPE_FILE,
    TERMS,
    RunDir,
    lineage_metrics,
    read_lineage,
)

NOTICE_LINE = "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms"
TERMS_URL = "https://ai.google.dev/gemma/terms"
PROHIBITED_USE_URL = "https://ai.google.dev/gemma/prohibited_use_policy"
TERMS_FILE = f"{TERMS}.md"  # the copy's name when the source is markdown (its suffix is kept)
_GENERATION_PROMPT_SHOWN = GENERATION_PROMPT.replace("\n", "\\n")  # as written in the card: `...model\n`
CONFIG_NOTICE_KEY = "gemma_derivative"
PROVENANCE = "Provenance files"  # the card section naming the run-directory files a published export leaves out
_TERMS_NAMES = ("gemma_terms_of_use", "terms_of_use", "gemma-terms-of-use", "terms-of-use")
_warned_terms = False


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
) -> Derivation:
    """A stage's Derivation, with everything that comes from the recipe filled in. PPO's reward model is an input of
    its lineage beside the parent (the SFT checkpoint)."""
    from pipeline.core.rundir import wandb_runs

    run = RunDir.of(recipe)
    inputs = {"reward model": str(run.stage("rm").final)} if stage == "ppo" else {}
    return Derivation(
        stage=stage,
        method=method,
        run_name=recipe.run.name,
        base_model=recipe.model.name_or_path,
        base_revision=recipe.model.revision,
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
        inputs=inputs,
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


# --------------------------------------------------------------------------------------------------------------
# Terms of Use copy
# --------------------------------------------------------------------------------------------------------------


def base_model_dir(base_model: str) -> Path | None:
    """The local folder of a recipe's base model (an embedded model's build folder), or None for a hub id."""
    if base_model.startswith(EMBEDDED_PREFIX):
        return embedded_dir(base_model[len(EMBEDDED_PREFIX) :])
    return Path(base_model) if looks_local(base_model) else None


def find_terms(*folders: str | Path | None) -> Path | None:
    """A Gemma Terms of Use file in any of ``folders`` (a base model directory or a parent checkpoint)."""
    for folder in folders:
        if folder is None:
            continue
        folder = Path(folder)
        if folder.is_file():
            return folder
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            stem = p.stem.lower().replace(" ", "_")
            if p.is_file() and any(stem.startswith(n) for n in _TERMS_NAMES):
                return p
    return None


# --------------------------------------------------------------------------------------------------------------
# safetensors metadata, written in place of the header
# --------------------------------------------------------------------------------------------------------------


def add_safetensors_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Merge string ``metadata`` into a .safetensors file's header.

    The safetensors library can only write whole files from tensors in memory; for a multi-GB shard that doubles
    peak memory. The format is an 8-byte little-endian header length, a JSON header (with ``__metadata__``) and
    the raw tensor bytes whose offsets are relative to the end of the header, so the header is rewritten and
    the tensor bytes streamed unchanged into a new file that then replaces the old one.
    """
    with open(path, "rb") as src:
        (n,) = struct.unpack("<Q", src.read(8))
        header = json.loads(src.read(n))
        meta = dict(header.get("__metadata__") or {})
        meta.update({k: str(v) for k, v in metadata.items()})
        header["__metadata__"] = meta
        blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned, as the library writes it
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as dst:
                dst.write(struct.pack("<Q", len(blob)))
                dst.write(blob)
                shutil.copyfileobj(src, dst, 16 << 20)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(n)).get("__metadata__") or {}


# --------------------------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------------------------


def _modification_line(d: Derivation, date: str) -> str:
    what = f"{d.stage.upper()} ({d.method})"
    parent = portable(d.parent, d.run_root)
    return f"Modified by the gemma-rlhf pipeline: {what} on {date} from {parent} (recipe {d.recipe_hash[:12]})"


def hub_base_model(base_model: str) -> str | None:
    """The hub id a card's ``base_model`` can name: the recipe's hub id, the upstream of an embedded model built
    from a hub model, or None (a local folder, or a model built here)."""
    if base_model.startswith(EMBEDDED_PREFIX):
        return getattr(EMBEDDED_MODELS.get(base_model[len(EMBEDDED_PREFIX) :]), "upstream", None)
    return base_model if is_hub_id(base_model) and not looks_local(base_model) else None


def hub_datasets(datasets: list[str]) -> list[str]:
    """The hub dataset ids among a recipe's dataset paths (decided on the paths as written: a local folder outside
    the repository is written by its name alone, which could look like a hub id)."""
    return [x for x in datasets if not looks_local(x) and is_hub_id(x)]


def lineage_datasets(d: Derivation) -> list[tuple[str, str, bool]]:
    """(stage, dataset, whether it is a hub id) for the training data of every stage in a checkpoint's lineage,
    earliest first, once each: the parent's chain, the other inputs' chains (PPO: the reward model's), then this
    stage's own data."""
    found: list[tuple[str, str, bool]] = []

    def walk(lineage: dict | None) -> None:
        if not lineage:
            return
        walk(lineage.get("parent_lineage"))
        for given in (lineage.get("inputs") or {}).values():
            walk(given.get("lineage"))
        # recorded when the lineage was written; a lineage from before that is classified by its names
        hub = set(
            lineage["hub_datasets"] if "hub_datasets" in lineage else hub_datasets(lineage.get("datasets") or [])
        )
        found.extend((lineage.get("stage", "?"), x, x in hub) for x in lineage.get("datasets") or [])

    walk(read_lineage(d.parent))
    for path in d.inputs.values():
        walk(read_lineage(path))
    hub = set(hub_datasets(d.datasets))
    found.extend((d.stage, portable(x, d.run_root), x in hub) for x in d.datasets)
    return list(dict.fromkeys(found))


def model_card(d: Derivation, date: str, commit: str, terms_copy: str | None) -> str:
    """The card; ``terms_copy`` is the file name of the Terms of Use copy beside it (None: there is none)."""
    front: dict = {"license": "gemma", "license_link": TERMS_URL}
    hub_base = hub_base_model(d.base_model)
    if hub_base:
        front.update(base_model=hub_base, base_model_relation="finetune")
    if d.language:
        front["language"] = list(d.language)
    front.update(
        library_name="transformers",
        pipeline_tag=d.pipeline_tag,
        tags=["gemma", "gemma-rlhf", d.stage, "trl"] + (["lora"] if "lora" in d.method else []),
    )
    data = lineage_datasets(d)
    hub = list(dict.fromkeys(x for _, x, is_hub in data if is_hub))
    if hub:
        front["datasets"] = hub
    title = f"{d.run_name} / {d.stage}" + (f" (checkpoint at step {d.step})" if d.step is not None else "")
    data_lines = "\n".join(f"  - {stage}: `{x}`" for stage, x, _ in data) or "  - (none)"
    base = portable(d.base_model, d.run_root)
    terms = (
        f"A copy of the Gemma Terms of Use is included in this directory as `{terms_copy}`; they are also at {TERMS_URL}."
        if terms_copy
        else f"The Gemma Terms of Use are at {TERMS_URL}; recipients must be given a copy of them."
    )
    metrics = "\n".join(
        f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in d.metrics.items()
    )
    sections = [
        "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---",
        f"# {title}",
        f"> **Notice.** {NOTICE_LINE}. This model is a *Gemma model derivative*: it was modified from Gemma, and "
        "its use and distribution are subject to the Gemma Terms of Use and the use restrictions below.",
        "## Modifications\n\n"
        "The files in this directory were modified from the base model by this pipeline:\n\n"
        f"- **Stage:** {d.stage} ({d.method})\n"
        f"- **Base model:** `{base}`" + (f" (revision `{d.base_revision}`)" if d.base_revision else "") + "\n"
        f"- **Parent checkpoint:** `{portable(d.parent, d.run_root)}` (paths are relative to the run directory)\n"
        f"- **Data** (the training data of every stage that led here):\n{data_lines}\n"
        f"- **Date:** {date}\n"
        f"- **Recipe hash:** `{d.recipe_hash}`\n"
        f"- **Pipeline commit:** `{commit}`\n\n"
        f"Every weight file carries this modification notice in its safetensors metadata, and `{MODEL_CONFIG}` "
        f"carries it under `{CONFIG_NOTICE_KEY}`.",
        "## Use restrictions (binding on recipients)\n\n"
        "This model is subject to the use restrictions of section 3.2 of the Gemma Terms of Use. You, and anyone you "
        "distribute it to, must not use it:\n\n"
        f"1. for the restricted uses set out in the Gemma Prohibited Use Policy ({PROHIBITED_USE_URL}), which is "
        "incorporated into the Gemma Terms of Use by reference; or\n"
        "2. in violation of applicable laws and regulations.\n\n"
        "Anyone who distributes this model or a derivative of it must pass these restrictions on in the agreement "
        "governing its use, give recipients a copy of the Gemma Terms of Use, mark modified files with prominent "
        "notices, and include a `NOTICE` file with the text above.",
        f"## Terms of Use\n\n{terms}",
        "## Chat format\n\nGemma's control-token format; the tokenizer's chat template renders it and ends the "
        f"generation prompt with `{_GENERATION_PROMPT_SHOWN}`. A model turn ends with "
        f"`{END_OF_TURN}`: stop generation on that token.",
    ]
    if d.tracking_runs:
        runs = "\n".join(f"- {stage}: {url}" for stage, url in d.tracking_runs.items())
        sections.append(f"## Training runs\n\nWeights & Biases runs of the stages:\n\n{runs}")
    sections.append(
        f"## {PROVENANCE}\n\nThe resolved recipe is in `{RECIPE_FILE}` and the full lineage (base model, parent "
        f"checkpoints, data manifests, metrics) in `{LINEAGE}`."
    )
    if metrics:
        sections.append(f"## Metrics\n\n| metric | value |\n|---|---|\n{metrics}")
    sections.extend(d.extra_sections)
    return "\n\n".join(sections) + "\n"


# --------------------------------------------------------------------------------------------------------------
# Writing and checking
# --------------------------------------------------------------------------------------------------------------


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


def write_notices(ckpt: str | Path, d: Derivation) -> None:
    """Write every notice into the checkpoint directory ``ckpt`` (weights and config already saved there)."""
    global _warned_terms
    ckpt = Path(ckpt)
    date = time.strftime("%Y-%m-%d")
    commit = git_commit()
    modification = _modification_line(d, date)

    (ckpt / NOTICE_FILE).write_text(NOTICE_LINE + "\n", encoding="utf-8")

    terms = find_terms(d.terms_source, d.parent, base_model_dir(d.base_model))
    terms_copy = f"{TERMS}{terms.suffix or '.md'}" if terms is not None else None
    if terms is not None:
        shutil.copyfile(terms, ckpt / terms_copy)
    elif not _warned_terms:
        print(
            f"[notices] warning: no local copy of the Gemma Terms of Use (base model, parent checkpoint or "
            f"model.terms_of_use): the model card links to {TERMS_URL}; recipients of a distributed model must "
            "get a copy",
            file=sys.stderr,
            flush=True,
        )
        _warned_terms = True

    for st in sorted(ckpt.rglob("*.safetensors")):
        add_safetensors_metadata(
            st,
            {
                "gemma_notice": NOTICE_LINE,
                "modification": modification,
                "base_model": portable(d.base_model, d.run_root),
                "recipe_hash": d.recipe_hash,
            },
        )

    for cfg_path in sorted(ckpt.rglob(MODEL_CONFIG)):
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        history = list((cfg.get(CONFIG_NOTICE_KEY) or {}).get("modifications", []))
        if not history or history[-1] != modification:
            history.append(modification)
        cfg[CONFIG_NOTICE_KEY] = {"notice": NOTICE_LINE, "terms": TERMS_URL, "modifications": history}
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    lineage = {
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
    (ckpt / LINEAGE).write_text(
        json.dumps(portable(lineage, d.run_root), indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8"
    )
    recipe = portable(d.recipe, d.run_root)
    (ckpt / RECIPE_FILE).write_text(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True), encoding="utf-8")
    (ckpt / CARD_FILE).write_text(model_card(d, date, commit, terms_copy), encoding="utf-8")
    scrub_text_files(ckpt, d.run_root, known_paths(d))


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


def missing_notices(ckpt: str | Path, lineage: bool = True) -> list[str]:
    """What a checkpoint directory lacks of its notices (empty: all present). A published export carries no
    ``lineage.json`` (``lineage=False``)."""
    ckpt = Path(ckpt)
    missing = []
    notice = ckpt / NOTICE_FILE
    if not notice.is_file() or notice.read_text(encoding="utf-8").strip() != NOTICE_LINE:
        missing.append(NOTICE_FILE)
    card = ckpt / CARD_FILE
    if not card.is_file():
        missing.append(CARD_FILE)
    else:
        text = card.read_text(encoding="utf-8")
        if "license: gemma" not in text or "## Modifications" not in text or "Use restrictions" not in text:
            missing.append(f"{CARD_FILE} (license, Modifications or use restrictions)")
        if NOTICE_LINE not in text:
            missing.append(f"{CARD_FILE} (the notice)")
    if lineage and not (ckpt / LINEAGE).is_file():
        missing.append(LINEAGE)
    for st in sorted(ckpt.rglob("*.safetensors")):
        if read_safetensors_metadata(st).get("gemma_notice") != NOTICE_LINE:
            missing.append(f"{st.relative_to(ckpt)} metadata")
    for cfg in sorted(ckpt.rglob(MODEL_CONFIG)):
        if CONFIG_NOTICE_KEY not in json.loads(cfg.read_text(encoding="utf-8")):
            missing.append(f"{cfg.relative_to(ckpt)} notice")
    return missing


def chain_summary(recipe, sft_dir: Path, rm_dir: Path, metrics: dict) -> str:
    """The PPO model card's account of all three stages, and how to run the model with the right stop token."""
    sft_m, rm_m = lineage_metrics(sft_dir), lineage_metrics(rm_dir)

    def f(v):
        return f"{v:.4g}" if isinstance(v, (int, float)) else "n/a"

    def paths(specs) -> str:
        return ", ".join(f"`{portable(s.path, recipe.run_dir)}`" for s in specs)

    data = recipe.data
    p = recipe.ppo
    ppo = "PPO" if p.estimator == "gae" else f"PPO ({p.estimator}, {p.num_generations} samples per prompt)"
    return "\n".join(
        [
            "## How this model was made",
            "",
            "| stage | data | result |",
            "|---|---|---|",
            f"| SFT | {paths(data.sft.train)} | eval loss {f(sft_m.get('eval/loss'))}, token "
            f"accuracy {f(sft_m.get('eval/mean_token_accuracy'))} |",
            f"| reward model | {paths(data.preference.train)} | held-out pairwise accuracy "
            f"{f(rm_m.get('eval/accuracy'))}, margin {f(rm_m.get('eval/margin'))} |",
            f"| {ppo} | {paths(data.prompts.train)} | {metrics['updates']} updates; score "
            f"{f(metrics['score_first'])} -> {f(metrics['score_last'])}; KL to the SFT model "
            f"{f(metrics['kl_last_10'])} nats per response (last 10 updates) |",
            "",
            "`make report` adds the SFT-vs-PPO evaluation on held-out prompts below.",
            "",
            "## Inference",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'tok = AutoTokenizer.from_pretrained("PATH")',
            'model = AutoModelForCausalLM.from_pretrained("PATH")',
            'ids = tok.apply_chat_template([{"role": "user", "content": "안녕하세요?"}], add_generation_prompt=True,',
            '                              return_tensors="pt", return_dict=True)',
            f'stop = [tok.convert_tokens_to_ids("{END_OF_TURN}"), tok.eos_token_id]  # a model turn ends with {END_OF_TURN}',
            "out = model.generate(**ids, max_new_tokens=256, eos_token_id=stop)",
            'print(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))',
            "```",
        ]
    )


def replace_card_section(ckpt: str | Path, title: str, body: str) -> None:
    """Put a ``## title`` section at the end of a checkpoint's model card, replacing an earlier one of that title,
    atomically (the card is never seen half-written)."""
    card = Path(ckpt) / CARD_FILE
    heading = f"## {title}"
    text = card.read_text(encoding="utf-8")
    if heading in text:
        head, _, rest = text.partition(heading)
        after = rest.split("\n## ", 1)
        text = head + ("## " + after[1] if len(after) > 1 else "")
    tmp = card.with_name(f".{card.name}.tmp")
    tmp.write_text(text.rstrip("\n") + "\n\n" + heading + "\n\n" + body, encoding="utf-8")
    tmp.replace(card)
