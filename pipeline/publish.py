"""Publish a finished model to the Hugging Face Hub: a clean folder that carries the Gemma notices, in one commit.

    make publish RECIPE=recipes/tiny_ko.yaml REPO_ID=user/name [PUBLISH_ARGS="--private --stage sft --dry-run"]
    python -m pipeline.publish --recipe recipes/tiny_ko.yaml --repo-id user/name [--stage ppo|sft] [--private]
                               [--dry-run] [key.sub=value ...]

The export (``runs/<run>/publish/``) holds exactly what a user of the model needs: the weights, ``config.json``,
``generation_config.json``, the tokenizer and its chat template, the model card, ``NOTICE`` and the Gemma Terms of
Use copy when the checkpoint has one. It leaves out what belongs to the run directory: the value model (``value/``),
the LoRA adapter (``adapter/``, already merged into the weights), the completion marker, ``lineage.json`` and
``recipe.yaml`` (the card keeps their summary: base model, parent, the data of every stage, recipe hash, commit).

Publishing is refused when the checkpoint is not finished or lacks a notice, when its generation config does not
stop at ``<end_of_turn>`` (the model would run on into an invented next turn under ``generate``), or when an
exported text file or weight header still names a local absolute path.

The upload is one commit (the repository never shows a half-published model) made with ``huggingface_hub``, with
the token from ``HF_TOKEN`` or the login cache (``hf auth login``); there is no token option, so a token never lands
in a shell history, a Makefile or a log. Files of an earlier upload that the export no longer has are deleted in
the same commit (model files it would write, and run-directory files such as ``value/`` that a plain upload of a
checkpoint folder publishes); other files of the repository are kept and listed. ``--dry-run`` writes the export
and uploads nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from data_prep.gemma_format import END_OF_TURN
from pipeline.core.atomic import staging_dir
from pipeline.core.checkpoint import require_checkpoint
from pipeline.core.cli import add_recipe_arguments, guarded, recipe_from
from pipeline.core.config import ConfigError, Recipe
from pipeline.core.errors import RunError
from pipeline.core.locations import REPO_ROOT, is_hub_id, local_path, path_pattern
from pipeline.core.notices import PROVENANCE, missing_notices, read_safetensors_metadata
from pipeline.core.rundir import (
    ADAPTER,
    CARD_FILE,
    GENERATION_CONFIG,
    LINEAGE,
    MARKER,
    MODEL_CONFIG,
    NOTICE_FILE,
    RECIPE_FILE,
    REWARD_STATS,
    TERMS,
    VALUE,
    RunDir,
)

STAGES = ("ppo", "sft")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
WEIGHT_INDEX = "model.safetensors.index.json"
_TEXT_SUFFIXES = (".json", ".md", ".jinja", ".txt", ".html")


class PublishError(RunError, RuntimeError):
    """The checkpoint cannot be published as it is, or the upload failed."""


def is_model_file(name: str) -> bool:
    """Whether a top-level file name is one a published model carries."""
    keep = {MODEL_CONFIG, GENERATION_CONFIG, CARD_FILE, NOTICE_FILE, WEIGHT_INDEX, *TOKENIZER_FILES}
    return name in keep or name.endswith(".safetensors") or name.startswith(TERMS)


def exported_names(ckpt: Path) -> list[str]:
    """The files of a finished checkpoint that a published model carries (top level only: ``value/`` and
    ``adapter/`` stay in the run directory)."""
    return sorted(p.name for p in ckpt.iterdir() if p.is_file() and is_model_file(p.name))


def stale_files(repo_files: list[str], exported: list[str]) -> tuple[list[str], list[str]]:
    """(delete, keep) among a Hub repository's files that the export does not have. Deleted: model files this
    export would write (an older shard, a tokenizer file the model no longer has) and run-directory files a plain
    upload of a checkpoint folder publishes (``value/``, ``adapter/``, the marker, the lineage, the recipe, reward
    statistics). Kept, and listed: anything else the owner put there (a GGUF, images the card shows)."""
    run_files = {MARKER, LINEAGE, RECIPE_FILE, REWARD_STATS}
    delete, keep = [], []
    for name in repo_files:
        if name in exported or name == ".gitattributes":
            continue
        top = name.split("/", 1)[0]
        ours = ("/" not in name and (is_model_file(name) or name in run_files)) or top in (VALUE, ADAPTER)
        (delete if ours else keep).append(name)
    return delete, keep


def drop_card_section(card: str, title: str) -> str:
    """A model card without its ``## title`` section (the rest unchanged)."""
    heading = f"\n## {title}\n"
    if heading not in card:
        return card
    head, _, rest = card.partition(heading)
    after = rest.split("\n## ", 1)
    return head.rstrip("\n") + "\n" + ("\n## " + after[1] if len(after) > 1 else "")


def check_stops_at_end_of_turn(folder: Path) -> None:
    """Refuse a model whose generation config does not stop at ``<end_of_turn>``."""
    from transformers import AutoTokenizer

    path = folder / GENERATION_CONFIG
    if not path.is_file():
        raise PublishError(f"{folder} has no {GENERATION_CONFIG}: a plain generate() would not stop at {END_OF_TURN}")
    eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    eos = set(eos if isinstance(eos, list) else [eos])
    end_of_turn = AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids(END_OF_TURN)
    if end_of_turn not in eos:
        raise PublishError(
            f"{path}: eos_token_id {sorted(x for x in eos if x is not None)} does not include {END_OF_TURN} "
            f"(id {end_of_turn}): the model would run on past its turn; re-save it with this pipeline"
        )


def local_paths_in(folder: Path, roots: list[str | Path]) -> list[str]:
    """``file: root`` for every exported text file or weight header that names one of ``roots`` (absolute local
    folders: the repository, the run directory, the home folder)."""
    needles = [str(Path(r).resolve()) for r in roots if str(Path(r).resolve()) not in ("/", "")]
    patterns = {n: path_pattern(n) for n in needles}
    found = []
    for f in sorted(folder.rglob("*")):
        if not f.is_file():
            continue
        if f.suffix == ".safetensors":
            text = json.dumps(read_safetensors_metadata(f), ensure_ascii=False)
        elif f.suffix in _TEXT_SUFFIXES or f.name in (NOTICE_FILE,):
            text = f.read_text(encoding="utf-8", errors="replace")
        else:
            continue
        found += [f"{f.relative_to(folder)}: {n}" for n, p in patterns.items() if p.search(text)]
    return found


def export(recipe: Recipe, stage: str) -> Path:
    """Write ``runs/<run>/publish/`` from the stage's finished checkpoint (replacing an earlier export whole) and
    check it; returns the folder."""
    run = RunDir.of(recipe)
    ckpt = require_checkpoint(run.stage(stage).final, f"the {stage} checkpoint (run `make {stage}` first)")
    check_stops_at_end_of_turn(ckpt)
    out = run.publish
    tmp = staging_dir(out, tag="export")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name in exported_names(ckpt):
            shutil.copy2(ckpt / name, tmp / name)
        card = (tmp / CARD_FILE).read_text(encoding="utf-8")
        (tmp / CARD_FILE).write_text(drop_card_section(card, PROVENANCE), encoding="utf-8")
        problems = missing_notices(tmp, lineage=False)
        if problems:
            raise PublishError(f"the export of {ckpt} lacks its Gemma derivative notices: {', '.join(problems)}")
        base = local_path(recipe.model.name_or_path)  # a base model folder outside the repository, if any
        leaks = local_paths_in(tmp, [REPO_ROOT, run.root, Path.home(), *([base] if base else [])])
        if leaks:
            raise PublishError(f"the export of {ckpt} names local folders: {'; '.join(leaks)}")
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def upload(folder: Path, repo_id: str, private: bool, message: str) -> str:
    """One commit that puts ``folder`` in the Hub repository and deletes what ``stale_files`` names; returns the
    commit URL."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    token = get_token()  # HF_TOKEN, then the login cache; never an argument
    if token is None:
        raise PublishError("no Hugging Face token: set HF_TOKEN or run `hf auth login`, then publish again")
    api = HfApi(token=token)
    try:
        # private=None keeps the owner's default visibility for a new repository
        api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
        if private and not api.model_info(repo_id).private:
            # the Hub ignores `private` for a repository that already exists: never publish into a public one
            raise PublishError(
                f"{repo_id} already exists and is public; --private does not change an existing repository (make it "
                "private on the Hub first, or publish without --private)"
            )
        files = sorted(p.name for p in folder.iterdir() if p.is_file())
        stale, kept = stale_files(api.list_repo_files(repo_id), files)
        if kept:
            print(f"[publish] left in {repo_id} (not written by this pipeline): {', '.join(kept)}", flush=True)
        ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]
        ops += [CommitOperationDelete(path_in_repo=name) for name in stale]
        info = api.create_commit(repo_id, operations=ops, commit_message=message)
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "no response"
        raise PublishError(f"upload to {repo_id} failed (HTTP {status}): {str(e).splitlines()[0]}") from None
    except ValueError as e:  # the Hub refused the card's metadata
        raise PublishError(f"upload to {repo_id} refused: {' '.join(str(e).split())}") from None
    except Exception as e:
        # the endpoint cannot be reached: huggingface_hub's HTTP client raises its own transport errors (the httpx
        # family), which share no base class with OSError
        if isinstance(e, OSError) or type(e).__module__.split(".")[0].startswith("httpx"):
            raise PublishError(f"upload to {repo_id} failed: {type(e).__name__}: {e}") from None
        raise
    return info.commit_url


def run(recipe: Recipe, stage: str, repo_id: str | None, private: bool, dry_run: bool) -> Path:
    repo_id = repo_id or recipe.publish.repo_id
    if not repo_id:
        raise ConfigError("no repository to publish to: give --repo-id (REPO_ID=...) or set publish.repo_id")
    if not is_hub_id(repo_id) or "/" not in repo_id:
        raise ConfigError(f"--repo-id {repo_id!r} is not a hub repository id (owner/name)")
    folder = export(recipe, stage)
    files = sorted(p.name for p in folder.iterdir())
    print(f"[publish] exported {stage} to {folder}: {', '.join(files)}", flush=True)
    if dry_run:
        print(f"[publish] dry run: nothing uploaded (would upload to {repo_id})", flush=True)
        return folder
    url = upload(folder, repo_id, private or recipe.publish.private, f"{recipe.run.name}: {stage} model")
    print(f"[publish] uploaded to {repo_id}: {url}", flush=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Publish the final model to the Hugging Face Hub.")
    add_recipe_arguments(ap)
    ap.add_argument("--repo-id", help="hub repository owner/name (default: publish.repo_id)")
    ap.add_argument("--stage", choices=STAGES, default="ppo", help="which model to publish (default: ppo)")
    ap.add_argument("--private", action="store_true", help="create the repository as private")
    ap.add_argument("--dry-run", action="store_true", help="write runs/<run>/publish/ and upload nothing")
    args = ap.parse_args(argv)
    return guarded("publish", lambda: run(recipe_from(args), args.stage, args.repo_id, args.private, args.dry_run))


if __name__ == "__main__":
    sys.exit(main())
