"""Publish a finished model to the Hugging Face Hub: a clean folder that carries the Gemma notices, in one commit.

    make publish RECIPE=recipes/tiny_ko.yaml REPO_ID=user/name [PUBLISH_ARGS="--private --stage sft --dry-run"]
    python -m pipeline.publish --recipe recipes/tiny_ko.yaml --repo-id user/name [--stage sft|rm|ppo|dpo]
                               [--dtype bf16|fp32] [--private] [--dry-run] [key.sub=value ...]

The export (``runs/<run>/publish/``) holds exactly what a user of the model needs: the weights, ``config.json``,
``generation_config.json``, the tokenizer and its chat template, the model card, ``NOTICE`` and the Gemma Terms of
Use copy when the checkpoint has one. It leaves out what belongs to the run directory: the value model (``value/``),
the LoRA adapter (``adapter/``, already merged into the weights), the completion marker, ``lineage.json``,
``recipe.yaml`` and ``reward_stats.json`` (the card keeps their summary: base model, parent, the data of every stage,
recipe hash, commit; a reward model's card states its reward statistics, and its ``config.json`` carries the mean
and std under ``reward_normalization``).

Every stage can be published: ``sft``, ``ppo`` and ``dpo`` as causal language models, ``rm`` as a one-output
sequence classifier (``AutoModelForSequenceClassification``). The weights are written in ``--dtype`` (default: the
precision the run trained in, ``run.precision`` as its lineage records it, ``auto`` resolved as training resolves
it: bf16 on a GPU that supports it, fp32 on a CPU); ``config.json`` names that dtype.

Publishing is refused when the checkpoint is not finished or lacks a notice, when a language model's generation
config does not stop at ``<end_of_turn>`` (the model would run on into an invented next turn under ``generate``), or
when an exported text file or weight header still names a local absolute path. The export is then loaded as a user
loads it (``from_pretrained``, the dtype its config names) and refused when a weight is missing or not in the
dtype, when its logits are not finite, when a language model does not end its turn (greedy, on the recipe's prompt
panel and the data stage's prompts) within ``2 * STOP_CHECK_TOKENS`` tokens on a prompt where the fp32 checkpoint
ends it within ``STOP_CHECK_TOKENS``, or when a reward model's score of a rendered dialogue is not one finite number.

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
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from data_prep.gemma_format import END_OF_TURN, render
from pipeline.core.atomic import staging_dir
from pipeline.core.checkpoint import require_checkpoint
from pipeline.core.cli import add_recipe_arguments, guarded, recipe_from
from pipeline.core.config import ConfigError, Recipe
from pipeline.core.errors import RunError
from pipeline.core.locations import REPO_ROOT, is_hub_id, local_path, path_pattern
from pipeline.core.notices import PROVENANCE, missing_notices, read_safetensors_metadata, replace_card_section
from pipeline.core.reward_stats import RewardStats
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
    TRAINING_STAGES,
    VALUE,
    RunDir,
    data_split,
    lineage_recipe,
)

STAGES = TRAINING_STAGES
CLASSIFIER_STAGES = ("rm",)  # published as a one-output sequence classifier; the others as causal language models
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}  # --dtype -> the torch dtype and config.json's name of it
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
REWARD_SECTION = "Reward statistics"
STOP_CHECK_PROMPTS = 4
"""Prompts the export's stop is checked on: the recipe's ``sft.prompt_panel``, then the data stage's prompts."""
STOP_CHECK_TOKENS = 64
"""A prompt counts when the fp32 checkpoint ends its turn within this many greedy tokens; the export must end it
within twice as many (its own greedy path may differ a little in a lower precision)."""
_TEXT_SUFFIXES = (".json", ".md", ".jinja", ".txt", ".html", ".yaml", ".yml")


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


def _path_after_colon(root: str) -> re.Pattern:
    """``root`` as a path right after a colon, where ``path_pattern`` sees no path start: PEFT's card tags an
    adapter's base as ``base_model:adapter:/abs/folder``."""
    return re.compile(":" + re.escape(root) + r"(/|(?![\w.\-]))")


def local_paths_in(folder: Path, roots: list[str | Path]) -> list[str]:
    """``file: root`` for every text file or weight header under ``folder`` that names one of ``roots`` (absolute
    local folders: the repository, the run directory, the home folder), as a path or right after a colon."""
    needles = [str(Path(r).resolve()) for r in roots if str(Path(r).resolve()) not in ("/", "")]
    patterns = {n: (path_pattern(n), _path_after_colon(n)) for n in needles}
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
        found += [f"{f.relative_to(folder)}: {n}" for n, ps in patterns.items() if any(p.search(text) for p in ps)]
    return found


# ---------------------------------------------------------------------------------------------------------------
# The dtype of the export
# ---------------------------------------------------------------------------------------------------------------


def trained_dtype(ckpt: Path, recipe: Recipe) -> tuple[str, str]:
    """(dtype, how it was found): the precision the checkpoint's run trained in, ``run.precision`` as its lineage
    records it (the recipe's when the lineage has none), ``auto`` resolved as training resolves it
    (``pipeline.core.devices.precision``: bf16 on a GPU that supports it, fp32 otherwise) on this machine. The
    weights cannot tell: every stage saves fp32 weights (bf16 training steps fp32 master weights)."""
    from pipeline.core.devices import precision

    setting = lineage_recipe(ckpt, "run").get("precision") or recipe.run.precision
    if setting in DTYPES:
        return setting, f"run.precision {setting}"
    dtype = "bf16" if precision("auto")["bf16"] else "fp32"
    return dtype, f"run.precision {setting}, resolved on this machine as training resolves it"


def with_dtype(config: dict, dtype: str) -> dict:
    """``config.json``'s content with every dtype field (``dtype``, the older ``torch_dtype``, and those of nested
    sub-configs such as a multimodal model's ``text_config``) naming ``dtype``; ``dtype`` is added at the top when
    the config has none."""
    name = DTYPES[dtype]

    def walk(d: dict) -> dict:
        return {
            k: name if k in ("dtype", "torch_dtype") and isinstance(v, str) else walk(v) if isinstance(v, dict) else v
            for k, v in d.items()
        }

    return {**walk(config), "dtype": name}


def cast_safetensors(src: Path, dst: Path, dtype: str) -> int:
    """Write ``src``'s tensors to ``dst`` with every floating-point tensor in ``dtype``, the header's metadata (the
    Gemma notices) and the file's mode kept; returns the bytes of tensor data written."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    target = getattr(torch, DTYPES[dtype])
    with safe_open(str(src), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors = {k: t.to(target).contiguous() if t.is_floating_point() else t for k, t in tensors.items()}
    save_file(tensors, str(dst), metadata=metadata)
    shutil.copymode(src, dst)  # safetensors creates the file readable by its owner alone
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_weights(ckpt: Path, out: Path, names: list[str], dtype: str) -> None:
    """The checkpoint's weight files among ``names`` written to ``out`` in ``dtype``, with the shard index's total
    size and ``config.json``'s dtype to match."""
    total = sum(cast_safetensors(ckpt / n, out / n, dtype) for n in names if n.endswith(".safetensors"))
    if WEIGHT_INDEX in names:
        index = json.loads((ckpt / WEIGHT_INDEX).read_text(encoding="utf-8"))
        index["metadata"] = {**(index.get("metadata") or {}), "total_size": total}
        (out / WEIGHT_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    config = json.loads((ckpt / MODEL_CONFIG).read_text(encoding="utf-8"))
    (out / MODEL_CONFIG).write_text(
        json.dumps(with_dtype(config, dtype), indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


# ---------------------------------------------------------------------------------------------------------------
# The reward model's card
# ---------------------------------------------------------------------------------------------------------------


def reward_card_section(stats: RewardStats) -> str:
    """The ``Reward statistics`` section of a reward model's card: how to read a score, and the held-out mean and
    std that standardise it."""
    return (
        f"The reward is the classifier's single output (`num_labels: 1`), read at the final `{stats.scored_at}` of "
        "the scored model turn: render the dialogue in the chat format, end it at that token (no newline, no padding "
        "after it) and take `logits[0, 0]`.\n\n"
        "| statistic | value |\n|---|---|\n"
        f"| mean | {stats.mean:.6g} |\n| std | {stats.std:.6g} |\n"
        f"| held-out pairwise accuracy | {stats.accuracy:.4g} |\n| held-out pairs | {stats.pairs} |\n\n"
        f"`mean` and `std` are the mean and the standard deviation of the reward over every response, chosen and "
        f"rejected, of the {stats.pairs} held-out preference pairs. A raw reward's scale is arbitrary (the "
        "pairwise loss fixes only differences between rewards); PPO in this pipeline (`ppo.normalize_reward`) "
        "standardises each score as `(reward - mean) / std`, so 0 is a typical held-out response and 1 is one "
        f"standard deviation above it. `{MODEL_CONFIG}` carries the same two numbers under `reward_normalization`.\n"
    )


# ---------------------------------------------------------------------------------------------------------------
# Checking the export as a user loads it
# ---------------------------------------------------------------------------------------------------------------


def check_prompts(recipe: Recipe, run: RunDir, n: int = STOP_CHECK_PROMPTS) -> list[list[dict]]:
    """Up to ``n`` dialogues to prompt the model with: the recipe's ``sft.prompt_panel``, then the data stage's held-out
    and training prompts."""
    found = [[{"role": "user", "content": p}] for p in recipe.sft.prompt_panel]
    for split in ("eval", "train"):
        found += [json.loads(m) for m in _column(data_split(run.data, "prompts", split), "messages", n)]
    return found[:n]


def check_dialogues(run: RunDir, n: int = 2) -> list[list[dict]]:
    """Up to ``n`` whole dialogues to score: the data stage's preference pairs (held-out first), each prompt with
    its chosen answer as the model's turn."""
    found = []
    for split in ("eval", "train"):
        path = data_split(run.data, "preference", split)
        rows = zip(_column(path, "messages", n), _column(path, "chosen", n))
        found += [[*json.loads(m), {"role": "assistant", "content": c}] for m, c in rows]
    return found[:n]


def _column(path: Path, name: str, n: int) -> list:
    """The first ``n`` values of a parquet file's column ([] when there is no such file)."""
    if not path.is_file():
        return []
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=[name]).column(name).to_pylist()[:n]


@contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers' per-model "Loading weights" progress bars off while the checks load models (the command's
    stderr is its one ``error:`` line), back on afterwards if they were on."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def token_ids(tokenizer: Any, text: str) -> Any:
    """(1, T) ids of rendered text (it carries its own ``<bos>``: none is added)."""
    return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(_device())


def load_export(folder: Path, classifier: bool, dtype: str) -> Any:
    """The model in ``folder`` as a user loads it (``from_pretrained(folder, dtype="auto")``: in the dtype its config
    names), refused when a weight is missing or unexpected, or a parameter is not in ``dtype``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    model, info = auto.from_pretrained(folder, dtype="auto", output_loading_info=True)
    wrong = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(wrong.values()):
        what = ", ".join(f"{k}: {v[:4]}" for k, v in wrong.items() if v)
        raise PublishError(f"the export does not load as a {auto.__name__} ({what})")
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {getattr(torch, DTYPES[dtype])}:
        raise PublishError(f"the {dtype} export loads with parameters in {sorted(map(str, dtypes))}")
    return model.to(_device()).eval()


def greedy_reply(model: Any, tokenizer: Any, messages: list[dict], max_new_tokens: int) -> list[int]:
    """The model's greedy reply to ``messages`` (``render(..., add_generation_prompt=True)``) from a plain
    ``generate``, which stops where the model's generation config says."""
    import torch

    ids = token_ids(tokenizer, render(messages, add_generation_prompt=True))
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
    return out[0, ids.size(1) :].tolist()


def ends_turn(reply: list[int], end_of_turn: int) -> bool:
    """Whether a reply stopped on ``<end_of_turn>`` (its last token; a reply cut at the token limit did not)."""
    return bool(reply) and reply[-1] == end_of_turn


def check_language_model(ckpt: Path, out: Path, dtype: str, prompts: list[list[dict]]) -> str:
    """Refuse an export whose logits are not finite, or that does not end its turn within ``2 *
    STOP_CHECK_TOKENS`` greedy tokens on a prompt where the fp32 checkpoint ends it within ``STOP_CHECK_TOKENS``;
    returns what was checked, in words."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not prompts:
        raise PublishError(
            "no prompt to check the export's stop with: the recipe has no sft.prompt_panel and the data stage wrote no "
            "prompts (run `make data`)"
        )
    tokenizer = AutoTokenizer.from_pretrained(out)
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    source = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).to(_device()).eval()
    before = [greedy_reply(source, tokenizer, p, STOP_CHECK_TOKENS) for p in prompts]
    del source
    ended = [i for i, reply in enumerate(before) if ends_turn(reply, end_of_turn)]
    if not ended:
        raise PublishError(
            f"the checkpoint {ckpt} (fp32) ends its turn with {END_OF_TURN} on none of its {len(prompts)} check "
            f"prompts within {STOP_CHECK_TOKENS} greedy tokens (the recipe's sft.prompt_panel, then the data stage's "
            "prompts), so the export's stop cannot be checked against it, and the model itself does not stop: "
            f"first reply {tokenizer.decode(before[0])!r}"
        )
    model = load_export(out, classifier=False, dtype=dtype)
    with torch.no_grad():
        logits = model(token_ids(tokenizer, render(prompts[0], add_generation_prompt=True))).logits
    if not torch.isfinite(logits).all():
        raise PublishError(f"the {dtype} export's logits are not finite on {prompts[0][-1]['content']!r}")
    for i in ended:
        reply = greedy_reply(model, tokenizer, prompts[i], 2 * STOP_CHECK_TOKENS)
        if not ends_turn(reply, end_of_turn):
            raise PublishError(
                f"the {dtype} export does not end its turn with {END_OF_TURN} within {2 * STOP_CHECK_TOKENS} greedy "
                f"tokens on {prompts[i][-1]['content']!r}, where the fp32 checkpoint ends it after {len(before[i])}: "
                f"{tokenizer.decode(reply)!r}"
            )
    others = len(prompts) - len(ended)
    return (
        f"logits finite, ends its turn within {2 * STOP_CHECK_TOKENS} greedy tokens on each of the {len(ended)} check "
        f"prompts the fp32 checkpoint ends within {STOP_CHECK_TOKENS}"
        + (f" (the fp32 checkpoint itself runs past {STOP_CHECK_TOKENS} on the other {others})" if others else "")
    )


def check_reward_model(out: Path, dtype: str, dialogues: list[list[dict]]) -> str:
    """Refuse an export that does not load as a one-output sequence classifier or whose score of a rendered dialogue
    (ended at its final ``<end_of_turn>``, where the reward is read) is not one finite number; returns what was
    checked, in words."""
    import torch
    from transformers import AutoTokenizer

    if not dialogues:
        raise PublishError(
            "no dialogue to score the reward model's export on: the data stage wrote no preference pairs"
        )
    model = load_export(out, classifier=True, dtype=dtype)
    if model.config.num_labels != 1:
        raise PublishError(f"the reward model's export has {model.config.num_labels} outputs, not 1")
    tokenizer = AutoTokenizer.from_pretrained(out)
    scores = []
    for dialogue in dialogues:
        with torch.no_grad():
            logits = model(token_ids(tokenizer, render(dialogue).rstrip("\n"))).logits
        if tuple(logits.shape) != (1, 1) or not torch.isfinite(logits).all():
            raise PublishError(f"the {dtype} export scores a dialogue as {logits.tolist()}: not one finite number")
        scores.append(float(logits[0, 0]))
    return f"one output, finite scores {', '.join(f'{s:.4g}' for s in scores)} on {len(scores)} rendered dialogues"


# ---------------------------------------------------------------------------------------------------------------
# The export
# ---------------------------------------------------------------------------------------------------------------


def export(recipe: Recipe, stage: str, dtype: str | None = None) -> Path:
    """Write ``runs/<run>/publish/`` from the stage's finished checkpoint in ``dtype`` (default: ``trained_dtype``),
    replacing an earlier export whole, and check it; returns the folder."""
    run = RunDir.of(recipe)
    ckpt = require_checkpoint(run.stage(stage).final, f"the {stage} checkpoint (run `make {stage}` first)")
    classifier = stage in CLASSIFIER_STAGES
    if not classifier:
        check_stops_at_end_of_turn(ckpt)
    dtype, how = (dtype, "--dtype") if dtype else trained_dtype(ckpt, recipe)
    out = run.publish
    tmp = staging_dir(out, tag="export")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        names = exported_names(ckpt)
        for name in names:
            if not name.endswith(".safetensors") and name not in (WEIGHT_INDEX, MODEL_CONFIG):
                shutil.copy2(ckpt / name, tmp / name)
        write_weights(ckpt, tmp, names, dtype)
        card = (tmp / CARD_FILE).read_text(encoding="utf-8")
        (tmp / CARD_FILE).write_text(drop_card_section(card, PROVENANCE), encoding="utf-8")
        if classifier:
            stats = RewardStats.read(ckpt)
            if stats is None:
                raise PublishError(f"the reward model {ckpt} has no {REWARD_STATS}: its card could not state them")
            replace_card_section(tmp, REWARD_SECTION, reward_card_section(stats))
        problems = missing_notices(tmp, lineage=False)
        if problems:
            raise PublishError(f"the export of {ckpt} lacks its Gemma derivative notices: {', '.join(problems)}")
        base = local_path(recipe.model.name_or_path)  # a base model folder outside the repository, if any
        leaks = local_paths_in(tmp, [REPO_ROOT, run.root, Path.home(), *([base] if base else [])])
        if leaks:
            raise PublishError(f"the export of {ckpt} names local folders: {'; '.join(leaks)}")
        if not classifier:
            check_stops_at_end_of_turn(tmp)
        with quiet_loading():
            if classifier:
                checked = check_reward_model(tmp, dtype, check_dialogues(run))
            else:
                checked = check_language_model(ckpt, tmp, dtype, check_prompts(recipe, run))
        print(f"[publish] {stage} in {dtype} ({how}): loads in {dtype}, {checked}", flush=True)
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


def choice(flag: str, value: str, allowed: tuple[str, ...] | list[str]) -> str:
    """``value`` when it is one of ``allowed``, else a one-line ConfigError naming the flag and the choices."""
    if value not in allowed:
        raise ConfigError(f"{flag} {value!r} is not one of: {', '.join(allowed)}")
    return value


def run(
    recipe: Recipe, stage: str, repo_id: str | None, private: bool, dry_run: bool, dtype: str | None = None
) -> Path:
    choice("--stage", stage, STAGES)
    if dtype is not None:
        choice("--dtype", dtype, list(DTYPES))
    repo_id = repo_id or recipe.publish.repo_id
    if not repo_id:
        raise ConfigError("no repository to publish to: give --repo-id (REPO_ID=...) or set publish.repo_id")
    if not is_hub_id(repo_id) or "/" not in repo_id:
        raise ConfigError(f"--repo-id {repo_id!r} is not a hub repository id (owner/name)")
    folder = export(recipe, stage, dtype)
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
    stages = "{" + ",".join(STAGES) + "}"
    ap.add_argument("--stage", default="ppo", metavar=stages, help="which model to publish (default: ppo)")
    dtypes = "{" + ",".join(DTYPES) + "}"
    ap.add_argument(
        "--dtype", metavar=dtypes, help="dtype of the published weights (default: the precision the run trained in)"
    )
    ap.add_argument("--private", action="store_true", help="create the repository as private")
    ap.add_argument("--dry-run", action="store_true", help="write runs/<run>/publish/ and upload nothing")
    args = ap.parse_args(argv)
    return guarded(
        "publish",
        lambda: run(recipe_from(args), args.stage, args.repo_id, args.private, args.dry_run, args.dtype),
    )


if __name__ == "__main__":
    sys.exit(main())
