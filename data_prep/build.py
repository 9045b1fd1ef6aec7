"""The data stage: the recipe's datasets -> Gemma control-token ids and loss masks under ``runs/<run>/data/``.

    make data RECIPE=recipes/tiny_ko.yaml
    python -m data_prep.build --recipe recipes/tiny_ko.yaml [key.sub=value ...]

Steps: read every dataset (local files or hub ids), detect or apply its format, convert rows into Gemma turns,
reject bad rows with file, row and reason (or skip them into ``rejects.jsonl`` when ``data.on_invalid: skip``),
tokenize per turn in batched fast-tokenizer calls through ``datasets.map``, drop over-long rows (counted), split
off eval rows, and write everything atomically with a manifest. A re-run with the same inputs, data settings and
tokenizer reuses the finished output.

Output (``runs/<run>/data/``):
    sft/{train,eval}.parquet         input_ids, assistant_masks, source
    preference/{train,eval}.parquet  prompt_ids, chosen_ids, rejected_ids, margin, messages, chosen, rejected, source
    prompts/{train,eval}.parquet     prompt_ids, messages, source
    tokenizer/                       the tokenizer every later stage uses (Gemma chat template installed)
    manifest.json, recipe.yaml, rejects.jsonl, COMPLETE
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep.formats import detect, map_columns, preference_pair, prompt_turns, sft_dialogue
from data_prep.gemma_format import FORMATTER_VERSION, MODEL, USER, FormatError, GemmaEncoder, Turn
from data_prep.readers import BadRow, DataError, iter_rows, source_files
from pipeline.atomic import atomic_dir, clean_stale, is_complete
from pipeline.config import ConfigError, DatasetSpec, Recipe, StageData, recipe_hash, run_cli, to_yaml
from pipeline.loading import LoadError, load_tokenizer, tokenizer_fingerprint

STAGES = ("sft", "preference", "prompts")
_BATCH = 1000


@dataclass
class Rejects:
    """Rows refused under ``on_invalid: skip`` and rows dropped as over-long, each with its reason."""

    policy: str
    rows: list[dict] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    def invalid(self, stage: str, where: str, reason: str) -> None:
        if self.policy == "error":
            raise DataError(f"{where}: {reason}")
        self.rows.append({"stage": stage, "kind": "invalid", "where": where, "reason": reason})
        self.counts[f"{stage}/invalid"] += 1

    def overlong(self, stage: str, where: str, reason: str, policy: str) -> None:
        if policy == "error":
            raise DataError(f"{where}: {reason} (data.overlong: error)")
        self.rows.append({"stage": stage, "kind": "overlong", "where": where, "reason": reason})
        self.counts[f"{stage}/overlong"] += 1


# --------------------------------------------------------------------------------------------------------------
# Reading: rows -> records (Gemma turns), with detection and row errors
# --------------------------------------------------------------------------------------------------------------

_CONVERT: dict[str, Callable[[str, dict], Any]] = {
    "sft": sft_dialogue,
    "preference": preference_pair,
    "prompts": prompt_turns,
}


def _record_turns(stage: str, record: Any) -> list[Turn]:
    if stage == "preference":
        return [*record.prompt, (MODEL, record.chosen), (MODEL, record.rejected)]
    return record


def read_records(
    stage: str, specs: Iterable[DatasetSpec], encoder: GemmaEncoder, rejects: Rejects, inputs: list[dict]
) -> list[tuple[str, Any]]:
    """Every valid record of ``specs`` with its location; invalid rows raise or go to ``rejects``."""
    records: list[tuple[str, Any]] = []
    for spec in specs:
        fmt = spec.format
        read = kept = 0
        for where, row in iter_rows(spec):
            read += 1
            try:
                if isinstance(row, BadRow):
                    raise FormatError(row.reason)
                row = map_columns(row, spec.columns)
                if fmt == "auto":
                    try:
                        fmt = detect(stage, row)
                    except FormatError as e:
                        raise DataError(f"{where}: {e}") from None
                record = _CONVERT[stage](fmt, row)
                encoder.check_turns(_record_turns(stage, record))
            except FormatError as e:
                rejects.invalid(stage, where, str(e))
                continue
            kept += 1
            records.append((where, record))
        if read == 0:
            raise DataError(f"{spec.path}: no rows")
        inputs.append(
            {
                "stage": stage,
                "path": spec.path,
                "format": fmt,
                "rows_read": read,
                "rows_valid": kept,
                **_input_identity(spec),
            }
        )
    return records


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _input_identity(spec: DatasetSpec) -> dict:
    files = source_files(spec)
    if files:
        return {"files": {str(f): _sha256(f) for f in files}}
    return {"hub": {"id": spec.path, "name": spec.name, "split": spec.split, "revision": spec.revision}}


# --------------------------------------------------------------------------------------------------------------
# Encoding: records -> ids and masks (batched tokenization through datasets.map)
# --------------------------------------------------------------------------------------------------------------


def _columns(stage: str, records: list[tuple[str, Any]]) -> dict[str, list]:
    """Plain columns for ``datasets`` (turns as parallel role/content lists)."""
    cols: dict[str, list] = {"source": [w for w, _ in records]}
    if stage == "preference":
        cols["roles"] = [[r for r, _ in rec.prompt] for _, rec in records]
        cols["contents"] = [[c for _, c in rec.prompt] for _, rec in records]
        cols["chosen"] = [rec.chosen for _, rec in records]
        cols["rejected"] = [rec.rejected for _, rec in records]
        cols["margin"] = [rec.margin for _, rec in records]
    else:
        cols["roles"] = [[r for r, _ in rec] for _, rec in records]
        cols["contents"] = [[c for _, c in rec] for _, rec in records]
    return cols


class BatchEncoder:
    """The ``datasets.map`` function: one fast-tokenizer call per batch for every content in it."""

    def __init__(self, stage: str, encoder: GemmaEncoder):
        self.stage = stage
        self.encoder = encoder

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        enc = self.encoder
        roles, contents = batch["roles"], batch["contents"]
        flat = [c for cs in contents for c in cs]
        if self.stage == "preference":
            flat += batch["chosen"] + batch["rejected"]
        ids = enc.tokenize_contents(flat)
        out: dict[str, list] = {}
        pos = 0
        built = []
        for rs, cs in zip(roles, contents):
            built.append(
                enc.assemble(list(zip(rs, cs)), ids[pos : pos + len(cs)], add_generation_prompt=self.stage != "sft")
            )
            pos += len(cs)
        if self.stage != "sft":  # prompt texts are kept for evaluation and reports (SFT rows are decoded if needed)
            out["messages"] = [
                json.dumps(
                    [{"role": "assistant" if r == MODEL else r, "content": c} for r, c in zip(rs, cs)],
                    ensure_ascii=False,
                )
                for rs, cs in zip(roles, contents)
            ]
        if self.stage == "sft":
            out["input_ids"] = [b.input_ids for b in built]
            out["assistant_masks"] = [b.labels_mask for b in built]
            out["length"] = [len(b.input_ids) for b in built]
        elif self.stage == "preference":
            n = len(roles)
            out["prompt_ids"] = [b.input_ids for b in built]
            out["chosen_ids"] = [enc.response_ids(x) for x in ids[pos : pos + n]]
            out["rejected_ids"] = [enc.response_ids(x) for x in ids[pos + n : pos + 2 * n]]
            out["length"] = [
                len(p) + max(len(c), len(r))
                for p, c, r in zip(out["prompt_ids"], out["chosen_ids"], out["rejected_ids"])
            ]
        else:
            out["prompt_ids"] = [b.input_ids for b in built]
            out["length"] = [len(b.input_ids) for b in built]
        return out


def encode_records(stage: str, records: list[tuple[str, Any]], encoder: GemmaEncoder, num_proc: int):
    """Records -> a Dataset of ids and masks. With workers, ``datasets.map`` spreads the batches over processes;
    with one process the same function runs on the Python lists directly (no Arrow round trip of the input)."""
    import datasets

    cols = _columns(stage, records)
    fn = BatchEncoder(stage, encoder)
    if num_proc > 1 and len(records) >= 2 * _BATCH:
        ds = datasets.Dataset.from_dict(cols)
        return ds.map(
            fn,
            batched=True,
            batch_size=_BATCH,
            num_proc=num_proc,
            remove_columns=["roles", "contents"],
            desc=f"tokenizing {stage}",
            load_from_cache_file=False,
        )
    out: dict[str, list] = {k: v for k, v in cols.items() if k not in ("roles", "contents")}
    for i in range(0, len(records), _BATCH):
        part = fn({k: v[i : i + _BATCH] for k, v in cols.items()})
        for k, v in part.items():
            out.setdefault(k, []).extend(v)
    return datasets.Dataset.from_dict(out)


def drop_overlong(stage: str, ds, limit: int, limit_key: str, policy: str, rejects: Rejects):
    lengths = ds.data.column("length").to_pylist()
    keep = [i for i, n in enumerate(lengths) if n <= limit]
    if len(keep) == len(lengths):
        return ds.remove_columns("length")
    sources = ds.data.column("source").to_pylist()
    for i, n in enumerate(lengths):
        if n > limit:
            rejects.overlong(stage, sources[i], f"too long: {n} tokens > {limit_key} {limit}", policy)
    return ds.select(keep).remove_columns("length")


def split_eval(ds, fraction: float, seed: int):
    """Seeded random split: (train, eval) with ``ceil(fraction * n)`` eval rows (none when fraction is 0)."""
    n = len(ds)
    k = min(n - 1, math.ceil(fraction * n)) if fraction > 0 and n > 1 else 0
    order = list(range(n))
    random.Random(seed).shuffle(order)
    eval_idx = sorted(order[:k])
    train_idx = sorted(order[k:])
    return ds.select(train_idx), ds.select(eval_idx)


# --------------------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------------------


def fingerprint(recipe: Recipe, tok_fp: dict) -> str:
    """Identity of the data output: input files' bytes, data settings, tokenizer, formatter version, seed."""
    specs = {}
    for stage in STAGES:
        sd: StageData = getattr(recipe.data, stage)
        specs[stage] = [
            {**dataclasses.asdict(s), **_input_identity(s), "split_role": split}
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
        },
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _user_texts(stage: str, records: list[tuple[str, Any]]) -> set[str]:
    return {c for _, rec in records for r, c in _record_turns(stage, rec) if r == USER}


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
        records = read_records(stage, specs, encoder, rejects, inputs)
        if not records:
            raise DataError(f"data.{stage}.{split}: every row was rejected (see rejects.jsonl)")
        users[split] = _user_texts(stage, records)
        ds = encode_records(stage, records, encoder, d.num_proc)
        ds = drop_overlong(stage, ds, limit, key, d.overlong, rejects)
        if len(ds) == 0:
            raise DataError(f"data.{stage}.{split}: every row is longer than {key} {limit}")
        out[split] = ds
        print(f"[data] {stage}/{split}: {len(ds)} rows ({time.perf_counter() - t0:.1f}s)", flush=True)
    if "train" in out and "eval" not in out and sd.eval_fraction > 0:
        out["train"], out["eval"] = split_eval(out["train"], sd.eval_fraction, recipe.run.seed)
        print(f"[data] {stage}: held out {len(out['eval'])} of the training rows for eval", flush=True)
    return out, users


def run(recipe: Recipe) -> Path:
    """Build (or reuse) ``runs/<run>/data``; returns its path."""
    import datasets

    datasets.disable_progress_bars()  # the stage prints its own progress, one line per split
    t_start = time.perf_counter()
    data_dir = recipe.run_dir / "data"
    clean_stale(recipe.run_dir)
    tokenizer = load_tokenizer(recipe.model)
    tok_fp = tokenizer_fingerprint(tokenizer)
    fp = fingerprint(recipe, tok_fp)
    if is_complete(data_dir):
        try:
            old = json.loads((data_dir / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        if old.get("fingerprint") == fp:
            print(f"[data] {data_dir} is up to date (same inputs, settings and tokenizer): reusing it", flush=True)
            return data_dir
        print(f"[data] inputs or settings changed since {data_dir} was written: rebuilding", flush=True)
    if not any(getattr(recipe.data, s).train for s in STAGES):
        raise ConfigError("the recipe lists no datasets (data.sft.train, data.preference.train, data.prompts.train)")

    encoder = GemmaEncoder(tokenizer, control_tokens=recipe.data.control_tokens)
    rejects = Rejects(recipe.data.on_invalid)
    inputs: list[dict] = []
    built, users = {}, {}
    for stage in STAGES:
        built[stage], users[stage] = build_stage(stage, recipe, encoder, rejects, inputs)

    # Held-out prompts must not be trained on: count those that also appear in any training split.
    overlap = 0
    if "eval" in users["prompts"] and recipe.data.prompts.eval:
        train_texts = set().union(*(users[s].get("train", set()) for s in STAGES))
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
        "heldout_prompt_overlap": overlap,
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    with atomic_dir(data_dir, {"stage": "data", "fingerprint": fp}) as tmp:
        for stage, splits in built.items():
            for split, ds in splits.items():
                (tmp / stage).mkdir(exist_ok=True)
                ds.to_parquet(str(tmp / stage / f"{split}.parquet"))
        tokenizer.save_pretrained(tmp / "tokenizer")
        with open(tmp / "rejects.jsonl", "w", encoding="utf-8") as fh:
            for r in rejects.rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        (tmp / "recipe.yaml").write_text(to_yaml(recipe), encoding="utf-8")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
    summary = ", ".join(
        f"{stage}: " + " / ".join(f"{k} {v}" for k, v in c.items() if v or k in ("train", "eval"))
        for stage, c in counts.items()
    )
    print(f"[data] wrote {data_dir} in {time.perf_counter() - t_start:.1f}s ({summary})", flush=True)
    if rejects.rows:
        print(
            f"[data] {len(rejects.rows)} rows skipped or dropped, each with its reason in {data_dir / 'rejects.jsonl'}",
            flush=True,
        )
    return data_dir


def _announce_and_run(recipe: Recipe) -> None:
    print(f"[data] resolved recipe:\n{to_yaml(recipe)}", flush=True)
    try:
        run(recipe)
    except FormatError as e:  # the tokenizer cannot write Gemma's format at all (not one row)
        raise DataError(f"tokenizer: {e}") from None


def main(argv: list[str] | None = None) -> int:
    return run_cli(
        "data",
        "Format the recipe's datasets into Gemma control-token ids and loss masks.",
        _announce_and_run,
        argv,
        input_errors=(DataError, LoadError),
    )


if __name__ == "__main__":
    sys.exit(main())
