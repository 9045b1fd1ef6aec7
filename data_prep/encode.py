"""Canonical records -> token ids and loss masks, in batches: reading a dataset's rows into Gemma turns (bad rows
raise or are counted as skipped), batched tokenization through ``datasets.map``, the length policy and the seeded
eval split. The data stage (``pipeline.data``) drives these for each section of a recipe.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep.formats import detect, map_columns, preference_pair, prompt_turns, sft_dialogue
from data_prep.gemma_format import MODEL, USER, FormatError, GemmaEncoder, Turn
from data_prep.readers import BadRow, DataError, DatasetRef, input_identity, iter_rows

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
    stage: str,
    sources: Iterable[tuple[DatasetRef, Sequence[Path]]],
    encoder: GemmaEncoder,
    rejects: Rejects,
    inputs: list[dict],
) -> list[tuple[str, Any]]:
    """Every valid record of the ``(dataset, local files)`` sources with its location; invalid rows raise or go to
    ``rejects``; one summary per dataset (format, rows read and valid, content identity) is appended to ``inputs``."""
    records: list[tuple[str, Any]] = []
    for spec, files in sources:
        fmt = spec.format
        read = kept = 0
        for where, row in iter_rows(spec, files):
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
                if stage == "prompts" and spec.columns:  # a renamed column is read under its recipe name only
                    record.columns = {k: v for k, v in record.columns.items() if k not in spec.columns.values()}
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
                **input_identity(spec, files),
            }
        )
    return records


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
    if stage == "prompts":  # the rows' other columns, for reward functions (one JSON object per row: any schema)
        cols["columns"] = [
            json.dumps(getattr(rec, "columns", {}), ensure_ascii=False, default=str) for _, rec in records
        ]
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


def split_eval(ds, fraction: float, seed: int, group_column: str | None = None):
    """Seeded split: (train, eval) with at least ``ceil(fraction * n)`` eval rows (none when fraction is 0).

    With ``group_column`` rows with equal values there (e.g. the same prompt ids) stay on one side: whole groups are
    held out, in a seeded order, until the eval share is reached, so no eval prompt occurs in training. Without it,
    rows are split at random."""
    n = len(ds)
    k = min(n - 1, math.ceil(fraction * n)) if fraction > 0 and n > 1 else 0
    if group_column is None:
        order = list(range(n))
        random.Random(seed).shuffle(order)
        eval_idx = sorted(order[:k])
    else:
        groups: dict[tuple, list[int]] = {}
        for i, key in enumerate(ds[group_column]):
            groups.setdefault(tuple(key) if isinstance(key, list) else (key,), []).append(i)
        keys = list(groups)
        random.Random(seed).shuffle(keys)
        eval_idx = []
        for key in keys[:-1]:  # at least one group stays for training
            if len(eval_idx) >= k:
                break
            eval_idx += groups[key]
        eval_idx.sort()
    held = set(eval_idx)
    return ds.select([i for i in range(n) if i not in held]), ds.select(eval_idx)


def user_texts(stage: str, records: list[tuple[str, Any]]) -> set[str]:
    """Every user turn's text in ``records`` (to find held-out prompts that also occur in training data)."""
    return {c for _, rec in records for r, c in _record_turns(stage, rec) if r == USER}
