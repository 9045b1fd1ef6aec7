"""Local files and hub-layout datasets: rows with their locations; unreadable rows as BadRow with a reason."""

from __future__ import annotations

import json

import pytest

from data_prep.readers import BadRow, DataError, _iter_hub, iter_rows
from pipeline.core.config import DatasetSpec
from pipeline.data import dataset_files

ROWS = [{"prompt": "가", "completion": "나"}, {"prompt": "다", "completion": "라"}]


def _spec(path, **kw):
    return DatasetSpec(path=str(path), **kw)


def _rows(spec):
    """The rows of a recipe's dataset entry, from its local files or the hub, as the data stage reads them."""
    return iter_rows(spec, dataset_files(spec))


def test_jsonl_rows_with_line_numbers_and_bad_lines(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(
        json.dumps(ROWS[0], ensure_ascii=False).encode()
        + b"\n\n"
        + b'{"prompt": "x", \n'
        + b'{"prompt": "\xff\xfe"}\n'
        + b"[1, 2]\n"
        + json.dumps(ROWS[1], ensure_ascii=False).encode()
        + b"\n"
    )
    rows = list(_rows(_spec(p)))
    assert [w.rsplit(":", 1)[1] for w, _ in rows] == ["1", "3", "4", "5", "6"]
    assert rows[0][1] == ROWS[0] and rows[4][1] == ROWS[1]
    assert isinstance(rows[1][1], BadRow) and "broken JSON" in rows[1][1].reason
    assert isinstance(rows[2][1], BadRow) and "invalid UTF-8" in rows[2][1].reason
    assert isinstance(rows[3][1], BadRow) and "not a JSON object (got list)" in rows[3][1].reason


def test_json_array_object_and_jsonl_inside_json(tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    assert [r for _, r in _rows(_spec(a))] == ROWS
    assert [w for w, _ in _rows(_spec(a))][1].endswith("a.json[1]")
    b = tmp_path / "b.json"
    b.write_text(json.dumps({"data": ROWS}, ensure_ascii=False), encoding="utf-8")
    assert [r for _, r in _rows(_spec(b))] == ROWS
    c = tmp_path / "c.json"
    c.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS), encoding="utf-8")
    assert [r for _, r in _rows(_spec(c))] == ROWS


def test_broken_json_file_names_the_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[\n{"a": 1},\n{"a": }\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.json:3: broken JSON"):
        list(_rows(_spec(p)))


def test_parquet_and_csv(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    rows = list(_rows(_spec(tmp_path / "d.parquet")))
    assert [r for _, r in rows] == ROWS and rows[1][0].endswith("d.parquet row 1")
    (tmp_path / "d.csv").write_text('prompt,completion\n가,나\n"다\n다",라\nonly\n', encoding="utf-8")
    rows = list(_rows(_spec(tmp_path / "d.csv")))
    assert rows[0][1] == {"prompt": "가", "completion": "나"}
    assert rows[1][1] == {"prompt": "다\n다", "completion": "라"} and rows[1][0].endswith("d.csv:4")
    assert isinstance(rows[2][1], BadRow) and "fewer fields" in rows[2][1].reason


def test_csv_invalid_utf8_names_the_line(tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes(b"prompt,completion\na,b\n\xff,c\n")
    with pytest.raises(DataError, match=r"d.csv:3: invalid UTF-8"):
        list(_rows(_spec(p)))


def test_folder_and_missing_path(tmp_path):
    d = tmp_path / "folder"
    d.mkdir()
    for i in range(2):
        (d / f"part{i}.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS), encoding="utf-8")
    assert len(list(_rows(_spec(d)))) == 4
    assert len(list(_rows(_spec(d, max_rows=3)))) == 4  # readers read everything; data_prep.selection takes rows
    with pytest.raises(DataError, match="does not exist"):
        list(_rows(_spec(tmp_path / "nope.jsonl")))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type"):
        list(_rows(_spec(tmp_path / "x.txt")))


def test_hub_loader_on_a_local_directory_in_hub_layout(tmp_path):
    """The hub path goes through datasets.load_dataset; a local repo-layout folder exercises the same code."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = tmp_path / "owner__name"
    (repo / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(ROWS), repo / "data" / "train-00000-of-00001.parquet")
    rows = list(_iter_hub(_spec(repo, split="train")))
    assert [r for _, r in rows] == ROWS
    assert rows[0][0].startswith("hub:") and rows[0][0].endswith("[train] row 0")


def test_unreachable_hub_dataset_is_one_clear_error():
    with pytest.raises(DataError, match=r"hub:nobody/no-such-dataset\[train\]: could not load the hub dataset"):
        list(_rows(DatasetSpec(path="nobody/no-such-dataset")))


BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize("suffix", ["jsonl", "json", "json-lines", "csv"])
def test_files_from_windows_tools_read_with_or_without_a_byte_order_mark(tmp_path, suffix):
    """A UTF-8 byte-order mark and CRLF line ends (what Windows tools export) read as the plain file does; before,
    a JSONL file with a BOM failed on line 1 ("Unexpected UTF-8 BOM")."""
    if suffix == "csv":
        body = "prompt,completion\r\n" + "".join(f"{r['prompt']},{r['completion']}\r\n" for r in ROWS)
    elif suffix == "json":
        body = json.dumps(ROWS, ensure_ascii=False)
    else:  # JSON Lines, in a .jsonl file or in a .json file as many hub exports are
        body = "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in ROWS)
    name = "d.json" if suffix == "json-lines" else f"d.{suffix}"
    plain, marked = tmp_path / "plain" / name, tmp_path / "bom" / name
    for path, data in ((plain, body.encode()), (marked, BOM + body.encode())):
        path.parent.mkdir()
        path.write_bytes(data)
    assert [r for _, r in _rows(_spec(marked))] == [r for _, r in _rows(_spec(plain))] == ROWS


def test_a_byte_order_mark_later_in_a_jsonl_file_is_still_an_error(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(BOM + json.dumps(ROWS[0]).encode() + b"\n" + BOM + json.dumps(ROWS[1]).encode() + b"\n")
    rows = list(_rows(_spec(p)))
    assert rows[0][1] == ROWS[0]
    assert isinstance(rows[1][1], BadRow) and "broken JSON" in rows[1][1].reason  # only the file's start may hold it
