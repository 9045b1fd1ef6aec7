"""Raw rows from local files (JSONL, JSON, Parquet, CSV) and hub datasets, each with its location.

Local files are read here, line by line, rather than through ``datasets``' loaders, so that a broken line, invalid
UTF-8 or a non-object row becomes an error naming the file and the line instead of a traceback from inside a
library, and so that ``on_invalid: skip`` can step over it. Hub datasets go through ``datasets.load_dataset``.

Which recipe paths are local is the caller's decision (``pipeline.core.locations``): a dataset is read from the
files ``data_files`` lists for its local path, or from the hub when it has none.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class DatasetRef(Protocol):
    """What the readers need of a recipe's dataset entry (``pipeline.core.config.DatasetSpec``)."""

    path: str
    format: str
    columns: dict[str, str]
    roles: dict[str, str]
    name: str | None
    split: str
    revision: str | None
    data_files: list[str]
    data_dir: str | None
    streaming: bool
    max_rows: int | None
    select: str
    weight: float | None


class DataError(ValueError):
    """The data stage cannot go on; the message names the file (and row) and the reason."""


@dataclass
class BadRow:
    """A row that could not even be read as an object (broken JSON, invalid UTF-8, not an object)."""

    reason: str


Row = tuple[str, "dict[str, Any] | BadRow"]  # (location, row)


def data_files(path: Path, label: str) -> list[Path]:
    """The data files at a local ``path``: the file itself, or every data file in a folder (``label``: the path as
    the recipe wrote it, for messages)."""
    if not path.exists():
        raise DataError(f"{label}: no such file or folder")
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
        if not files:
            raise DataError(f"{label}: folder has no {'/'.join(SUFFIXES)} files")
        return files
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"{label}: unsupported file type {path.suffix!r} (use {', '.join(SUFFIXES)})")
    return [path]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def input_identity(spec: DatasetRef, files: Sequence[Path]) -> dict:
    """What identifies a dataset's content: each local file's sha256, or the hub id, subset, split and revision."""
    if files:
        return {"files": {str(f): _sha256(f) for f in files}}
    hub = {"id": spec.path, "name": spec.name, "split": spec.split, "revision": spec.revision}
    hub |= {k: v for k, v in (("data_files", spec.data_files), ("data_dir", spec.data_dir)) if v}
    return {"hub": hub}


def iter_rows(spec: DatasetRef, files: Sequence[Path]) -> Iterator[Row]:
    """Every row of a dataset, in order, with a location string like ``file.jsonl:12``: of its local ``files``, or of
    the hub dataset ``spec`` names when there are none. Rows are read as they are asked for."""
    if files:
        for f in files:
            yield from _iter_file(f)
    else:
        yield from _iter_hub(spec)


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _iter_file(path: Path) -> Iterator[Row]:
    name = _display(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            yield from _iter_jsonl(path, name)
        elif suffix == ".json":
            yield from _iter_json(path, name)
        elif suffix == ".parquet":
            yield from _iter_parquet(path, name)
        else:
            yield from _iter_csv(path, name)
    except OSError as e:
        raise DataError(f"{name}: cannot read: {e.strerror or e}") from None


def _object_or_bad(value: Any) -> dict | BadRow:
    if isinstance(value, dict):
        return value
    return BadRow(f"row is not a JSON object (got {type(value).__name__})")


_BOM = b"\xef\xbb\xbf"  # the UTF-8 byte-order mark Windows tools write at the start of a text file


def _iter_jsonl(path: Path, name: str) -> Iterator[Row]:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            if not raw.strip():
                continue  # blank lines are not rows (documented in docs/data.md)
            where = f"{name}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, BadRow(f"invalid UTF-8 at byte {e.start} of the line")
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                yield where, BadRow(f"broken JSON: {e.msg} at column {e.colno}")
                continue
            yield where, _object_or_bad(value)


def _decode(path: Path, name: str) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{name}:{line}: invalid UTF-8 (byte offset {e.start})") from None


def _iter_json(path: Path, name: str) -> Iterator[Row]:
    text = _decode(path, name)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # a .json file holding JSON Lines, as many hub exports do
            yield from _iter_jsonl(path, name)
            return
        raise DataError(f"{name}:{e.lineno}: broken JSON: {e.msg} at column {e.colno}") from None
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(value) == 1 and lists:
            value = lists[0]
        else:
            raise DataError(f"{name}: expected a JSON array of rows (or an object holding one array)")
    if not isinstance(value, list):
        raise DataError(f"{name}: expected a JSON array of rows, got {type(value).__name__}")
    for i, item in enumerate(value):
        yield f"{name}[{i}]", _object_or_bad(item)


def _iter_parquet(path: Path, name: str) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, ValueError) as e:
        raise DataError(f"{name}: not a readable Parquet file: {e}") from None
    index = 0
    for batch in pf.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            yield f"{name} row {index}", row
            index += 1


def _iter_csv(path: Path, name: str) -> Iterator[Row]:
    text = _decode(path, name)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        raise DataError(f"{name}: empty CSV (no header row)")
    try:
        for row in reader:
            where = f"{name}:{reader.line_num}"
            if None in row:
                yield where, BadRow(f"{len(row[None])} more fields than the header has")
                continue
            if any(v is None for v in row.values()):
                yield where, BadRow("fewer fields than the header has")
                continue
            yield where, row
    except csv.Error as e:
        raise DataError(f"{name}:{reader.line_num}: broken CSV: {e}") from None


def hub_location(dataset_id: str) -> str:
    """What ``datasets.load_dataset`` is given for a hub dataset id: the id itself (a test points it at a local
    folder in hub layout, to run the same loading code offline)."""
    return dataset_id


def _iter_hub(spec: DatasetRef) -> Iterator[Row]:
    import datasets

    label = f"hub:{spec.path}" + (f"/{spec.name}" if spec.name else "") + f"[{spec.split}]"
    options: dict[str, Any] = {"name": spec.name, "split": spec.split, "revision": spec.revision}
    if spec.data_files:
        options["data_files"] = list(spec.data_files)
    if spec.data_dir:
        options["data_dir"] = spec.data_dir
    if spec.streaming:
        options["streaming"] = True  # rows arrive as they are downloaded; nothing is held beyond a shard's buffer

    def fail(e: Exception) -> DataError:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return DataError(f"{label}: could not load the hub dataset: {first}")

    try:
        ds = datasets.load_dataset(hub_location(spec.path), **options)
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear line
        raise fail(e) from None
    rows = iter(ds)
    i = 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - a streamed shard that fails mid-way, likewise
            raise fail(e) from None
        yield f"{label} row {i}", row
        i += 1
