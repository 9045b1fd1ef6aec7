"""The data stage: the recipe's datasets -> Gemma control-token ids and loss masks under ``runs/<run>/data/``.

    make data RECIPE=recipes/tiny_ko.yaml
    python -m pipeline.data --recipe recipes/tiny_ko.yaml [key.sub=value ...]

Steps: read every dataset (local files or hub ids), detect or apply its format, convert rows into Gemma turns,
reject bad rows with file, row and reason (or skip them into ``rejects.jsonl`` when ``data.on_invalid: skip``),
take rows (``max_rows``, ``select``, mixing ``weight``), tokenize per turn in batched fast-tokenizer calls (in
worker processes with ``data.num_proc``), apply the length policy (counted), split off eval rows, and write
everything atomically with a manifest. A re-run with the same inputs, data settings and
tokenizer reuses the finished output.

Output (``runs/<run>/data/``):
    sft/{train,eval}.parquet         input_ids, assistant_masks, source
    preference/{train,eval}.parquet  prompt_ids, chosen_ids, rejected_ids, margin, messages, chosen, rejected, source
    prompts/{train,eval}.parquet     prompt_ids, messages, columns (the rows' other columns, JSON), source
    tokenizer/                       the tokenizer every later stage uses (Gemma chat template installed)
    manifest.json, recipe.yaml, rejects.jsonl, COMPLETE
"""

from __future__ import annotations

import array
import dataclasses
import hashlib
import itertools
import json
import sys
import time
from pathlib import Path

from data_prep.encode import (
    Rejects,
    as_dataset,
    encode_records,
    encoded_chunks,
    length_policy,
    read_dataset,
    split_eval,
)
from data_prep.gemma_format import FORMATTER_VERSION, FormatError, GemmaEncoder
from data_prep.overlap import heldout_overlap, heldout_texts
from data_prep.readers import DataError, DatasetRef, data_files, input_identity
from data_prep.selection import ShortOfRows, quotas, take
from pipeline.core.atomic import atomic_dir, clean_stale
from pipeline.core.cli import run_cli
from pipeline.core.config import ConfigError, Recipe, StageData, recipe_hash, to_yaml
from pipeline.core.loading import load_tokenizer, tokenizer_fingerprint
from pipeline.core.locations import dataset_local_path, missing_dataset
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
    path = dataset_local_path(spec.path)
    if path is None:
        return []
    if not path.exists():
        raise DataError(missing_dataset(spec.path))
    return data_files(path, spec.path)


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
CHUNK = 20_000  # records tokenized and written at a time when a split is streamed


def section_records(stage: str, split: str, recipe: Recipe, encoder: GemmaEncoder, rejects: Rejects, inputs: list):
    """The records of ``data.<stage>.<split>``: each dataset as the recipe takes it (``max_rows``, ``select``), and
    for a training split with a total (``data.<stage>.max_rows``) mixed to that total in the ratio of the weights.
    Lazy unless something is sampled or mixed."""
    sd: StageData = getattr(recipe.data, stage)
    specs = getattr(sd, split)
    total = sd.max_rows if split == "train" else None
    seed = recipe.run.seed
    read = []
    for i, spec in enumerate(specs):
        key = f"{seed}:{stage}:{split}:{i}"
        read.append(read_dataset(stage, spec, dataset_files(spec), encoder, rejects, inputs, key, cap=total))
    if total is None:
        return itertools.chain.from_iterable(records for records, _ in read)
    pools = [list(records) for records, _ in read]
    available = [len(p) for p in pools]  # at most the total each: what a share can be drawn from
    weights = [spec.weight for spec in specs] if specs and specs[0].weight is not None else None
    if weights is None:
        # By size: every valid row each dataset has (a random sample reads them all; ``head`` stops at the total).
        sizes = [info["rows_valid"] for _, info in read]
        weights = None if sum(sizes) <= total else [float(n) for n in sizes]
    try:
        shares = quotas(total, available, weights)
    except ShortOfRows as e:
        raise DataError(
            f"data.{stage}.train.{e.index} ({specs[e.index].path}): {e.have} valid rows (after its max_rows), but its "
            f"weight asks for {e.need} of data.{stage}.max_rows {total}: lower the total or its weight"
        ) from None
    if sum(shares) < total:
        _say(f"data.{stage}.max_rows {total}: the datasets have {sum(shares)} valid rows in all; taking every one")
    out = []
    for i, (pool, n, (_, info)) in enumerate(zip(pools, shares, read)):
        out += take(pool, n, specs[i].select, f"{seed}:{stage}:{split}:{i}:share")
        info["rows_taken"] = n
    return out


def build_stage(
    stage: str, recipe: Recipe, encoder: GemmaEncoder, rejects: Rejects, inputs: list[dict], out_dir: Path
):
    """Write ``data.<stage>``'s splits under ``out_dir``; returns (rows per split, how eval rows were chosen). A split
    with a streamed dataset is tokenized and written in chunks."""
    sd: StageData = getattr(recipe.data, stage)
    d = recipe.data
    limit, key = (
        (d.max_prompt_length, "data.max_prompt_length") if stage == "prompts" else (d.max_length, "data.max_length")
    )
    hold_out = "train" in _splits(sd) and not sd.eval and sd.eval_fraction > 0
    counts = {}
    how = "given" if sd.eval else "none"
    for split in _splits(sd):
        t0 = time.perf_counter()
        tap = _Tap()
        records = tap(section_records(stage, split, recipe, encoder, rejects, inputs))
        if any(spec.streaming for spec in getattr(sd, split)):
            counts |= _stream_split(stage, split, records, encoder, recipe, (limit, key), rejects, out_dir, hold_out)
            _check_some(stage, split, tap.n)
            if hold_out and split == "train":
                how = "by prompt" if stage in GROUP_COLUMN else "random"
        else:
            ds = encode_records(stage, records, encoder, d.num_proc)
            _check_some(stage, split, tap.n)
            ds = length_policy(stage, ds, limit, key, d.overlong, rejects)
            _check_kept(stage, split, ds, key, limit)
            parts = {split: ds}
            if split == "train" and hold_out:
                # Preference pairs and PPO prompts are held out by prompt: an eval pair whose prompt was trained on
                # measures memory, not the reward model's reading of a new question. SFT dialogues at random.
                group = GROUP_COLUMN.get(stage)
                parts["train"], parts["eval"] = split_eval(ds, sd.eval_fraction, recipe.run.seed, group)
                how = "by prompt" if group else "random"
                _check_held(stage, len(parts["eval"]))
            for name, part in parts.items():
                path = data_split(out_dir, stage, name)
                path.parent.mkdir(exist_ok=True)
                part.to_parquet(str(path))
                counts[name] = len(part)
        print(f"[data] {stage}/{split}: {counts[split]} rows ({time.perf_counter() - t0:.1f}s)", flush=True)
    if hold_out:
        print(f"[data] {stage}: held out {counts['eval']} of the training rows for eval ({how})", flush=True)
    return counts, how


def _splits(sd: StageData) -> list[str]:
    return [split for split in ("train", "eval") if getattr(sd, split)]


class _Tap:
    """Passes records through, counting them."""

    def __init__(self):
        self.n = 0

    def __call__(self, records):
        for record in records:
            self.n += 1
            yield record


def _check_some(stage: str, split: str, n: int) -> None:
    if not n:
        raise DataError(f"data.{stage}.{split}: every row was rejected (see {REJECTS})")


def _check_kept(stage: str, split: str, n, key: str, limit: int) -> None:
    if len(n) == 0:
        raise DataError(f"data.{stage}.{split}: every row is longer than {key} {limit}")


def _check_held(stage: str, n: int) -> None:
    if n == 0:
        raise DataError(
            f"data.{stage}.eval_fraction: every row has the same prompt, so none can be held out by prompt; "
            f"give data.{stage}.eval instead"
        )


def held_out(key: bytes, seed: int, fraction: float) -> bool:
    """Whether a streamed row goes to eval: a seeded hash of its group key (the prompt's ids, or the row's location)
    below ``fraction``. Equal keys always land on the same side, so a prompt is never on both."""
    h = hashlib.blake2b(key, digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(h, "big") < fraction * 2.0**64


def _group_key(stage: str, row: dict) -> bytes:
    if stage in GROUP_COLUMN:
        return array.array("q", row[GROUP_COLUMN[stage]]).tobytes()
    return row["source"].encode()


def _stream_split(stage, split, records, encoder, recipe: Recipe, limits, rejects, out_dir: Path, hold_out):
    """Tokenize and write a split chunk by chunk (memory bounded by ``CHUNK`` records, whatever the dataset's size);
    with ``hold_out`` the training split's eval rows are chosen by ``held_out``. Returns rows per written split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = recipe.data
    limit, key = limits
    writers: dict[str, pq.ParquetWriter] = {}
    counts = {split: 0} | ({"eval": 0} if hold_out and split == "train" else {})
    fraction = getattr(d, stage).eval_fraction
    try:
        for table in encoded_chunks(stage, records, encoder, d.num_proc, CHUNK):
            ds = length_policy(stage, as_dataset([table]), limit, key, d.overlong, rejects)
            table = ds.with_format("arrow")[:]
            if "margin" in table.column_names:  # all null in one chunk, numbers in another: one type for the file
                i = table.schema.get_field_index("margin")
                table = table.set_column(i, "margin", table.column("margin").cast(pa.float64()))
            parts = {split: table}
            if len(counts) == 2:
                rows = table.select([GROUP_COLUMN.get(stage, "source")]).to_pylist()
                mask = [held_out(_group_key(stage, r), recipe.run.seed, fraction) for r in rows]
                parts = {"train": table.filter(pa.array([not m for m in mask])), "eval": table.filter(pa.array(mask))}
            for name, part in parts.items():
                if name not in writers:
                    path = data_split(out_dir, stage, name)
                    path.parent.mkdir(exist_ok=True)
                    writers[name] = pq.ParquetWriter(str(path), part.schema)
                writers[name].write_table(part)
                counts[name] += part.num_rows
    finally:
        for w in writers.values():
            w.close()
    if counts[split] == 0 and writers:
        raise DataError(f"data.{stage}.{split}: every row is longer than {key} {limit}")
    if "eval" in counts and counts[split]:
        _check_held(stage, counts["eval"])
    return counts


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
    built, eval_split = {}, {}
    with atomic_dir(data_dir, {"stage": "data", "fingerprint": fp}) as tmp:
        for stage in DATA_SECTIONS:
            built[stage], eval_split[stage] = build_stage(stage, recipe, encoder, rejects, inputs, tmp)

        # Held-out prompts must not be trained on: count those a training row also asks, as the report does.
        overlap, per_source = 0, {}
        held_path = data_split(tmp, "prompts", "eval")
        if held_path.is_file():
            per_source, overlap = heldout_overlap(tmp, tokenizer, heldout_texts(held_path))
            if overlap:
                print(f"[data] warning: {overlap} held-out prompts also appear in training data", flush=True)

        counts = {
            stage: dict(splits)
            | {
                "invalid_skipped": rejects.counts[f"{stage}/invalid"],
                "overlong_dropped": rejects.counts[f"{stage}/overlong"],
                "overlong_truncated": rejects.counts[f"{stage}/truncated"],
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
            "heldout_prompt_overlap_by_source": per_source,
            "seconds": round(time.perf_counter() - t_start, 2),
        }
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
