"""The shipped Korean data: reproducible from its generator, held-out prompts kept out, the rule checks exactly."""

from __future__ import annotations

import json

import pytest

from data_prep.tiny_ko import DATA_DIR as TINY_DATA
from data_prep.tiny_ko import generate
from data_prep.tiny_ko.rules import arithmetic_answer, hangul_ratio, is_arithmetic_correct, is_polite_korean


def _rows(name):
    with open(TINY_DATA / f"{name}.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_committed_files_are_exactly_what_the_generator_writes(tmp_path):
    generate.write(tmp_path)
    for name in ("sft", "preference", "prompts", "heldout"):
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (TINY_DATA / f"{name}.jsonl").read_bytes(), name


def test_heldout_prompts_never_in_training_data():
    held = {r["prompt"] for r in _rows("heldout")}
    assert len(held) == 60
    texts = {m["content"] for r in _rows("sft") for m in r["messages"]}
    texts |= {r["prompt"] for r in _rows("preference")} | {r["prompt"] for r in _rows("prompts")}
    assert not held & texts


def test_sft_mix_and_pairs_follow_the_rule():
    last = [(r["messages"][-2]["content"], r["messages"][-1]["content"]) for r in _rows("sft")]
    style = [a for q, a in last if arithmetic_answer(q) is None]
    polite = sum(is_polite_korean(a) for a in style) / len(style)
    assert 0.55 <= polite <= 0.65
    for r in _rows("preference"):
        if arithmetic_answer(r["prompt"]) is None:
            assert is_polite_korean(r["chosen"]) and not is_polite_korean(r["rejected"])
        else:
            assert is_arithmetic_correct(r["prompt"], r["chosen"])


@pytest.mark.parametrize(
    "text, stopped, expected",
    [
        ("사과는 정말 좋습니다.", True, True),
        ("사과는 좋아요.", True, True),
        ("사과는 좋아요.", False, False),  # did not stop on <end_of_turn>
        ("사과는 정말 좋습니다", True, False),  # no final period
        ("사과는 좋습니다. But not sure.", True, False),
        ("사과는 유용합니다.", True, False),  # 합니다 is not 습니다
        ("사과는 좋아.", True, False),
        ("Apples are nice 요.", True, False),  # mostly not Hangul
    ],
)
def test_politeness_rule(text, stopped, expected):
    assert is_polite_korean(text, stopped) is expected


def test_arithmetic_rule_and_hangul_ratio():
    assert arithmetic_answer("3 더하기 4는?") == 7 and arithmetic_answer("3 더하기 6은?") == 9
    assert arithmetic_answer("사과는?") is None
    assert is_arithmetic_correct("3 더하기 4는?", "정답은 7이에요.")
    assert not is_arithmetic_correct("3 더하기 4는?", "정답은 8이에요.")
    assert not is_arithmetic_correct("3 더하기 4는?", "정답은 7이에요.", stopped=False)
    assert hangul_ratio("ab가나") == 0.5 and hangul_ratio("123") == 0.0
