"""Canonical records -> token ids and loss masks, in batches: reading a dataset's rows into Gemma turns (bad rows
raise or are counted as skipped) and taking them (``data_prep.selection``), batched tokenization (in worker
processes with ``num_proc`` > 1) into Arrow columns, the length policy and the seeded eval split. The data stage (``pipeline.data``) drives these for each section of a recipe.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep.formats import TURN_KEYS, TurnKeys, detect, map_columns, preference_pair, prompt_turns, sft_dialogue
from data_prep.gemma_format import MODEL, FormatError, GemmaEncoder, Turn
from data_prep.readers import BadRow, DataError, DatasetRef, input_identity, iter_rows
from data_prep.selection import counted, take

_BATCH = 1000
WORKER_CHUNK = 5 * _BATCH  # records a worker process tokenizes at a time (data.num_proc > 1)
LOCAL_CHUNK = 10 * _BATCH  # records tokenized at a time in this process


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

    def truncated(self, stage: str, where: str, reason: str) -> None:
        self.rows.append({"stage": stage, "kind": "truncated", "where": where, "reason": reason})
        self.counts[f"{stage}/truncated"] += 1


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


def dataset_records(
    stage: str,
    spec: DatasetRef,
    files: Sequence[Path],
    encoder: GemmaEncoder,
    rejects: Rejects,
    info: dict,
) -> Iterator[tuple[str, Any]]:
    """The valid records of one dataset, lazily, with their locations; invalid rows raise or go to ``rejects``.
    ``info`` counts rows as they pass (``rows_read``, ``rows_valid``) and gets the detected format."""
    fmt = spec.format
    keys = TurnKeys.of(spec.columns, spec.roles)
    renamed = {v for k, v in spec.columns.items() if k not in TURN_KEYS}
    convert = _CONVERT[stage]
    for where, row in iter_rows(spec, files):
        info["rows_read"] += 1
        try:
            if isinstance(row, BadRow):
                raise FormatError(row.reason)
            row = map_columns(row, spec.columns)
            if fmt == "auto":
                try:
                    fmt = detect(stage, row)
                except FormatError as e:
                    raise DataError(f"{where}: {e}") from None
                info["format"] = fmt
            record = convert(fmt, row, keys)
            if stage == "prompts" and renamed:  # a renamed column is read under its recipe name only
                record.columns = {k: v for k, v in record.columns.items() if k not in renamed}
            encoder.check_turns(_record_turns(stage, record))
        except FormatError as e:
            rejects.invalid(stage, where, str(e))
            continue
        info["rows_valid"] += 1
        yield where, record
    if info["rows_read"] == 0:
        raise DataError(f"{spec.path}: no rows")


def read_dataset(
    stage: str,
    spec: DatasetRef,
    files: Sequence[Path],
    encoder: GemmaEncoder,
    rejects: Rejects,
    inputs: list[dict],
    key: str,
    cap: int | None = None,
) -> tuple[Iterable[tuple[str, Any]], dict]:
    """One dataset's records as the recipe takes them: at most ``max_rows`` (and ``cap``, a section total) by its
    ``select``, seeded by ``key``; lazily when nothing limits them. Its summary (format, rows read, valid and taken,
    content identity) is appended to ``inputs``, filled in as the records are read, and returned with them."""
    info = {
        "stage": stage,
        "path": spec.path,
        "format": spec.format,
        "rows_read": 0,
        "rows_valid": 0,
        "rows_taken": 0,
        "select": spec.select if spec.max_rows is not None or cap is not None else "all",
        **({"weight": spec.weight} if spec.weight is not None else {}),
        **input_identity(spec, files),
    }
    inputs.append(info)
    limits = [n for n in (spec.max_rows, cap) if n is not None]
    records = dataset_records(stage, spec, files, encoder, rejects, info)
    taken = take(records, min(limits) if limits else None, spec.select, key)
    return counted(taken, info, "rows_taken"), info


# --------------------------------------------------------------------------------------------------------------
# Encoding: records -> ids and masks (batched tokenization, in worker processes with num_proc > 1)
# --------------------------------------------------------------------------------------------------------------


def _list_array(rows: list[list[int]], value_type):
    """Lists of ids as one Arrow list column (pyarrow converts the nested lists itself, in C++)."""
    import pyarrow as pa

    return pa.array(rows, type=pa.list_(value_type))


def encode_batch(stage: str, records: Sequence[tuple[str, Any]], encoder: GemmaEncoder) -> dict[str, list]:
    """Ids, masks, lengths (and the prompt texts of preference and prompt rows) of a batch of records, with one
    fast-tokenizer call for every content in it."""
    turns = [rec.prompt if stage == "preference" else rec for _, rec in records]
    flat = [c for ts in turns for _, c in ts]
    if stage == "preference":
        flat += [rec.chosen for _, rec in records] + [rec.rejected for _, rec in records]
    ids = encoder.tokenize_contents(flat)
    out: dict[str, list] = {}
    built, pos = [], 0
    for ts in turns:
        built.append(encoder.assemble(ts, ids[pos : pos + len(ts)], add_generation_prompt=stage != "sft"))
        pos += len(ts)
    if stage != "sft":  # prompt texts are kept for evaluation and reports (SFT rows are decoded if needed)
        out["messages"] = [
            json.dumps([{"role": "assistant" if r == MODEL else r, "content": c} for r, c in ts], ensure_ascii=False)
            for ts in turns
        ]
    if stage == "sft":
        out["input_ids"] = [b.input_ids for b in built]
        out["assistant_masks"] = [b.labels_mask for b in built]
        out["length"] = [len(b.input_ids) for b in built]
    elif stage == "preference":
        n = len(records)
        out["prompt_ids"] = [b.input_ids for b in built]
        out["chosen_ids"] = [encoder.response_ids(x) for x in ids[pos : pos + n]]
        out["rejected_ids"] = [encoder.response_ids(x) for x in ids[pos + n : pos + 2 * n]]
        out["length"] = [
            len(p) + max(len(c), len(r)) for p, c, r in zip(out["prompt_ids"], out["chosen_ids"], out["rejected_ids"])
        ]
        out["chosen"] = [rec.chosen for _, rec in records]
        out["rejected"] = [rec.rejected for _, rec in records]
        out["margin"] = [rec.margin for _, rec in records]
    else:
        out["prompt_ids"] = [b.input_ids for b in built]
        out["length"] = [len(b.input_ids) for b in built]
        # the rows' other columns, for reward functions (one JSON object per row: any schema)
        out["columns"] = [
            json.dumps(getattr(rec, "columns", {}), ensure_ascii=False, default=str) for _, rec in records
        ]
    out["source"] = [w for w, _ in records]
    return out


_ID_COLUMNS = ("input_ids", "assistant_masks", "prompt_ids", "chosen_ids", "rejected_ids")


def _id_types():
    import pyarrow as pa

    return {"input_ids": pa.int32()}


def _encode_table(stage: str, records: Sequence[tuple[str, Any]], encoder: GemmaEncoder):
    """``records`` -> one Arrow table (tokenized ``_BATCH`` records at a time)."""
    import pyarrow as pa

    id_types = _id_types()
    cols: dict[str, list] = {}
    for i in range(0, len(records), _BATCH):
        for k, v in encode_batch(stage, records[i : i + _BATCH], encoder).items():
            cols.setdefault(k, []).extend(v)
    arrays = {k: _list_array(v, id_types.get(k, pa.int64())) if k in _ID_COLUMNS else v for k, v in cols.items()}
    return pa.table({k: arrays[k] for k in (*_ORDER[stage], "length")})


# The columns' order and id types, as the data folders have always had them.
_ORDER = {
    "sft": ("source", "input_ids", "assistant_masks"),
    "preference": ("source", "chosen", "rejected", "margin", "messages", "prompt_ids", "chosen_ids", "rejected_ids"),
    "prompts": ("source", "columns", "messages", "prompt_ids"),
}


_WORKER: tuple | None = None  # (stage, encoder) of a worker process, set once when it starts


def _start_worker(stage: str, encoder: GemmaEncoder) -> None:
    global _WORKER
    _WORKER = (stage, encoder)


def _encode_in_worker(records: list[tuple[str, Any]]):
    stage, encoder = _WORKER
    return _encode_table(stage, records, encoder)


def worker_pool(num_proc: int, stage: str, encoder: GemmaEncoder):
    """Worker processes that hold the encoder from their start: a task carries only its records (the tokenizer, tens
    of MB for Gemma's 262k vocabulary, is not sent with every chunk). Forked where the platform allows it."""
    import multiprocessing as mp

    method = "fork" if "fork" in mp.get_all_start_methods() else None
    return mp.get_context(method).Pool(num_proc, initializer=_start_worker, initargs=(stage, encoder))


def encoded_chunks(stage: str, records: Iterable[tuple[str, Any]], encoder: GemmaEncoder, num_proc: int, chunk: int):
    """Arrow tables of ids and masks (``length`` and ``source`` included), ``chunk`` records at a time, in order.

    ``records`` are consumed lazily. With ``num_proc`` > 1, worker processes tokenize the chunks while this process
    goes on reading and converting rows (its feeder thread pulls ``records``); the tokenizer's own threads are off
    in the workers, so processes, not threads, share the cores."""
    batches = _batches(records, chunk)
    head = list(itertools.islice(batches, 2))
    if num_proc <= 1 or len(head) < 2:  # one chunk in all: starting workers would cost more than it saves
        for part in itertools.chain(head, batches):
            yield _encode_table(stage, part, encoder)
        return
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # inherited by the workers (and no warning about forking)
    try:
        with worker_pool(num_proc, stage, encoder) as pool:
            yield from pool.imap(_encode_in_worker, itertools.chain(head, batches))
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _batches(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while part := list(itertools.islice(it, n)):
        yield part


def as_dataset(tables: list):
    """Arrow tables -> one Dataset (empty, with no columns, when there are none)."""
    import datasets
    import pyarrow as pa

    table = pa.concat_tables(tables) if tables else pa.table({"length": pa.array([], pa.int64())})
    # A fingerprint of our own: datasets would otherwise hash the whole table to make one (nothing is cached here).
    return datasets.Dataset(datasets.table.InMemoryTable(table), fingerprint=f"encoded-{uuid.uuid4().hex}")


def encode_records(stage: str, records: Iterable[tuple[str, Any]], encoder: GemmaEncoder, num_proc: int):
    """Records -> a Dataset of ids and masks (``length`` and ``source`` included), read lazily; with ``num_proc`` > 1
    tokenized in worker processes (``encoded_chunks``)."""
    chunk = WORKER_CHUNK if num_proc > 1 else LOCAL_CHUNK
    return as_dataset(list(encoded_chunks(stage, records, encoder, num_proc, chunk)))


def length_policy(stage: str, ds, limit: int, limit_key: str, policy: str, rejects: Rejects):
    """Rows over ``limit`` tokens dropped (counted), truncated (``truncate``; counted) or refused (``error``).

    Truncation works on ids, so no control token is ever split, and keeps every prompt whole:
    - SFT: the dialogue is cut at ``limit`` and then back to its last trained token, so it ends inside a model turn
      (a cut response, without ``<end_of_turn>``) or right after a complete one (its ``<end_of_turn>``). A dialogue
      whose first model turn starts past the limit keeps nothing to train on and is dropped.
    - Preference: the prompt is kept whole and both responses are cut to the room left; a cut response loses its
      ``<end_of_turn>``. A prompt that leaves no room, or responses that become identical, are dropped.
    - PPO prompts are never cut (a cut prompt is another question): they are dropped as with ``drop``.
    """
    lengths = ds.data.column("length").to_pylist()
    over = [i for i, n in enumerate(lengths) if n > limit]
    if not over:
        return ds.remove_columns("length")
    sources = ds.data.column("source").to_pylist()
    if policy != "truncate" or stage == "prompts":
        for i in over:
            rejects.overlong(stage, sources[i], f"too long: {lengths[i]} tokens > {limit_key} {limit}", policy)
        drop = set(over)
        return ds.select([i for i in range(len(lengths)) if i not in drop]).remove_columns("length")
    cut = _cut_sft if stage == "sft" else _cut_pair
    columns = {c: ds.data.column(c) for c in CUT_COLUMNS[stage]}
    changed: dict[str, dict[int, list[int]]] = {c: {} for c in columns}
    dropped = set()
    for i in over:
        row = {c: col[i].as_py() for c, col in columns.items()}
        why = cut(row, limit)
        if why:
            rejects.overlong(stage, sources[i], f"too long: {lengths[i]} tokens > {limit_key} {limit}, {why}", "drop")
            dropped.add(i)
            continue
        rejects.truncated(stage, sources[i], f"cut from {lengths[i]} to {limit_key} {limit} tokens")
        for c in columns:
            changed[c][i] = row[c]
    ds = ds.remove_columns("length")
    if any(changed.values()):
        import datasets
        import pyarrow as pa

        table = ds.data.table
        for c, rows in changed.items():
            values = columns[c].to_pylist()
            for i, v in rows.items():
                values[i] = v
            index = table.schema.get_field_index(c)
            table = table.set_column(index, c, pa.array(values, type=table.schema.field(c).type))
        ds = datasets.Dataset(datasets.table.InMemoryTable(table))
    if dropped:
        ds = ds.select([i for i in range(len(lengths)) if i not in dropped])
    return ds


CUT_COLUMNS = {"sft": ("input_ids", "assistant_masks"), "preference": ("prompt_ids", "chosen_ids", "rejected_ids")}


def _cut_sft(row: dict, limit: int) -> str | None:
    """Cut ``row`` (ids and mask) in place at ``limit``, then back to its last trained token; the reason it cannot be
    kept, if so."""
    mask = row["assistant_masks"][:limit]
    last = max((i for i, m in enumerate(mask) if m), default=-1)
    if last < 0:
        return "no model turn starts within the limit"
    row["input_ids"] = row["input_ids"][: last + 1]
    row["assistant_masks"] = mask[: last + 1]
    return None


def _cut_pair(row: dict, limit: int) -> str | None:
    room = limit - len(row["prompt_ids"])
    if room < 1:
        return "the prompt alone leaves no room for a response"
    chosen, rejected = row["chosen_ids"][:room], row["rejected_ids"][:room]
    if chosen == rejected:
        return f"chosen and rejected are the same in their first {room} tokens"
    row["chosen_ids"], row["rejected_ids"] = chosen, rejected
    return None


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
