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

import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import yaml

from data_prep.gemma_format import END_OF_TURN, GENERATION_PROMPT
from pipeline.core.embedded import EMBEDDED_MODELS, embedded_dir
from pipeline.core.locations import EMBEDDED_PREFIX, is_hub_id, looks_local, portable
from pipeline.core.provenance import (
    Derivation,
    git_commit,
    hub_datasets,
    known_paths,
    lineage_record,
    scrub_text_files,
)
from pipeline.core.rundir import (
    CARD_FILE,
    LINEAGE,
    MODEL_CONFIG,
    NOTICE_FILE,
    RECIPE_FILE,
    TERMS,
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

    lineage = lineage_record(d, commit)
    (ckpt / LINEAGE).write_text(
        json.dumps(portable(lineage, d.run_root), indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8"
    )
    recipe = portable(d.recipe, d.run_root)
    (ckpt / RECIPE_FILE).write_text(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True), encoding="utf-8")
    (ckpt / CARD_FILE).write_text(model_card(d, date, commit, terms_copy), encoding="utf-8")
    scrub_text_files(ckpt, d.run_root, known_paths(d))


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
