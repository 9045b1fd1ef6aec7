"""Every input format -> Gemma turns; detection; column mapping; per-row reasons."""

from __future__ import annotations

import pytest

from data_prep.formats import Pair, detect, map_columns, preference_pair, prompt_turns, sft_dialogue
from data_prep.gemma_format import FormatError

U, M = "user", "model"


# -- SFT ---------------------------------------------------------------------------------------------------------
def test_openai_messages():
    row = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
        ]
    }
    assert detect("sft", row) == "messages"
    assert sft_dialogue("messages", row) == [(U, "S\n\nq"), (M, "a")]


def test_sharegpt_conversations():
    row = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "q"},
            {"from": "gpt", "value": "a"},
            {"from": "human", "value": "q2"},
            {"from": "gpt", "value": "a2"},
        ]
    }
    assert detect("sft", row) == "sharegpt"
    assert sft_dialogue("sharegpt", row) == [(U, "S\n\nq"), (M, "a"), (U, "q2"), (M, "a2")]


def test_sharegpt_unknown_role():
    with pytest.raises(FormatError, match="unknown role 'bot'"):
        sft_dialogue("sharegpt", {"conversations": [{"from": "bot", "value": "x"}]})


def test_alpaca_with_and_without_input():
    row = {"instruction": "번역하세요", "input": "hello", "output": "안녕하세요"}
    assert detect("sft", row) == "alpaca"
    assert sft_dialogue("alpaca", row) == [(U, "번역하세요\n\nhello"), (M, "안녕하세요")]
    assert sft_dialogue("alpaca", {"instruction": "i", "input": "", "output": "o"}) == [(U, "i"), (M, "o")]
    assert sft_dialogue("alpaca", {"instruction": "i", "output": "o"}) == [(U, "i"), (M, "o")]


def test_prompt_completion_with_system_column():
    row = {"prompt": "p", "completion": "c", "system": "sys"}
    assert detect("sft", row) == "prompt_completion"
    assert sft_dialogue("prompt_completion", row) == [(U, "sys\n\np"), (M, "c")]


def test_sft_dialogue_ending_on_user_turn():
    with pytest.raises(FormatError, match="ends on a user turn"):
        sft_dialogue("messages", {"messages": [{"role": "user", "content": "q"}]})


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"instruction": "i"}, "missing field 'output'"),
        ({"instruction": None, "output": "o"}, "field 'instruction' is null"),
        ({"instruction": 3, "output": "o"}, "field 'instruction' must be a string, got int"),
        ({"instruction": "i", "output": "  "}, "field 'output' is empty"),
    ],
)
def test_alpaca_bad_fields(row, reason):
    with pytest.raises(FormatError, match=reason):
        sft_dialogue("alpaca", row)


def test_detect_failure_lists_columns():
    with pytest.raises(FormatError, match=r"cannot detect the sft format from columns \['foo'\]"):
        detect("sft", {"foo": 1})


def test_column_mapping():
    row = map_columns({"질문": "q", "답변": "a"}, {"instruction": "질문", "output": "답변"})
    assert sft_dialogue(detect("sft", row), row) == [(U, "q"), (M, "a")]
    with pytest.raises(FormatError, match="missing field '답'"):
        map_columns({"질문": "q"}, {"output": "답"})


# -- Preference ----------------------------------------------------------------------------------------------------
def test_pairs_strings():
    row = {"prompt": " 질문 ", "chosen": " 좋습니다. ", "rejected": "좋아."}
    assert detect("preference", row) == "pairs"
    assert preference_pair("pairs", row) == Pair([(U, "질문")], "좋습니다.", "좋아.", None)


def test_pairs_messages_ultrafeedback_style():
    prompt = [{"role": "user", "content": "q"}]
    row = {
        "prompt": "q",
        "chosen": prompt + [{"role": "assistant", "content": "good"}],
        "rejected": prompt + [{"role": "assistant", "content": "bad"}],
        "margin": 2,
    }
    assert detect("preference", row) == "pairs_messages"
    assert preference_pair("pairs_messages", row) == Pair([(U, "q")], "good", "bad", 2.0)


def test_pairs_messages_trl_conversational_style():
    row = {
        "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }
    assert preference_pair("pairs_messages", row) == Pair([(U, "s\n\nq")], "good", "bad", None)


def test_pairs_messages_prefix_mismatch():
    row = {
        "chosen": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}],
        "rejected": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}],
    }
    with pytest.raises(FormatError, match="do not share the same prompt"):
        preference_pair("pairs_messages", row)


def test_hh_rlhf_transcripts():
    row = {
        "chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: fine, thanks",
        "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: go away",
    }
    assert detect("preference", row) == "hh_rlhf"
    pair = preference_pair("hh_rlhf", row)
    assert pair.prompt == [(U, "hi"), (M, "hello"), (U, "how are you?")]
    assert (pair.chosen, pair.rejected) == ("fine, thanks", "go away")


def test_hh_rlhf_prompt_mismatch():
    row = {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}
    with pytest.raises(FormatError, match="different prompts"):
        preference_pair("hh_rlhf", row)


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"prompt": "q", "chosen": "same", "rejected": " same "}, "identical"),
        ({"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "margin"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "field 'prompt' is empty"),
    ],
)
def test_bad_pairs(row, reason):
    with pytest.raises(FormatError, match=reason):
        preference_pair("pairs", row)


# -- Prompts -------------------------------------------------------------------------------------------------------
def test_prompt_strings_and_message_lists():
    assert detect("prompts", {"prompt": "q"}) == "prompt"
    assert prompt_turns("prompt", {"prompt": " q "}) == [(U, "q")]
    row = {
        "prompt": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
        ]
    }
    assert detect("prompts", row) == "prompt_messages"
    assert prompt_turns("prompt_messages", row) == [(U, "a"), (M, "b"), (U, "c")]
    assert prompt_turns("messages", {"messages": row["prompt"]}) == [(U, "a"), (M, "b"), (U, "c")]
    assert prompt_turns("alpaca", {"instruction": "i", "input": "x", "output": "ignored"}) == [(U, "i\n\nx")]


def test_prompt_must_end_on_user_turn():
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(FormatError, match="must end on a user turn"):
        prompt_turns("messages", row)
