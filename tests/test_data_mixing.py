"""Bringing one's own data: turn-key and role mappings, seeded sampling, weighted mixing, truncation of over-long
rows, streamed datasets written in chunks, and mistyped local paths refused; each with the manifest's counts."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.encode import Rejects, length_policy
from data_prep.selection import ShortOfRows, quotas, take_head, take_sample
from pipeline.core.config import ConfigError, load_recipe, validate
from pipeline.data import main as data_main
from tests.helpers import REPO
from tests.helpers.recipes import write_jsonl, write_recipe


def _run(recipe: Path, *overrides: str) -> int:
    return data_main(["--recipe", str(recipe), *overrides])


def _out(tmp_path: Path, name: str = "t") -> Path:
    return tmp_path / "runs" / name / "data"


def _check(recipe: Path) -> None:
    validate(load_recipe(recipe), source=str(recipe))


def _rows(tmp_path: Path, stage: str, split: str = "train", name: str = "t") -> list[dict]:
    return pq.read_table(_out(tmp_path, name) / stage / f"{split}.parquet").to_pylist()


def _manifest(tmp_path: Path, name: str = "t") -> dict:
    return json.loads((_out(tmp_path, name) / "manifest.json").read_text())


def _dialogue(i: int, user: str = "질문", answer: str = "답입니다") -> dict:
    return {
        "messages": [{"role": "user", "content": f"{user} {i}"}, {"role": "assistant", "content": f"{answer} {i}"}]
    }


# ------------------------------------------------------------------------------------------------------------------
# 1. Mappings inside messages
# ------------------------------------------------------------------------------------------------------------------

FROM_VALUE = {
    "conversations": [
        {"from": "사용자", "value": "안녕하세요?"},
        {"from": "bot", "value": "네, 안녕하세요."},
    ]
}


def test_turn_keys_and_role_names_are_mapped_for_every_format_with_turns(tmp_path, tokenizer):
    """Before: from/value messages failed with "missing field 'role'" and a ShareGPT role 'bot' was unknown. The
    mapped rows must give exactly the ids of the same dialogue written in the standard keys."""
    sft = write_jsonl(tmp_path / "sft.jsonl", [FROM_VALUE])
    std = write_jsonl(
        tmp_path / "std.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "안녕하세요?"},
                    {"role": "assistant", "content": "네, 안녕하세요."},
                ]
            }
        ],
    )
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {
                "prompt": [{"speaker": "사용자", "text": "사과는?"}],
                "chosen": [{"speaker": "bot", "text": "좋습니다."}],
                "rejected": [{"speaker": "bot", "text": "몰라."}],
            }
        ],
    )
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl", [{"turns": [{"speaker": "사용자", "text": "하늘은 왜 파래요?"}]}]
    )
    roles = {"bot": "assistant", "사용자": "user"}
    data = {
        "sft": {
            "train": [
                {
                    "path": str(sft),
                    "columns": {"messages": "conversations", "role": "from", "content": "value"},
                    "roles": roles,
                },
                {"path": str(sft), "format": "sharegpt", "roles": roles},
                {"path": str(std)},
            ]
        },
        "preference": {
            "train": [
                {
                    "path": str(pairs),
                    "format": "pairs_messages",
                    "columns": {"role": "speaker", "content": "text"},
                    "roles": roles,
                }
            ]
        },
        "prompts": {
            "train": [
                {
                    "path": str(prompts),
                    "columns": {"messages": "turns", "role": "speaker", "content": "text"},
                    "roles": roles,
                }
            ]
        },
    }
    assert _run(write_recipe(tmp_path, data)) == 0
    sft_rows = _rows(tmp_path, "sft")
    assert len(sft_rows) == 3
    assert sft_rows[0]["input_ids"] == sft_rows[1]["input_ids"] == sft_rows[2]["input_ids"]
    pair = _rows(tmp_path, "preference")[0]
    assert tokenizer.decode(pair["chosen_ids"]) == "좋습니다.<end_of_turn>"
    assert json.loads(pair["messages"]) == [{"role": "user", "content": "사과는?"}]
    prompt = _rows(tmp_path, "prompts")[0]
    assert json.loads(prompt["messages"]) == [{"role": "user", "content": "하늘은 왜 파래요?"}]
    assert json.loads(prompt["columns"]) == {}  # the mapped turn list is not also passed on as a column


def test_without_the_mapping_the_same_rows_are_refused_with_file_line_and_reason(tmp_path, capsys):
    """Negative control for the mapping test: the rows really are in another shape."""
    sft = write_jsonl(tmp_path / "sft.jsonl", [FROM_VALUE])
    recipe = write_recipe(tmp_path, {"sft": {"train": [{"path": str(sft), "columns": {"messages": "conversations"}}]}})
    assert _run(recipe) == 2
    assert "sft.jsonl:1: message 0: missing field 'role'" in capsys.readouterr().err
    recipe = write_recipe(tmp_path, {"sft": {"train": [{"path": str(sft), "format": "sharegpt"}]}}, name="u")
    assert _run(recipe) == 2
    err = capsys.readouterr().err
    assert "sft.jsonl:1: conversations[0]: unknown role '사용자'" in err and "roles:" in err


def test_role_names_must_map_to_known_roles(tmp_path):
    sft = write_jsonl(tmp_path / "sft.jsonl", [FROM_VALUE])
    recipe = write_recipe(tmp_path, {"sft": {"train": [{"path": str(sft), "roles": {"bot": "robot"}}]}})
    with pytest.raises(ConfigError, match=r"data.sft.train.0.roles.bot': 'robot' is not one of system, user"):
        _check(recipe)


# ------------------------------------------------------------------------------------------------------------------
# 2. Seeded sampling and mixing
# ------------------------------------------------------------------------------------------------------------------


def test_reservoir_sample_is_uniform_seeded_and_in_order():
    items = range(1000)
    a, b = take_sample(items, 10, "42:sft:0"), take_sample(items, 10, "42:sft:0")
    assert a == b and a == sorted(a) and len(a) == 10
    assert a != take_sample(items, 10, "43:sft:0")
    assert a != take_head(items, 10)  # not the first rows
    assert take_sample(range(5), 10, "k") == [0, 1, 2, 3, 4]
    # uniform: over many seeds every position is drawn about equally often (10 of 100 each time -> 10% each)
    hits = [0] * 100
    for seed in range(2000):
        for i in take_sample(range(100), 10, f"s{seed}"):
            hits[i] += 1
    assert min(hits) > 140 and max(hits) < 270  # expectation 200; a head or tail bias would leave some near 0


def test_head_stops_reading():
    read = []

    def gen():
        for i in range(100):
            read.append(i)
            yield i

    assert take_head(gen(), 3) == [0, 1, 2] and read == [0, 1, 2]


def test_quotas_sum_to_the_total_in_the_ratio_of_the_weights():
    assert quotas(40, [100, 50], [3.0, 1.0]) == [30, 10]
    assert quotas(10, [100, 100, 100], [1.0, 1.0, 1.0]) == [4, 3, 3]
    assert quotas(30, [100, 50], None) == [20, 10]  # by size
    assert quotas(1000, [100, 50], None) == [100, 50]  # fewer rows than the total: all of them
    with pytest.raises(ShortOfRows) as e:
        quotas(40, [100, 5], [1.0, 1.0])
    assert (e.value.index, e.value.have, e.value.need) == (1, 5, 20)


def test_max_rows_samples_with_the_run_seed_and_the_manifest_counts_every_row(tmp_path):
    """Before: max_rows took the first rows. Now a seeded sample: the same recipe gives the same rows, another seed
    others, head the first ones; the manifest says how many were read, valid and taken."""
    rows = [_dialogue(i) for i in range(60)] + ["{broken"]
    sft = write_jsonl(tmp_path / "sft.jsonl", rows)
    spec = {"path": str(sft), "max_rows": 12}
    extra = {"data": {"sft": {"train": [spec]}, "on_invalid": "skip"}}

    def sources(name, seed=42, **kw):
        recipe = write_recipe(
            tmp_path,
            {**extra["data"], "sft": {"train": [{**spec, **kw}]}},
            name=name,
            extra={"run": {"name": name, "output_dir": str(tmp_path / "runs"), "seed": seed}},
        )
        assert _run(recipe) == 0
        return [Path(r["source"]).name for r in _rows(tmp_path, "sft", name=name)], _manifest(tmp_path, name)

    a, m = sources("a")
    b, _ = sources("b")
    c, _ = sources("c", seed=7)
    h, mh = sources("h", select="head")
    assert a == b and len(a) == 12 and a != c
    assert h == [f"{sft.name}:{i}" for i in range(1, 13)] and a != h
    lines = [int(s.rsplit(":", 1)[1]) for s in a]
    assert lines == sorted(lines) and max(lines) > 12
    info = m["inputs"][0]
    assert (info["rows_read"], info["rows_valid"], info["rows_taken"], info["select"]) == (61, 60, 12, "random")
    assert m["counts"]["sft"]["invalid_skipped"] == 1
    assert (mh["inputs"][0]["rows_read"], mh["inputs"][0]["rows_taken"]) == (12, 12)  # head stops reading


def test_weights_mix_a_section_total_and_the_manifest_records_each_share(tmp_path, capsys):
    big = write_jsonl(tmp_path / "big.jsonl", [_dialogue(i, "큰") for i in range(100)])
    small = write_jsonl(tmp_path / "small.jsonl", [_dialogue(i, "작은") for i in range(50)])
    data = {"sft": {"train": [{"path": str(big), "weight": 3}, {"path": str(small), "weight": 1}], "max_rows": 40}}
    assert _run(write_recipe(tmp_path, data)) == 0
    srcs = [Path(r["source"]).name for r in _rows(tmp_path, "sft")]
    assert sum(s.startswith("big.jsonl") for s in srcs) == 30 and sum(s.startswith("small.jsonl") for s in srcs) == 10
    assert [i["rows_taken"] for i in _manifest(tmp_path)["inputs"]] == [30, 10]
    # the same recipe again (another run folder): the same rows
    assert _run(write_recipe(tmp_path, data, name="again")) == 0
    assert [Path(r["source"]).name for r in _rows(tmp_path, "sft", name="again")] == srcs
    # a weight asking for more rows than a dataset has is refused, naming it
    data["sft"]["train"][0]["weight"], data["sft"]["train"][1]["weight"], data["sft"]["max_rows"] = 1, 7, 80
    assert _run(write_recipe(tmp_path, data, name="short")) == 2
    err = capsys.readouterr().err
    assert "data.sft.train.1" in err and "50 valid rows" in err and "asks for 70" in err


def test_without_weights_a_total_is_shared_by_the_datasets_whole_sizes(tmp_path):
    """Each dataset is read into a pool of at most the total; the shares follow the datasets' real sizes (300:10),
    not the pools' (31:10 would give 23:8)."""
    big = write_jsonl(tmp_path / "big.jsonl", [_dialogue(i, "큰") for i in range(300)])
    small = write_jsonl(tmp_path / "small.jsonl", [_dialogue(i, "작은") for i in range(10)])
    data = {"sft": {"train": [{"path": str(big)}, {"path": str(small)}], "max_rows": 31}}
    assert _run(write_recipe(tmp_path, data)) == 0
    assert [i["rows_taken"] for i in _manifest(tmp_path)["inputs"]] == [30, 1]
    assert len(_rows(tmp_path, "sft")) == 31


def test_weights_need_a_total_and_all_or_none(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [_dialogue(0)])
    with pytest.raises(ConfigError, match="data.sft.max_rows"):
        _check(write_recipe(tmp_path, {"sft": {"train": [{"path": str(f), "weight": 1}]}}))
    with pytest.raises(ConfigError, match="give every dataset a weight"):
        _check(
            write_recipe(
                tmp_path, {"sft": {"train": [{"path": str(f), "weight": 1}, {"path": str(f)}], "max_rows": 2}}
            )
        )


# ------------------------------------------------------------------------------------------------------------------
# 3. Truncation
# ------------------------------------------------------------------------------------------------------------------


def test_truncate_cuts_responses_keeps_prompts_and_ends_turns_only_when_complete(tmp_path, tokenizer):
    long_answer = " ".join(f"문장{i}" for i in range(80))
    rows = [
        {"messages": [{"role": "user", "content": "짧은 질문"}, {"role": "assistant", "content": long_answer}]},
        {"messages": [{"role": "user", "content": "질문"}, {"role": "assistant", "content": "짧은 답"}]},
        {  # two exchanges: the cut falls in the second; the first model turn stays whole
            "messages": [
                {"role": "user", "content": "첫 질문"},
                {"role": "assistant", "content": "첫 답입니다"},
                {"role": "user", "content": " ".join(f"긴질문{i}" for i in range(80))},
                {"role": "assistant", "content": "둘째 답"},
            ]
        },
        {"messages": [{"role": "user", "content": long_answer}, {"role": "assistant", "content": "답"}]},
    ]
    sft = write_jsonl(tmp_path / "sft.jsonl", rows)
    pairs = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "질문", "chosen": long_answer, "rejected": "짧은 답"},
            {"prompt": "질문", "chosen": long_answer + " 끝", "rejected": long_answer + " 다름"},
        ],
    )
    data = {
        "sft": {"train": [{"path": str(sft)}]},
        "preference": {"train": [{"path": str(pairs)}]},
        "max_length": 48,
        "overlong": "truncate",
    }
    assert _run(write_recipe(tmp_path, data)) == 0
    eot = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    got = {Path(r["source"]).name: r for r in _rows(tmp_path, "sft")}
    cut = got["sft.jsonl:1"]
    assert len(cut["input_ids"]) <= 48 and cut["assistant_masks"][-1] == 1 and cut["input_ids"][-1] != eot
    assert tokenizer.decode(cut["input_ids"]).startswith("<bos><start_of_turn>user\n짧은 질문<end_of_turn>")
    whole = got["sft.jsonl:2"]
    assert whole["input_ids"][-2] == eot  # untouched: ends "<end_of_turn>\n"
    two = got["sft.jsonl:3"]
    assert two["input_ids"][-1] == eot and two["assistant_masks"][-1] == 1  # back to the complete first answer
    assert "첫 답입니다<end_of_turn>" in tokenizer.decode(two["input_ids"]) and "긴질문" not in tokenizer.decode(
        two["input_ids"]
    )
    assert "sft.jsonl:4" not in got  # the prompt alone fills the limit: nothing to train on, dropped
    pref = _rows(tmp_path, "preference")
    assert len(pref) == 1 and pref[0]["chosen_ids"][-1] != eot and pref[0]["rejected_ids"][-1] == eot
    assert len(pref[0]["prompt_ids"]) + len(pref[0]["chosen_ids"]) == 48
    c = _manifest(tmp_path)["counts"]
    assert (c["sft"]["overlong_truncated"], c["sft"]["overlong_dropped"]) == (2, 1)
    assert (c["preference"]["overlong_truncated"], c["preference"]["overlong_dropped"]) == (1, 1)
    kinds = [json.loads(line)["kind"] for line in (_out(tmp_path) / "rejects.jsonl").read_text().splitlines()]
    assert sorted(kinds) == ["overlong", "overlong", "truncated", "truncated", "truncated"]


def test_drop_is_still_the_default_and_prompts_are_never_cut(tmp_path):
    """Negative control for truncation: under drop the same long rows are gone (and counted); PPO prompts are
    dropped under truncate too."""
    long = " ".join(f"문장{i}" for i in range(80))
    sft = write_jsonl(tmp_path / "sft.jsonl", [_dialogue(0, answer=long), _dialogue(1)])
    prompts = write_jsonl(tmp_path / "q.jsonl", [{"prompt": long}, {"prompt": "짧은 질문"}])
    data = {
        "sft": {"train": [{"path": str(sft)}]},
        "prompts": {"train": [{"path": str(prompts)}]},
        "max_length": 48,
        "max_prompt_length": 16,
    }
    assert _run(write_recipe(tmp_path, data)) == 0
    c = _manifest(tmp_path)["counts"]
    assert c["sft"]["train"] == 1 and c["sft"]["overlong_dropped"] == 1
    assert _run(write_recipe(tmp_path, {**data, "overlong": "truncate"}, name="tr")) == 0
    c = _manifest(tmp_path, "tr")["counts"]
    assert c["sft"]["overlong_truncated"] == 1 and c["prompts"] == {
        "train": 1,
        "invalid_skipped": 0,
        "overlong_dropped": 1,
        "overlong_truncated": 0,
    }


def test_length_policy_truncates_only_rows_over_the_limit():
    import datasets

    ds = datasets.Dataset.from_dict(
        {
            "input_ids": [[1, 2, 3, 4, 5, 6], [1, 2]],
            "assistant_masks": [[0, 0, 1, 1, 0, 1], [0, 1]],
            "length": [6, 2],
            "source": ["a", "b"],
        }
    )
    out = length_policy("sft", ds, 5, "data.max_length", "truncate", rej := Rejects("error"))
    assert out["input_ids"] == [[1, 2, 3, 4], [1, 2]] and out["assistant_masks"] == [[0, 0, 1, 1], [0, 1]]
    assert rej.counts["sft/truncated"] == 1


# ------------------------------------------------------------------------------------------------------------------
# 4. Streaming and hub options
# ------------------------------------------------------------------------------------------------------------------


def test_a_streamed_split_writes_the_same_rows_in_chunks(tmp_path, monkeypatch):
    """Streaming tokenizes and writes 7 records at a time here; the rows must equal the in-memory build's, and a
    streamed eval_fraction keeps each prompt on one side."""
    import pipeline.data as data_stage

    monkeypatch.setattr(data_stage, "CHUNK", 7)
    sft = write_jsonl(tmp_path / "sft.jsonl", [_dialogue(i) for i in range(50)])
    pairs = write_jsonl(
        tmp_path / "p.jsonl",
        [{"prompt": f"질문 {i % 10}", "chosen": f"좋은 답 {i}", "rejected": f"나쁜 답 {i}"} for i in range(60)],
    )
    spec = {"path": str(sft)}
    assert _run(write_recipe(tmp_path, {"sft": {"train": [spec]}}, name="mem")) == 0
    data = {
        "sft": {"train": [{**spec, "streaming": True}]},
        "preference": {"train": [{"path": str(pairs), "streaming": True}], "eval_fraction": 0.3},
    }
    assert _run(write_recipe(tmp_path, data, name="st")) == 0
    assert _rows(tmp_path, "sft", name="st") == _rows(tmp_path, "sft", name="mem")
    train, held = _rows(tmp_path, "preference", name="st"), _rows(tmp_path, "preference", "eval", name="st")
    assert len(train) + len(held) == 60 and held and train
    assert not {tuple(r["prompt_ids"]) for r in train} & {tuple(r["prompt_ids"]) for r in held}
    m = _manifest(tmp_path, "st")
    assert m["counts"]["preference"]["eval"] == len(held) and m["eval_split"]["preference"] == "by prompt"


def test_hub_options_reach_the_loader_on_a_folder_in_hub_layout(tmp_path, monkeypatch):
    """data_files, data_dir and streaming go to datasets.load_dataset; a local folder in hub layout stands in for
    the hub (the same loading code)."""
    import data_prep.readers as readers

    repo = tmp_path / "hub" / "owner" / "name"
    for part, n in (("a", 3), ("b", 5)):
        (repo / "data" / part).mkdir(parents=True)
        pq.write_table(
            pa.Table.from_pylist([{"prompt": f"{part} 질문 {i}", "completion": "답"} for i in range(n)]),
            repo / "data" / part / "train-00000-of-00001.parquet",
        )
    monkeypatch.setattr(readers, "hub_location", lambda dataset_id: str(tmp_path / "hub" / dataset_id))
    cases = {
        "all": ({}, 8),
        "files": ({"data_files": ["data/b/*.parquet"]}, 5),
        "dir": ({"data_dir": "data/a"}, 3),
        "stream": ({"data_dir": "data/b", "streaming": True}, 5),
    }
    for name, (options, n) in cases.items():
        recipe = write_recipe(tmp_path, {"sft": {"train": [{"path": "owner/name", **options}]}}, name=name)
        assert _run(recipe) == 0, name
        assert len(_rows(tmp_path, "sft", name=name)) == n, name
    assert _manifest(tmp_path, "files")["inputs"][0]["hub"]["data_files"] == ["data/b/*.parquet"]


def test_data_files_on_a_local_path_is_refused(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [_dialogue(0)])
    with pytest.raises(ConfigError, match="data_files and data_dir choose files of a hub dataset"):
        _check(write_recipe(tmp_path, {"sft": {"train": [{"path": str(f), "data_files": ["x"]}]}}))


# ------------------------------------------------------------------------------------------------------------------
# 5. Mistyped local paths
# ------------------------------------------------------------------------------------------------------------------


def test_a_mistyped_local_folder_is_refused_not_taken_for_a_hub_id(tmp_path, monkeypatch, capsys):
    """Before: mydata/koalpaca passed as a hub id and failed ~50 s later as a download error."""
    import pipeline.core.locations as locations

    monkeypatch.setattr(locations, "REPO_ROOT", tmp_path)
    (tmp_path / "mydata" / "kolpaca").mkdir(parents=True)
    write_jsonl(tmp_path / "mydata" / "kolpaca" / "a.jsonl", [_dialogue(0)])
    launch = {"launch": {"accelerate_config": str(REPO / "configs" / "accelerate" / "single.yaml")}}
    for path, why in (
        ("mydata/koalpaca", "mydata/ is a local folder"),
        ("koalpaca", "a hub dataset id has the form owner/name"),
    ):
        recipe = write_recipe(tmp_path, {"sft": {"train": [{"path": path}]}}, extra=launch)
        with pytest.raises(ConfigError, match=f"local dataset '{path}' does not exist.*{why}"):
            _check(recipe)
        assert _run(recipe) == 2
        err = capsys.readouterr().err
        assert why in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    # controls: the right folder is read, and a hub-shaped id with no such local folder is still a hub id
    assert _run(write_recipe(tmp_path, {"sft": {"train": [{"path": "mydata/kolpaca"}]}}, extra=launch)) == 0
    _check(write_recipe(tmp_path, {"sft": {"train": [{"path": "beomi/KoAlpaca-v1.1a"}]}}, name="hub", extra=launch))


def test_a_bad_row_read_while_workers_tokenize_stops_the_stage_in_one_line(tmp_path, monkeypatch, capsys):
    """With data.num_proc 2 the rows are read and checked in a feeder thread while workers tokenize; a bad row in a
    later chunk must still stop the stage with its file, line and reason (not a pool traceback), and under skip be
    counted like in one process."""
    import data_prep.encode as encode

    monkeypatch.setattr(encode, "WORKER_CHUNK", 100)
    rows = [_dialogue(i) for i in range(450)]
    rows[321] = {"messages": [{"role": "user", "content": "질문"}]}  # ends on a user turn
    sft = write_jsonl(tmp_path / "sft.jsonl", rows)
    data = {"sft": {"train": [{"path": str(sft)}]}, "num_proc": 2}
    assert _run(write_recipe(tmp_path, data)) == 2
    err = capsys.readouterr().err
    assert "sft.jsonl:322: the dialogue ends on a user turn" in err and "Traceback" not in err
    assert _run(write_recipe(tmp_path, {**data, "on_invalid": "skip"}, name="skip")) == 0
    c = _manifest(tmp_path, "skip")["counts"]["sft"]
    assert (c["train"], c["invalid_skipped"]) == (449, 1)
