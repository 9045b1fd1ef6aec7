"""The shipped Korean data: reproducible from its generator, held-out prompts kept out, the rule checks exactly."""

from __future__ import annotations

import json

import pytest

from data_prep.tiny_ko import DATA_DIR as TINY_DATA
from data_prep.tiny_ko import generate
from data_prep.tiny_ko.rules import (
    arithmetic_answer,
    hangul_ratio,
    is_arithmetic_correct,
    is_on_topic,
    is_polite_and_on_topic,
    is_polite_korean,
    prompt_subject,
)


def _rows(name):
    with open(TINY_DATA / f"{name}.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_committed_files_are_exactly_what_the_generator_writes(tmp_path):
    generate.write(tmp_path)
    for name in (
        "sft",
        "preference",
        "prompts",
        "heldout",
        "arith_prompts",
        "arith_heldout",
        *(f"topic_{n}" for n in ("sft", "preference", "prompts", "heldout")),
    ):
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


# The topic set (the real-model demo) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, response, expected",
    [
        ("사과는 무엇인가요?", "사과는 정말 좋습니다.", (True, True, True)),
        ("사과는 무엇인가요?", "바나나는 정말 좋습니다.", (True, False, False)),  # polite, off topic
        ("수박에 대해 알려 주세요.", "수박은 정말 재미있어.", (False, True, False)),  # on topic, casual
        ("냉장고를 한 문장으로 설명해 줘.", "I like refrigerators a lot.", (False, False, False)),
        ("3 더하기 4는?", "정답은 7이에요.", (True, False, False)),  # not a subject question: never on topic
    ],
)
def test_topic_rule_needs_the_prompt(prompt, response, expected):
    """Catches a rule that reads only the answer: the same polite answer passes for one question and not another."""
    got = (is_polite_korean(response), is_on_topic(prompt, response), is_polite_and_on_topic(prompt, response))
    assert got == expected
    assert not is_polite_and_on_topic(prompt, response, stopped=False)


def test_every_question_template_gives_its_subject():
    """Catches a template the subject parser misses (the rule would call every answer to it off topic)."""
    nouns = [n for n, _ in generate.NOUNS + generate.HELDOUT_NOUNS]
    assert [prompt_subject(q(n)) for n in nouns for q in generate.QUESTIONS] == [
        n for n in nouns for _ in generate.QUESTIONS
    ]


def test_topic_heldout_subjects_are_in_no_training_file():
    """Catches a held-out subject leaking into training (the rule would measure memory, not reading the prompt)."""
    held = {prompt_subject(r["prompt"]) for r in _rows("topic_heldout")}
    assert len(held) == 20 and None not in held
    texts = [m["content"] for r in _rows("topic_sft") for m in r["messages"]]
    texts += [t for r in _rows("topic_preference") for t in r.values()] + [r["prompt"] for r in _rows("topic_prompts")]
    assert not {s for s in held for t in texts if s in t}


def test_topic_pairs_need_both_halves_of_the_rule():
    """Catches pairs a reward model could rank by style alone or by the noun alone."""
    pairs = _rows("topic_preference")
    assert all(is_polite_and_on_topic(p["prompt"], p["chosen"]) for p in pairs)
    kinds = [(is_polite_korean(p["rejected"]), is_on_topic(p["prompt"], p["rejected"])) for p in pairs]
    share = {k: kinds.count(k) / len(kinds) for k in set(kinds)}
    assert share[(True, False)] >= 0.3 and share[(False, True)] >= 0.3, share  # polite off topic; on topic, not polite
    sft = [(r["messages"][-2]["content"], r["messages"][-1]["content"]) for r in _rows("topic_sft")]
    rate = sum(is_polite_and_on_topic(q, a) for q, a in sft) / len(sft)
    assert 0.4 <= rate <= 0.6  # room for PPO to improve on SFT
