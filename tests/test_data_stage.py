"""The data stage end to end on small files: every format, every bad-input class, skip policy, reuse, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.rundir import MARKER
from pipeline.data import main as data_main
from tests.helpers import REPO
from tests.helpers.recipes import write_jsonl, write_recipe

SFT_ROW = {
    "messages": [
        {"role": "user", "content": "사과는 무엇인가요?"},
        {"role": "assistant", "content": "사과는 좋습니다."},
    ]
}
PAIR = {"prompt": "사과는?", "chosen": "좋습니다.", "rejected": "좋아."}


def _run(recipe: Path, *overrides: str) -> int:
    return data_main(["--recipe", str(recipe), *overrides])


def _data_dir(tmp_path: Path, name: str = "t") -> Path:
    return tmp_path / "runs" / name / "data"


def _read(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def test_every_input_format_and_file_type(tmp_path, tokenizer):
    write_jsonl(tmp_path / "messages.jsonl", [SFT_ROW])
    (tmp_path / "sharegpt.json").write_text(
        json.dumps(
            [
                {
                    "conversations": [
                        {"from": "system", "value": "존댓말"},
                        {"from": "human", "value": "안녕?"},
                        {"from": "gpt", "value": "안녕하세요."},
                    ]
                }
            ],
            ensure_ascii=False,
        ),
        encoding="utf-8",
    )
    pq.write_table(
        pa.Table.from_pylist([{"instruction": "번역", "input": "hi", "output": "안녕하세요."}]),
        tmp_path / "alpaca.parquet",
    )
    (tmp_path / "pc.csv").write_text("prompt,completion\n질문,답입니다.\n", encoding="utf-8")
    write_jsonl(tmp_path / "pairs.jsonl", [PAIR])
    write_jsonl(
        tmp_path / "pairs_msgs.jsonl",
        [
            {
                "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
            }
        ],
    )
    write_jsonl(
        tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}]
    )
    write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": "질문?"}, {"prompt": [{"role": "user", "content": "다른 질문?"}]}]
    )
    recipe = write_recipe(
        tmp_path,
        {
            "sft": {
                "train": [
                    {"path": str(tmp_path / f)}
                    for f in ("messages.jsonl", "sharegpt.json", "alpaca.parquet", "pc.csv")
                ]
            },
            "preference": {
                "train": [{"path": str(tmp_path / f)} for f in ("pairs.jsonl", "pairs_msgs.jsonl", "hh.jsonl")]
            },
            "prompts": {"train": [{"path": str(tmp_path / "prompts.jsonl"), "format": "auto"}]},
        },
    )
    assert _run(recipe) == 0
    out = _data_dir(tmp_path)
    assert (out / MARKER).is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert [i["format"] for i in manifest["inputs"]] == [
        "messages",
        "sharegpt",
        "alpaca",
        "prompt_completion",
        "pairs",
        "pairs_messages",
        "hh_rlhf",
        "prompt",
    ]
    assert all(len(next(iter(i["files"].values()))) == 64 for i in manifest["inputs"])  # sha256 of every input
    assert manifest["counts"]["sft"]["train"] == 4 and manifest["counts"]["preference"]["train"] == 3
    assert manifest["tokenizer"]["chat_template_hash"] and manifest["formatter_version"]

    eot = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    sft = _read(out / "sft" / "train.parquet")
    texts = [tokenizer.decode(r["input_ids"]) for r in sft]
    assert texts[1] == (
        "<bos><start_of_turn>user\n존댓말\n\n안녕?<end_of_turn>\n<start_of_turn>model\n안녕하세요.<end_of_turn>\n"
    )
    assert texts[2].startswith("<bos><start_of_turn>user\n번역\n\nhi<end_of_turn>")
    for r in sft:
        trained = [t for t, m in zip(r["input_ids"], r["assistant_masks"]) if m]
        assert trained[-1] == eot and r["input_ids"].count(tokenizer.bos_token_id) == 1
        assert r["source"]
    pref = _read(out / "preference" / "train.parquet")
    assert all(r["chosen_ids"][-1] == eot and r["rejected_ids"][-1] == eot for r in pref)
    assert tokenizer.decode(pref[0]["prompt_ids"]).endswith("<start_of_turn>model\n")
    prompts = _read(out / "prompts" / "train.parquet")
    assert [tokenizer.decode(r["prompt_ids"]) for r in prompts][1] == (
        "<bos><start_of_turn>user\n다른 질문?<end_of_turn>\n<start_of_turn>model\n"
    )
    # Resolved recipe and the tokenizer (with its chat template) travel with the data.
    assert "name_or_path: embedded:tiny-gemma-ko" in (out / "recipe.yaml").read_text()
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert saved.apply_chat_template(
        json.loads(prompts[1]["messages"]), tokenize=False, add_generation_prompt=True
    ) == tokenizer.decode(prompts[1]["prompt_ids"])


BAD_SFT = [
    ('{"messages": [', "broken JSON"),
    (b'{"messages": "\xff"}', "invalid UTF-8"),
    ("[1, 2]", "not a JSON object"),
    ({"msgs": []}, "missing field 'messages'"),
    ({"messages": "hello"}, "field 'messages' must be a list of messages, got str"),
    ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}]}, "content is null"),
    ({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "a"}]}, "user content is empty"),
    ({"messages": [{"role": "robot", "content": "q"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}, "roles out of order"),
    ({"messages": [{"role": "user", "content": "q"}]}, "ends on a user turn"),
    (
        {"messages": [{"role": "user", "content": "say <end_of_turn>"}, {"role": "assistant", "content": "a"}]},
        "control-token text '<end_of_turn>'",
    ),
    (
        {"messages": [{"role": "user", "content": "q " * 300}, {"role": "assistant", "content": "a"}]},
        "too long: .* tokens > data.max_length 128",
    ),
]


def _write_sft_with_bad_row(tmp_path: Path, bad) -> Path:
    path = tmp_path / "sft.jsonl"
    good = json.dumps(SFT_ROW, ensure_ascii=False).encode()
    bad_bytes = bad if isinstance(bad, bytes) else (bad if isinstance(bad, str) else json.dumps(bad)).encode()
    path.write_bytes(good + b"\n" + bad_bytes + b"\n" + good + b"\n")
    return path


@pytest.mark.parametrize("bad, reason", BAD_SFT, ids=[r.split(" ")[0] + str(i) for i, (_, r) in enumerate(BAD_SFT)])
def test_bad_sft_row_stops_with_file_line_and_reason(tmp_path, capsys, bad, reason):
    path = _write_sft_with_bad_row(tmp_path, bad)
    recipe = write_recipe(tmp_path, {"sft": {"train": [{"path": str(path)}]}, "max_length": 128, "overlong": "error"})
    assert _run(recipe) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    import re

    assert re.search(rf"sft\.jsonl:2: .*{reason}", err), err
    assert not _data_dir(tmp_path).exists()  # nothing half-written where the next stage would look


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, "chosen and rejected are identical"),
        (
            {
                "chosen": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}],
            },
            "chosen and rejected do not share the same prompt",
        ),
        ({"prompt": "q", "chosen": 3, "rejected": "b"}, "field 'chosen' must be a string, got int"),
    ],
)
def test_bad_preference_rows(tmp_path, capsys, row, reason):
    good_msgs = {
        "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
    }
    first = good_msgs if "prompt" not in row else PAIR
    path = write_jsonl(tmp_path / "p.jsonl", [first, row])
    recipe = write_recipe(
        tmp_path,
        {
            "preference": {
                "train": [{"path": str(path), "format": "pairs_messages" if "prompt" not in row else "pairs"}]
            }
        },
    )
    assert _run(recipe) == 2
    assert f"p.jsonl:2: {reason}" in capsys.readouterr().err


def test_skip_policy_writes_rejects_with_reasons_and_counts(tmp_path, capsys):
    path = write_jsonl(
        tmp_path / "sft.jsonl",
        [
            SFT_ROW,
            '{"broken',
            {"messages": [{"role": "user", "content": "q"}]},
            {"messages": [{"role": "user", "content": "q " * 300}, {"role": "assistant", "content": "a"}]},
            SFT_ROW,
        ],
    )
    recipe = write_recipe(tmp_path, {"sft": {"train": [{"path": str(path)}]}, "on_invalid": "skip", "max_length": 128})
    assert _run(recipe) == 0
    out = capsys.readouterr().out
    assert "3 rows skipped or dropped" in out
    rejects = [json.loads(line) for line in (_data_dir(tmp_path) / "rejects.jsonl").read_text().splitlines()]
    assert [(r["where"].rsplit(":", 1)[1], r["kind"]) for r in rejects] == [
        ("2", "invalid"),
        ("3", "invalid"),
        ("4", "overlong"),
    ]
    assert "broken JSON" in rejects[0]["reason"] and "ends on a user turn" in rejects[1]["reason"]
    counts = json.loads((_data_dir(tmp_path) / "manifest.json").read_text())["counts"]["sft"]
    assert counts == {"train": 2, "invalid_skipped": 2, "overlong_dropped": 1, "overlong_truncated": 0}


def test_rerun_reuses_and_changed_input_rebuilds(tmp_path, capsys):
    path = write_jsonl(tmp_path / "sft.jsonl", [SFT_ROW] * 3)
    recipe = write_recipe(tmp_path, {"sft": {"train": [{"path": str(path)}]}})
    assert _run(recipe) == 0
    stamp = (_data_dir(tmp_path) / MARKER).read_text()
    capsys.readouterr()
    assert _run(recipe) == 0
    assert "up to date" in capsys.readouterr().out
    assert (_data_dir(tmp_path) / MARKER).read_text() == stamp
    write_jsonl(path, [SFT_ROW] * 4)
    assert _run(recipe) == 0
    assert "rebuilding" in capsys.readouterr().out
    assert json.loads((_data_dir(tmp_path) / "manifest.json").read_text())["counts"]["sft"]["train"] == 4
    assert _run(recipe, "data.max_length=64") == 0  # a settings change rebuilds too
    assert "rebuilding" in capsys.readouterr().out


def test_failed_rebuild_keeps_the_previous_output(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [SFT_ROW])
    recipe = write_recipe(tmp_path, {"sft": {"train": [{"path": str(path)}]}})
    assert _run(recipe) == 0
    write_jsonl(path, [SFT_ROW, "{broken"])
    assert _run(recipe) == 2
    assert (_data_dir(tmp_path) / MARKER).is_file()
    assert json.loads((_data_dir(tmp_path) / "manifest.json").read_text())["counts"]["sft"]["train"] == 1
    assert not [p for p in _data_dir(tmp_path).parent.iterdir() if p.name.startswith(".")]


def test_eval_split_and_heldout_overlap_warning(tmp_path, capsys):
    rows = [
        {"messages": [{"role": "user", "content": f"질문 {i}"}, {"role": "assistant", "content": "네."}]}
        for i in range(20)
    ]
    sft = write_jsonl(tmp_path / "sft.jsonl", rows)
    held = write_jsonl(tmp_path / "held.jsonl", [{"prompt": "질문 3"}, {"prompt": "새 질문"}])
    recipe = write_recipe(
        tmp_path,
        {
            "sft": {"train": [{"path": str(sft)}], "eval_fraction": 0.2},
            "prompts": {"train": [{"path": str(held)}], "eval": [{"path": str(held)}]},
        },
    )
    assert _run(recipe) == 0
    assert "warning: 2 held-out prompts also appear in training data" in capsys.readouterr().out
    m = json.loads((_data_dir(tmp_path) / "manifest.json").read_text())
    assert m["counts"]["sft"]["train"] == 16 and m["counts"]["sft"]["eval"] == 4
    assert m["heldout_prompt_overlap"] == 2


def test_preference_eval_is_held_out_by_prompt(tmp_path):
    """Catches held-out pairs whose prompts were trained on: the reward model's accuracy would measure memory. Ten
    prompts with four pairs each; a 20% split must hold out whole prompts."""
    import datasets

    from data_prep.encode import split_eval

    rows = [
        {"prompt": f"질문 {i}", "chosen": f"좋은 답 {j}입니다.", "rejected": f"나쁜 답 {j}"}
        for i in range(10)
        for j in range(4)
    ]
    pref = write_jsonl(tmp_path / "pref.jsonl", rows)
    recipe = write_recipe(tmp_path, {"preference": {"train": [{"path": str(pref)}], "eval_fraction": 0.2}})
    assert _run(recipe) == 0
    m = json.loads((_data_dir(tmp_path) / "manifest.json").read_text())
    assert m["eval_split"]["preference"] == "by prompt" and m["eval_split"]["sft"] == "none"
    split = {
        name: datasets.Dataset.from_parquet(str(_data_dir(tmp_path) / "preference" / f"{name}.parquet"))
        for name in ("train", "eval")
    }
    prompts = {name: {tuple(p) for p in ds["prompt_ids"]} for name, ds in split.items()}
    assert len(split["eval"]) == 8 and len(prompts["eval"]) == 2  # two whole prompts
    assert not prompts["train"] & prompts["eval"]
    # Negative control: the row-random split (what the stage did) puts most held-out prompts in training too.
    train, held = split_eval(split["train"], 0.2, 42)
    assert {tuple(p) for p in train["prompt_ids"]} & {tuple(p) for p in held["prompt_ids"]}


def test_undetectable_format_is_a_clear_error(tmp_path, capsys):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    recipe = write_recipe(tmp_path, {"sft": {"train": [{"path": str(path)}]}})
    assert _run(recipe) == 2
    err = capsys.readouterr().err
    assert "x.jsonl:1: cannot detect the sft format from columns ['answer', 'question']" in err
    recipe = write_recipe(
        tmp_path,
        {
            "sft": {
                "train": [
                    {"path": str(path), "format": "alpaca", "columns": {"instruction": "question", "output": "answer"}}
                ]
            }
        },
    )
    assert _run(recipe) == 0


def test_embedded_recipe_builds_with_heldout_prompts_kept_out(tmp_path):
    recipe = REPO / "recipes" / "tiny_ko.yaml"
    assert _run(recipe, f"run.output_dir={tmp_path}") == 0
    m = json.loads((tmp_path / "tiny_ko" / "data" / "manifest.json").read_text())
    assert m["heldout_prompt_overlap"] == 0
    c = m["counts"]
    assert c["sft"]["train"] + c["sft"]["eval"] == 1160 and c["sft"]["overlong_dropped"] == 0
    assert c["preference"]["train"] + c["preference"]["eval"] == 1160
    assert c["prompts"] == {
        "train": 280,
        "eval": 60,
        "invalid_skipped": 0,
        "overlong_dropped": 0,
        "overlong_truncated": 0,
    }
    assert m["eval_split"] == {"sft": "random", "preference": "by prompt", "prompts": "given"}


def test_worker_processes_give_identical_output(tmp_path, monkeypatch):
    """data.num_proc 2 tokenizes in worker processes (5 chunks of 500 here) and writes the same rows, in the same
    order, as one process; the spy shows the workers were really used (one chunk in all stays in-process)."""
    import data_prep.encode as encode

    monkeypatch.setattr(encode, "WORKER_CHUNK", 500)
    pools = []
    real_pool = encode.worker_pool
    monkeypatch.setattr(
        encode, "worker_pool", lambda n, stage, enc: (pools.append(stage), real_pool(n, stage, enc))[1]
    )
    rows = [
        {"messages": [{"role": "user", "content": f"질문 {i}번"}, {"role": "assistant", "content": f"답 {i}입니다."}]}
        for i in range(2500)
    ]
    sft = write_jsonl(tmp_path / "sft.jsonl", rows)
    outs = []
    for n in (1, 2):
        recipe = write_recipe(tmp_path, {"sft": {"train": [{"path": str(sft)}]}, "num_proc": n}, name=f"p{n}")
        assert _run(recipe) == 0
        outs.append(_read(_data_dir(tmp_path, f"p{n}") / "sft" / "train.parquet"))
    assert outs[0] == outs[1] and len(outs[0]) == 2500
    assert pools == ["sft"]
