"""Gemma formatting: exact text, ids and masks per turn, system folding, control tokens, and the chat template."""

from __future__ import annotations

import pytest

from data_prep.gemma_format import CHAT_TEMPLATE, FormatError, GemmaEncoder, render, to_turns

MESSY = [
    {"role": "system", "content": "You are terse.  "},
    {"role": "user", "content": "  Hi there \n"},
    {"role": "assistant", "content": "\tHello!  "},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": " 4 "},
]
MESSY_TEXT = (
    "<bos><start_of_turn>user\nYou are terse.  \n\nHi there<end_of_turn>\n"
    "<start_of_turn>model\nHello!<end_of_turn>\n"
    "<start_of_turn>user\n2+2?<end_of_turn>\n"
    "<start_of_turn>model\n4<end_of_turn>\n"
)


def test_render_exact_multi_turn_with_system_and_messy_whitespace():
    assert render(MESSY) == MESSY_TEXT


def test_render_generation_prompt_and_no_eos():
    text = render([{"role": "user", "content": "안녕하세요?"}], add_generation_prompt=True)
    assert text == "<bos><start_of_turn>user\n안녕하세요?<end_of_turn>\n<start_of_turn>model\n"
    assert "<eos>" not in render(MESSY)


def test_system_text_is_folded_unstripped_and_user_text_stripped():
    turns = to_turns([{"role": "system", "content": " 규칙: 존댓말 \n"}, {"role": "user", "content": "\n질문 "}])
    assert turns == [("user", " 규칙: 존댓말 \n\n\n질문")]


def test_content_parts_are_joined_like_the_template(tokenizer):
    msgs = [
        {"role": "user", "content": [{"type": "text", "text": " a "}, {"type": "text", "text": "b "}]},
        {"role": "assistant", "content": "c"},
    ]
    assert render(msgs) == "<bos><start_of_turn>user\nab<end_of_turn>\n<start_of_turn>model\nc<end_of_turn>\n"
    assert tokenizer.apply_chat_template(msgs, tokenize=False) == render(msgs)


@pytest.mark.parametrize(
    "messages",
    [
        MESSY,
        [{"role": "user", "content": "사과는 무엇인가요?"}],
        [{"role": "system", "content": "당신은 친절한 도우미입니다."}, {"role": "user", "content": " 3 더하기 4는? "}],
        [{"role": "user", "content": "a"}, {"role": "model", "content": "b"}, {"role": "user", "content": "c"}],
    ],
)
@pytest.mark.parametrize("gen", [False, True])
def test_tokenizer_chat_template_reproduces_render(tokenizer, messages, gen):
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == render(messages, gen)


def test_chat_template_refuses_roles_out_of_order(tokenizer):
    with pytest.raises(Exception, match="alternate"):
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], tokenize=False
        )


def test_ids_and_masks_per_turn(tokenizer, encoder):
    def plain(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    bos, sot, eot = (tokenizer.convert_tokens_to_ids(t) for t in ("<bos>", "<start_of_turn>", "<end_of_turn>"))
    nl, user, model = plain("\n"), plain("user\n"), plain("model\n")
    c1, c2, c3, c4 = plain("You are terse.  \n\nHi there"), plain("Hello!"), plain("2+2?"), plain("4")
    expected_ids = (
        [bos]
        + [sot, *user, *c1, eot, *nl]
        + [sot, *model, *c2, eot, *nl]
        + [sot, *user, *c3, eot, *nl]
        + [sot, *model, *c4, eot, *nl]
    )
    expected_mask = (
        [0]
        + [0] * (1 + len(user) + len(c1) + 1 + len(nl))
        + [0] * (1 + len(model))
        + [1] * (len(c2) + 1)
        + [0] * len(nl)
        + [0] * (1 + len(user) + len(c3) + 1 + len(nl))
        + [0] * (1 + len(model))
        + [1] * (len(c4) + 1)
        + [0] * len(nl)
    )
    enc = encoder.encode(MESSY)
    assert enc.input_ids == expected_ids
    assert enc.labels_mask == expected_mask
    # Exactly one <bos>, and the ids equal the tokenizer's ids of the rendered text (no re-tokenization drift).
    assert enc.input_ids.count(bos) == 1
    assert enc.input_ids == tokenizer(MESSY_TEXT, add_special_tokens=False)["input_ids"]
    # The trained tokens are exactly the model contents, each with its <end_of_turn>.
    trained = [t for t, m in zip(enc.input_ids, enc.labels_mask) if m]
    assert tokenizer.decode(trained) == "Hello!<end_of_turn>4<end_of_turn>"
    assert trained.count(eot) == 2


def test_generation_prompt_ids(tokenizer, encoder):
    enc = encoder.encode([{"role": "user", "content": "안녕"}], add_generation_prompt=True)
    assert tokenizer.decode(enc.input_ids) == render([{"role": "user", "content": "안녕"}], True)
    assert sum(enc.labels_mask) == 0
    assert enc.input_ids[-3:] == [
        tokenizer.convert_tokens_to_ids("<start_of_turn>"),
        *tokenizer("model\n", add_special_tokens=False)["input_ids"],
    ]


@pytest.mark.parametrize("control", ["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>"])
def test_control_token_text_in_content_is_rejected(encoder, control):
    with pytest.raises(FormatError, match="control-token"):
        encoder.encode(
            [{"role": "user", "content": f"please say {control} now"}, {"role": "assistant", "content": "ok"}]
        )


def test_control_token_text_as_plain_text(tokenizer):
    enc = GemmaEncoder(tokenizer, control_tokens="as_text")
    msgs = [{"role": "user", "content": "x<end_of_turn>y<bos>"}, {"role": "assistant", "content": "ok"}]
    out = enc.encode(msgs)
    eot, bos = tokenizer.convert_tokens_to_ids("<end_of_turn>"), tokenizer.convert_tokens_to_ids("<bos>")
    assert out.input_ids.count(eot) == 2  # the structural ones only
    assert out.input_ids.count(bos) == 1
    assert "x<end_of_turn>y<bos>" in tokenizer.decode(out.input_ids)


@pytest.mark.parametrize(
    "messages, reason",
    [
        ("hello", "must be a list"),
        ([], "no messages"),
        (["hi"], "must be an object"),
        ([{"content": "x"}], "missing field 'role'"),
        ([{"role": "user"}], "missing field 'content'"),
        ([{"role": 3, "content": "x"}], "role must be a string"),
        ([{"role": "user", "content": None}], "content is null"),
        ([{"role": "user", "content": "   "}], "content is empty"),
        ([{"role": "user", "content": 5}], "must be a string"),
        ([{"role": "tool", "content": "x"}], "unknown role 'tool'"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only allowed first"),
        ([{"role": "assistant", "content": "a"}], "roles out of order"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "roles out of order"),
        ([{"role": "system", "content": "s"}], "followed by a user turn"),
        ([{"role": "system", "content": " "}, {"role": "user", "content": "u"}], "system content is empty"),
    ],
)
def test_bad_dialogues_name_the_reason(messages, reason):
    with pytest.raises(FormatError, match=reason.replace("(", r"\(")):
        to_turns(messages)


def test_pad_equal_to_eos_is_refused(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.pad_token = tok.eos_token
    with pytest.raises(FormatError, match="pad"):
        GemmaEncoder(tok)
