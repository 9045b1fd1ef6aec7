"""The one generate-and-score helper (PPO's rollouts and panel, the SFT panel, the report): stops and truncation,
the inputs it builds for scoring, texts before the stop token, and scores read on the sampled ids themselves."""

from __future__ import annotations

import pytest
import torch

from data_prep.gemma_format import stop_token_ids
from pipeline.core.sampling import Generation, generate, left_pad, score, score_at


@pytest.fixture(scope="module")
def models(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1).eval()
    return lm, rm


def _prompt(tokenizer, text):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=False
    )


def test_generation_bookkeeping_by_hand(tokenizer):
    pad, (eot, eos) = tokenizer.pad_token_id, stop_token_ids(tokenizer)
    a, b = (tokenizer.convert_tokens_to_ids(t) for t in ("a", "b"))
    queries = torch.tensor([[pad, 10, 11], [12, 13, 14]])
    responses = torch.tensor([[a, eot, pad, pad], [a, b, eos, pad]])
    g = Generation(queries, responses, torch.tensor([1, 2]), torch.tensor([True, True]), pad)
    seq, mask, pos = g.inputs()
    assert mask.tolist() == [[0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0]]
    assert pos.tolist() == [[0, 0, 1, 2, 3, 4, 4], [0, 1, 2, 3, 4, 5, 6]]
    assert g.stop_index.tolist() == [4, 5] and seq[0, 4] == eot and seq[1, 5] == eos
    assert g.texts(tokenizer) == ["a", "ab"]  # the stop token is not part of the text
    assert g.ended_on(eot) == [True, False] and g.ended_on(eos) == [False, True]
    never = Generation(queries[:1], torch.tensor([[b, b, b, b]]), torch.tensor([3]), torch.tensor([False]), pad)
    assert never.texts(tokenizer) == ["bbbb"] and never.ended_on(eot) == [False]


def test_generate_stops_truncates_and_matches_hf_generate(models, tokenizer):
    lm, _ = models
    pad, stops = tokenizer.pad_token_id, stop_token_ids(tokenizer)
    prompts = [_prompt(tokenizer, "사과는 무엇인가요?"), _prompt(tokenizer, "안녕")]
    q = left_pad(prompts, pad, "cpu")
    g = generate(lm, q, pad_id=pad, stop_ids=stops, max_new_tokens=12, chunk=1)
    assert g.responses.shape == (2, 12)
    for i in range(2):
        row, n = g.responses[i].tolist(), int(g.seq_len[i])
        if g.stopped[i]:
            assert row[n] in stops and all(t not in stops for t in row[:n]) and set(row[n + 1 :]) <= {pad}
        else:
            assert n == 11 and all(t not in stops for t in row)
        # Greedy: the same ids as transformers' own generate of that prompt alone, up to the stop.
        x = torch.tensor([prompts[i]])
        ref = lm.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=12, eos_token_id=stops)
        ref = ref[0, x.size(1) :].tolist()
        assert row[: n + 1] == ref[: n + 1]
    # With no stop ids every response has the full length, whatever the model's own eos setting.
    full = generate(lm, q, pad_id=pad, stop_ids=[], max_new_tokens=12, temperature=1.0)
    assert not full.stopped.any() and (full.seq_len == 11).all()
    assert lm.generation_config.eos_token_id is not None  # restored after the call


def test_scores_are_read_on_the_sampled_ids_not_on_retokenized_text(models, tokenizer):
    """A sample spelled with other ids than the tokenizer would choose for its text (byte-level pieces instead of
    merged tokens) is scored on those ids, as PPO optimises them. The old report decoded and tokenized again."""
    _, rm = models
    pad, (eot, _) = tokenizer.pad_token_id, stop_token_ids(tokenizer)
    prompt = _prompt(tokenizer, "사과는 무엇인가요?")
    text = "사과는 좋아요"
    merged = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [i for ch in text for i in tokenizer(ch, add_special_tokens=False)["input_ids"]]
    assert pieces != merged and tokenizer.decode(pieces) == text == tokenizer.decode(merged)
    sampled = pieces + [eot]
    g = Generation(
        torch.tensor([prompt]),
        torch.tensor([sampled + [pad] * 3]),
        torch.tensor([len(pieces)]),
        torch.tensor([True]),
        pad,
    )
    got = score(rm, g)
    with torch.no_grad():
        on_sampled = rm(input_ids=torch.tensor([prompt + sampled])).logits[0, 0]
        on_retokenized = rm(input_ids=torch.tensor([prompt + merged + [eot]])).logits[0, 0]
    assert torch.allclose(got[0], on_sampled, atol=1e-5)
    assert not torch.allclose(got[0], on_retokenized, atol=1e-3)  # the bug this guards against changes the score
    # score() is score_at() at each response's stop token.
    seq, mask, pos = g.inputs()
    assert torch.equal(got, score_at(rm, seq, mask, pos, g.stop_index))
