"""The Korean answer measures (pipeline/core/korean.py) on hand-computed examples, each with the answer that must not
move it."""

from __future__ import annotations

import unicodedata

import pytest

from pipeline.core.korean import KEYS, hangul_ratio, korean_metrics, korean_totals, repetition, switches_script


def test_hangul_ratio_counts_letters_only():
    """Catches digits, punctuation or spaces counted in the denominator: a polite Korean answer with a number and an
    exclamation mark is still all Korean."""
    assert hangul_ratio("사과는 빨갛습니다.") == 1.0
    assert hangul_ratio("3 더하기 4는 7입니다!!") == 1.0  # negative control: digits and punctuation change nothing
    assert hangul_ratio("사과 apple") == pytest.approx(2 / 7)  # 2 syllables of 7 letters
    assert hangul_ratio("apple") == 0.0
    assert hangul_ratio("123 ...!") is None  # no letter: neither Korean nor not
    assert hangul_ratio("") is None


def test_hangul_ratio_counts_a_decomposed_syllable_once():
    """Catches jamo of a decomposed (NFD) syllable counted as three letters, which would inflate the share of
    Korean in text that arrives decomposed."""
    nfd = unicodedata.normalize("NFD", "한국ab")
    assert len(nfd) == 8  # 6 jamo and 2 Latin letters
    assert hangul_ratio(nfd) == 0.5  # as 한국ab: 2 of 4
    assert hangul_ratio("ㅋㅋ ok") == 0.5  # compatibility jamo are Hangul


def test_script_switch_is_another_letter_script_inside_a_korean_answer():
    """Catches a Latin word, Hanja or kana inside Korean going unnoticed, digits and punctuation counted as a
    switch, and an answer with no Hangul counted as a switch (or as a non-switch) inside a Korean answer."""
    assert switches_script("사과는 apple입니다.") is True
    assert switches_script("사과는 漢字입니다.") is True
    assert switches_script("りんご는 사과입니다.") is True
    assert switches_script("Яблоко 사과") is True
    assert switches_script("사과는 맛있습니다.") is False  # negative control: all Korean
    assert (
        switches_script("3 더하기 4는 7입니다! (정답)") is False
    )  # digits, brackets and punctuation are not a script
    assert switches_script("apple is red") is None  # never Korean: not a switch inside a Korean answer
    assert switches_script("42.") is None


def test_repetition_is_the_share_of_repeated_character_trigrams():
    """Catches a looping answer scoring as fresh text, spacing making a repeat look new, and a division by zero (or a
    made-up value) on answers shorter than a trigram."""
    # "좋아요 좋아요 좋아요": 9 trigrams, 4 distinct (좋아요, "아요 ", "요 좋", " 좋아").
    assert repetition("좋아요 좋아요 좋아요") == pytest.approx(1 - 4 / 9)
    assert repetition("좋아요   좋아요\n좋아요 ") == pytest.approx(1 - 4 / 9)  # whitespace runs collapse
    assert repetition("요요요요") == 0.5  # 2 trigrams, both 요요요
    assert repetition("사과입니다") == 0.0  # negative control: 3 distinct trigrams
    assert repetition("네.") == 0.0  # shorter than a trigram
    assert repetition("") == 0.0


def test_korean_metrics_means_over_the_answers_each_applies_to():
    """Catches a mean over the wrong answers: the Hangul ratio averaged over answers without letters (as 0), the
    switch rate over answers without Hangul, the stop rate or the length taken from the wrong field."""
    answers = [
        ("사과입니다", True, 4),  # ratio 1, no switch, repetition 0
        ("apple", False, 10),  # ratio 0, not Korean, repetition 0
        ("사과 apple", True, 6),  # ratio 2/7, switch, repetition 0
        ("요요요요", False, 8),  # ratio 1, no switch, repetition 1/2
        ("7", True, 2),  # no letter: no ratio, not Korean, repetition 0
    ]
    got = korean_metrics(answers)
    assert tuple(got) == KEYS
    assert got["korean/hangul_ratio"] == pytest.approx((1 + 0 + 2 / 7 + 1) / 4)  # 4/7; over 5 answers it is 16/35
    assert got["korean/script_switch_rate"] == pytest.approx(1 / 3)  # 1 of the 3 Korean answers
    assert got["korean/repetition"] == pytest.approx(0.5 / 5)
    assert got["korean/stop_rate"] == pytest.approx(3 / 5)
    assert got["korean/length"] == pytest.approx(30 / 5)


def test_korean_metrics_without_korean_are_none_not_zero_and_refuse_no_answers():
    """Catches a switch rate of 0.0 for a model that stopped writing Korean (it would read as 'never switches'), a
    NaN from an empty mean, and a silent 0 for an empty batch."""
    got = korean_metrics([("...", False, 16), ("12", True, 3)])
    assert got["korean/hangul_ratio"] is None and got["korean/script_switch_rate"] is None
    assert got["korean/stop_rate"] == 0.5 and got["korean/length"] == 9.5 and got["korean/repetition"] == 0.0
    with pytest.raises(ValueError, match="at least one answer"):
        korean_metrics([])


def test_totals_pool_processes_by_answers_not_by_process():
    """Catches averaging per-process means: one process with one Korean answer that switches and one with three
    that do not give 1/4 pooled, not (1 + 0) / 2; a process with no Korean answer adds nothing (not a 0)."""
    a = korean_totals([("사과 apple", True, 3)])
    b = korean_totals([("사과", True, 2), ("배", True, 2), ("감", True, 2)])
    c = korean_totals([("apple", True, 2)])
    s, n = (sum(t["korean/script_switch_rate"][i] for t in (a, b, c)) for i in (0, 1))
    assert (s, n) == (1.0, 4) and s / n == 0.25
    assert c["korean/script_switch_rate"] == (0.0, 0)


def test_ppo_answer_totals_decode_each_response_up_to_its_stop(tokenizer):
    """Catches PPO's per-update measures reading the wrong tokens: the stop token or the padding after it decoded
    into the text, a response cut at the length limit losing its last token, or an answer that stopped on <eos>
    counted as having ended its turn."""
    import torch

    from data_prep.gemma_format import stop_token_ids
    from pipeline.core.sampling import Generation
    from pipeline.ppo import answer_totals

    eot, eos = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    mixed, loop, short = ids("사과 apple"), ids("좋아요 좋아요 좋아요"), ids("네")
    width = len(loop)  # the looping answer fills the response length without stopping
    assert len(mixed) + 1 < width and tokenizer.decode(loop) == "좋아요 좋아요 좋아요"
    rows = [mixed + [eot], loop, short + [eos]]
    g = Generation(
        queries=torch.tensor([[pad, 5], [6, 7], [8, 9]]),
        responses=torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        seq_len=torch.tensor([len(mixed), width - 1, len(short)]),
        stopped=torch.tensor([True, False, True]),
        pad_id=pad,
    )
    got = {k: total / n for k, (total, n) in answer_totals(g, tokenizer, eot).items()}
    assert got["korean/hangul_ratio"] == pytest.approx((2 / 7 + 1 + 1) / 3)
    assert got["korean/script_switch_rate"] == pytest.approx(1 / 3)  # only 사과 apple
    assert got["korean/repetition"] == pytest.approx((1 - 4 / 9) / 3)  # the whole loop, its last token included
    assert got["korean/stop_rate"] == pytest.approx(1 / 3)  # <eos> does not end a turn
    assert got["korean/length"] == pytest.approx((len(mixed) + 1 + width + len(short) + 1) / 3)
