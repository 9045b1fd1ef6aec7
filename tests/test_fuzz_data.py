"""Fuzzing the data stage: random and mutated rows of every input format never end in a traceback from inside a
library; every row is kept or rejected with its file, line and reason."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.data import main as data_main
from tests.helpers.recipes import write_recipe

text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)
scalar = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), text)
value = st.recursive(
    scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(text, inner, max_size=4)),
    max_leaves=12,
)
role = st.sampled_from(["system", "user", "assistant", "model", "tool", "human", "gpt", "", None, 3])
message = st.fixed_dictionaries(
    {}, optional={"role": role, "content": st.one_of(text, value), "from": role, "value": st.one_of(text, value)}
)
sft_row = st.one_of(
    st.fixed_dictionaries({"messages": st.lists(message, max_size=5)}),
    st.fixed_dictionaries({"conversations": st.lists(message, max_size=5)}),
    st.fixed_dictionaries(
        {"instruction": st.one_of(text, value), "output": st.one_of(text, value)},
        optional={"input": st.one_of(text, value), "system": st.one_of(text, value)},
    ),
    st.fixed_dictionaries({"prompt": st.one_of(text, value), "completion": st.one_of(text, value)}),
    st.dictionaries(text, value, max_size=4),
)
pref_row = st.one_of(
    st.fixed_dictionaries(
        {"prompt": st.one_of(text, value), "chosen": st.one_of(text, value), "rejected": st.one_of(text, value)},
        optional={"margin": value},
    ),
    st.fixed_dictionaries({"chosen": st.lists(message, max_size=4), "rejected": st.lists(message, max_size=4)}),
    st.fixed_dictionaries(
        {
            "chosen": text.map(lambda t: f"\n\nHuman: {t}\n\nAssistant: x"),
            "rejected": st.one_of(text, text.map(lambda t: f"\n\nHuman: {t}\n\nAssistant: y")),
        }
    ),
)
line = st.one_of(st.binary(max_size=20), st.just(b"[1, 2]"), st.just(b'{"messages": '), st.just(b"null"))

GOOD_SFT = {"messages": [{"role": "user", "content": "질문"}, {"role": "assistant", "content": "답입니다."}]}
GOOD_PAIR = {"prompt": "질문", "chosen": "좋습니다.", "rejected": "좋아."}


def _write(path, first, rows, raw_lines):
    with open(path, "wb") as fh:
        fh.write(json.dumps(first, ensure_ascii=False).encode() + b"\n")  # detection sees a well-formed first row
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False).encode() + b"\n")
        for raw in raw_lines:
            fh.write(raw.replace(b"\n", b" ") + b"\n")


def _check(tmp_path, capsys, stage, first, rows, raw_lines, policy):
    path = tmp_path / f"{stage}.jsonl"
    _write(path, first, rows, raw_lines)
    recipe = write_recipe(tmp_path, {stage: {"train": [{"path": str(path)}]}, "on_invalid": policy})
    rc = data_main(["--recipe", str(recipe)])  # any exception escaping here fails the test
    err = capsys.readouterr().err
    assert rc in (0, 2)
    if rc == 2:
        assert err.startswith("error: ") and "Traceback" not in err
    elif policy == "skip":
        manifest = json.loads((tmp_path / "runs" / "t" / "data" / "manifest.json").read_text(encoding="utf-8"))
        counts = manifest["counts"][stage]
        read = sum(i["rows_read"] for i in manifest["inputs"])
        assert counts.get("train", 0) + counts["invalid_skipped"] + counts["overlong_dropped"] == read
        rejects = (tmp_path / "runs" / "t" / "data" / "rejects.jsonl").read_text(encoding="utf-8").splitlines()
        for r in map(json.loads, rejects):
            assert path.name in r["where"]
            assert r["where"].rsplit(":", 1)[1].isdigit() and r["reason"]


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(rows=st.lists(sft_row, max_size=6), raw=st.lists(line, max_size=3), policy=st.sampled_from(["error", "skip"]))
def test_fuzz_sft_rows(tmp_path_factory, capsys, rows, raw, policy):
    _check(tmp_path_factory.mktemp("f"), capsys, "sft", GOOD_SFT, rows, raw, policy)


@FUZZ
@given(rows=st.lists(pref_row, max_size=6), raw=st.lists(line, max_size=3), policy=st.sampled_from(["error", "skip"]))
def test_fuzz_preference_rows(tmp_path_factory, capsys, rows, raw, policy):
    _check(tmp_path_factory.mktemp("f"), capsys, "preference", GOOD_PAIR, rows, raw, policy)


@FUZZ
@given(
    rows=st.lists(
        st.one_of(
            st.fixed_dictionaries({"prompt": st.one_of(text, value)}),
            st.fixed_dictionaries({"prompt": st.lists(message, max_size=3)}),
        ),
        max_size=6,
    ),
    raw=st.lists(line, max_size=3),
    policy=st.sampled_from(["error", "skip"]),
)
def test_fuzz_prompt_rows(tmp_path_factory, capsys, rows, raw, policy):
    _check(tmp_path_factory.mktemp("f"), capsys, "prompts", {"prompt": "질문"}, rows, raw, policy)
