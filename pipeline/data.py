"""The data stage: the recipe's datasets -> Gemma control-token ids and loss masks under ``runs/<run>/data/``.

    make data RECIPE=recipes/tiny_ko.yaml
    python -m pipeline.data --recipe recipes/tiny_ko.yaml [key.sub=value ...]

Steps: read every dataset (local files or hub ids), detect or apply its format, convert rows into Gemma turns,
reject bad rows with file, row and reason (or skip them into ``rejects.jsonl`` when ``data.on_invalid: skip``),
tokenize per turn in batched fast-tokenizer calls through ``datasets.map``, drop over-long rows (counted), split
off eval rows, and write everything atomically with a manifest. A re-run with the same inputs, data settings and
tokenizer reuses the finished output.

Output (``runs/<run>/data/``):
    sft/{train,eval}.parquet         input_ids, assistant_masks, source
    preference/{train,eval}.parquet  prompt_ids, chosen_ids, rejected_ids, margin, messages, chosen, rejected, source
    prompts/{train,eval}.parquet     prompt_ids, messages, columns (the rows' other columns, JSON), source
    tokenizer/                       the tokenizer every later stage uses (Gemma chat template installed)
    manifest.json, recipe.yaml, rejects.jsonl, COMPLETE
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

from data_prep.encode import Rejects, drop_overlong, encode_records, read_records, split_eval, user_texts
from data_prep.gemma_format import FORMATTER_VERSION, FormatError, GemmaEncoder
from data_prep.readers import DataError, DatasetRef, data_files, input_identity
from pipeline.core.atomic import atomic_dir, clean_stale
from pipeline.core.cli import run_cli
from pipeline.core.config import ConfigError, Recipe, StageData, recipe_hash, to_yaml
from pipeline.core.loading import load_tokenizer, tokenizer_fingerprint
from pipeline.core.locations import local_path
from pipeline.core.rundir import (
    DATA_LOCK,
    DATA_SECTIONS,
    MARKER,
    RECIPE_FILE,
    REJECTS,
    TOKENIZER,
    IncompleteError,
    RunDir,
    data_split,
    is_complete,
    read_manifest,
    write_manifest,
)
from pipeline.core.topology import Topology
from pipeline.core.writer import wait_until, writer_lock


def dataset_files(spec: DatasetRef) -> list[Path]:
    """The local files of a recipe's dataset entry ([] for a hub dataset id)."""
    path = local_path(spec.path)
    return data_files(path, spec.path) if path is not None else []


def fingerprint(recipe: Recipe, tok_fp: dict) -> str:
    """Identity of the data output: input files' bytes, data settings, tokenizer, formatter version, seed."""
    specs = {}
    for stage in DATA_SECTIONS:
        sd: StageData = getattr(recipe.data, stage)
        specs[stage] = [
            {**dataclasses.asdict(s), **input_identity(s, dataset_files(s)), "split_role": split}
            for split in ("train", "eval")
            for s in getattr(sd, split)
        ]
    blob = json.dumps(
        {
            "data": dataclasses.asdict(recipe.data),
            "inputs": specs,
            "tokenizer": tok_fp,
            "seed": recipe.run.seed,
            "formatter": FORMATTER_VERSION,
            "split": SPLIT_VERSION,
        },
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


GROUP_COLUMN = {"preference": "prompt_ids", "prompts": "prompt_ids"}  # eval_fraction holds out whole prompts
SPLIT_VERSION = "by-prompt-1"  # in the fingerprint: a data folder split another way is rebuilt


def build_stage(stage: str, recipe: Recipe, encoder: GemmaEncoder, rejects: Rejects, inputs: list[dict]):
    sd: StageData = getattr(recipe.data, stage)
    d = recipe.data
    limit, key = (
        (d.max_prompt_length, "data.max_prompt_length") if stage == "prompts" else (d.max_length, "data.max_length")
    )
    out, users = {}, {}
    for split in ("train", "eval"):
        specs = getattr(sd, split)
        if not specs:
            continue
        t0 = time.perf_counter()
        records = read_records(stage, [(spec, dataset_files(spec)) for spec in specs], encoder, rejects, inputs)
        if not records:
            raise DataError(f"data.{stage}.{split}: every row was rejected (see {REJECTS})")
        users[split] = user_texts(stage, records)
        ds = encode_records(stage, records, encoder, d.num_proc)
        ds = drop_overlong(stage, ds, limit, key, d.overlong, rejects)
        if len(ds) == 0:
            raise DataError(f"data.{stage}.{split}: every row is longer than {key} {limit}")
        out[split] = ds
        print(f"[data] {stage}/{split}: {len(ds)} rows ({time.perf_counter() - t0:.1f}s)", flush=True)
    how = "given" if "eval" in out else "none"
    if "train" in out and "eval" not in out and sd.eval_fraction > 0:
        # Preference pairs and PPO prompts are held out by prompt: an eval pair whose prompt was trained on measures
        # memory, not the reward model's reading of a new question. SFT dialogues are held out at random.
        group = GROUP_COLUMN.get(stage)
        out["train"], out["eval"] = split_eval(out["train"], sd.eval_fraction, recipe.run.seed, group)
        how = "by prompt" if group else "random"
        if len(out["eval"]) == 0:
            raise DataError(
                f"data.{stage}.eval_fraction: every row has the same prompt, so none can be held out by prompt; "
                f"give data.{stage}.eval instead"
            )
        print(f"[data] {stage}: held out {len(out['eval'])} of the training rows for eval ({how})", flush=True)
    return out, users, how


def _up_to_date(data_dir: Path, fp: str) -> bool:
    if not is_complete(data_dir):
        return False
    try:
        return read_manifest(data_dir).fingerprint == fp
    except IncompleteError:
        return False


def _say(line: str) -> None:
    print(f"[data] {line}", flush=True)


def run(recipe: Recipe, launch: Topology | None = None) -> Path:
    """Build (or reuse) ``runs/<run>/data``; returns its path. On a machine other than machine 0 of ``launch``,
    wait for machine 0's folder instead."""
    import datasets

    datasets.disable_progress_bars()  # the stage prints its own progress, one line per split
    run_dir = RunDir.of(recipe)
    data_dir = run_dir.data
    tokenizer = load_tokenizer(recipe.tokenizer_model())  # the start model's when a stage starts from one
    fp = fingerprint(recipe, tokenizer_fingerprint(tokenizer))
    timeout = recipe.launch.wait_minutes * 60
    if launch is not None and launch.machine_rank > 0:
        wait_until(
            lambda: _up_to_date(data_dir, fp),
            f"machine 0 to write {data_dir} (its {MARKER} marker, with this recipe's data fingerprint {fp[:12]})",
            timeout,
            _say,
        )
        _say(f"{data_dir} written by machine 0: using it")
        return data_dir
    with writer_lock(run_dir.root / DATA_LOCK, str(data_dir), timeout, _say):
        return _build(recipe, tokenizer, fp)


def _build(recipe: Recipe, tokenizer, fp: str) -> Path:
    """The data folder, under the writer lock: a dead writer's leftovers are cleaned, a finished folder with the same
    fingerprint is reused, anything else is rebuilt."""
    t_start = time.perf_counter()
    run_dir = RunDir.of(recipe)
    data_dir = run_dir.data
    clean_stale(run_dir.root, data_dir.name)
    tok_fp = tokenizer_fingerprint(tokenizer)
    if _up_to_date(data_dir, fp):
        _say(f"{data_dir} is up to date (same inputs, settings and tokenizer): reusing it")
        return data_dir
    if is_complete(data_dir):
        _say(f"inputs or settings changed since {data_dir} was written: rebuilding")
    if not any(getattr(recipe.data, s).train for s in DATA_SECTIONS):
        raise ConfigError("the recipe lists no datasets (data.sft.train, data.preference.train, data.prompts.train)")

    encoder = GemmaEncoder(tokenizer, control_tokens=recipe.data.control_tokens)
    rejects = Rejects(recipe.data.on_invalid)
    inputs: list[dict] = []
    built, users, eval_split = {}, {}, {}
    for stage in DATA_SECTIONS:
        built[stage], users[stage], eval_split[stage] = build_stage(stage, recipe, encoder, rejects, inputs)

    # Held-out prompts must not be trained on: count those that also appear in any training split.
    overlap = 0
    if "eval" in users["prompts"] and recipe.data.prompts.eval:
        train_texts = set().union(*(users[s].get("train", set()) for s in DATA_SECTIONS))
        overlap = len(users["prompts"]["eval"] & train_texts)
        if overlap:
            print(f"[data] warning: {overlap} held-out prompts also appear in training data", flush=True)

    counts = {
        stage: {split: len(ds) for split, ds in splits.items()}
        | {
            "invalid_skipped": rejects.counts[f"{stage}/invalid"],
            "overlong_dropped": rejects.counts[f"{stage}/overlong"],
        }
        for stage, splits in built.items()
    }
    manifest = {
        "fingerprint": fp,
        "formatter_version": FORMATTER_VERSION,
        "tokenizer": tok_fp,
        "model": recipe.model.name_or_path,
        "recipe_hash": recipe_hash(recipe),
        "policy": {
            "on_invalid": recipe.data.on_invalid,
            "overlong": recipe.data.overlong,
            "control_tokens": recipe.data.control_tokens,
            "max_length": recipe.data.max_length,
            "max_prompt_length": recipe.data.max_prompt_length,
        },
        "inputs": inputs,
        "counts": counts,
        "eval_split": eval_split,
        "heldout_prompt_overlap": overlap,
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    with atomic_dir(data_dir, {"stage": "data", "fingerprint": fp}) as tmp:
        for stage, splits in built.items():
            for split, ds in splits.items():
                path = data_split(tmp, stage, split)
                path.parent.mkdir(exist_ok=True)
                ds.to_parquet(str(path))
        tokenizer.save_pretrained(tmp / TOKENIZER)
        with open(tmp / REJECTS, "w", encoding="utf-8") as fh:
            for r in rejects.rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        (tmp / RECIPE_FILE).write_text(to_yaml(recipe), encoding="utf-8")
        write_manifest(tmp, manifest)
    summary = ", ".join(
        f"{stage}: " + " / ".join(f"{k} {v}" for k, v in c.items() if v or k in ("train", "eval"))
        for stage, c in counts.items()
    )
    print(f"[data] wrote {data_dir} in {time.perf_counter() - t_start:.1f}s ({summary})", flush=True)
    if rejects.rows:
        print(
            f"[data] {len(rejects.rows)} rows skipped or dropped, each with its reason in {data_dir / REJECTS}",
            flush=True,
        )
    return data_dir


def _announce_and_run(recipe: Recipe, launch: Topology) -> None:
    print(f"[data] resolved recipe:\n{to_yaml(recipe)}", flush=True)
    try:
        run(recipe, launch)
    except FormatError as e:  # the tokenizer cannot write Gemma's format at all (not one row)
        raise DataError(f"tokenizer: {e}") from None


def main(argv: list[str] | None = None) -> int:
    return run_cli(
        "data",
        "Format the recipe's datasets into Gemma control-token ids and loss masks.",
        _announce_and_run,
        argv,
        with_launch=True,
    )


if __name__ == "__main__":
    sys.exit(main())
