"""The one generate-and-score helper (PPO's rollouts and panel, the SFT panel, the report): stops and truncation,
the inputs it builds for scoring, texts before the stop token, and scores read on the sampled ids themselves."""

from __future__ import annotations

import pytest
import torch

from data_prep.gemma_format import stop_token_ids
from pipeline.core import ppo_math as pm
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


def _hf_sample(lm, q, pad, stops, n, temperature):
    from transformers import GenerationConfig

    gen = GenerationConfig(
        max_new_tokens=n,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        pad_token_id=pad,
        eos_token_id=list(stops) or None,
        bos_token_id=None,
    )
    own = lm.generation_config
    lm.generation_config = gen
    try:
        out = lm.generate(input_ids=q, attention_mask=(q != pad).long(), generation_config=gen)
    finally:
        lm.generation_config = own
    resp = out[:, q.size(1) :]
    return torch.nn.functional.pad(resp, (0, n - resp.size(1)), value=pad)


def test_our_decoding_loop_follows_transformers_generate_on_a_padded_batch(models, tokenizer):
    """Catches a hand-written decoding loop that computes other logits than transformers' ``generate``: a cache or
    attention mask wrong under left padding, a token fed back into the wrong slot. Greedy on a left-padded batch
    gives transformers' tokens; sampled with stops, the log-probs the loop reports are those of a full forward over
    the sampled tokens at the temperature (T8), and post-stop positions hold pad and no log-prob."""
    from transformers import GenerationConfig

    lm, _ = models
    pad = tokenizer.pad_token_id
    # The untrained toy rarely samples <end_of_turn>: a tenth of the vocabulary stops, so some rows stop and some don't.
    stops = [i for i in range(lm.config.vocab_size) if i % 10 == 3 and i != pad]
    prompts = [_prompt(tokenizer, t) for t in ("사과는 무엇인가요?", "안녕", "3 더하기 4는 무엇인가요?")]
    q = left_pad(prompts, pad, "cpu")
    ours = generate(lm, q, pad_id=pad, stop_ids=[3], max_new_tokens=10)
    gen = GenerationConfig(max_new_tokens=10, do_sample=False, pad_token_id=pad, eos_token_id=[3], bos_token_id=None)
    theirs = lm.generate(input_ids=q, attention_mask=(q != pad).long(), generation_config=gen)[:, q.size(1) :]
    theirs = torch.nn.functional.pad(theirs, (0, 10 - theirs.size(1)), value=pad)
    assert torch.equal(ours.responses, pm.truncate_after_stop(theirs, [3], pad)[0])
    assert (q == pad).any()  # the batch is left-padded
    torch.manual_seed(7)
    sampled = generate(lm, q.repeat(4, 1), pad_id=pad, stop_ids=stops, max_new_tokens=10, temperature=0.7)
    assert sampled.stopped.any() and not sampled.stopped.all()  # both kinds of row were exercised
    seq, mask, pos = sampled.inputs()
    logits = lm(input_ids=seq, attention_mask=mask, position_ids=pos).logits[:, q.size(1) - 1 : -1]
    full = torch.log_softmax(logits.float() / 0.7, -1).gather(-1, sampled.responses.unsqueeze(-1)).squeeze(-1)
    valid = pm.valid_mask(sampled.seq_len, 10)
    assert (torch.where(valid, full - sampled.logprobs, 0.0)).abs().max() < 1e-4
    assert (sampled.logprobs[~valid] == 0).all() and (sampled.entropy[valid] > 0).all()
    # Negative control: the same check against log-probs without the temperature fails.
    no_t = torch.log_softmax(logits.float(), -1).gather(-1, sampled.responses.unsqueeze(-1)).squeeze(-1)
    assert (torch.where(valid, no_t - sampled.logprobs, 0.0)).abs().max() > 1e-2


@pytest.mark.slow
def test_our_sampler_matches_transformers_in_distribution(chain, tokenizer):
    """The statistical version, with independent seeds, on the trained toy (the SFT model of the test chain; the
    untrained one is too flat for a few thousand samples to tell anything apart): over 3000 samples of one prompt the
    per-position token frequencies of the first four response tokens agree with transformers' (total variation
    below 0.12). Negative control: our sampler at temperature 1.0 against transformers' at 0.7 is told apart by the
    same statistic."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(chain / "tiny_ko" / "sft" / "final").eval()
    pad = tokenizer.pad_token_id
    q = left_pad([_prompt(tokenizer, "사과는 무엇인가요?")] * 3000, pad, "cpu")

    def tv(a: torch.Tensor, b: torch.Tensor) -> float:
        worst = 0.0
        for t in range(a.size(1)):
            ca = torch.bincount(a[:, t], minlength=lm.config.vocab_size).float() / a.size(0)
            cb = torch.bincount(b[:, t], minlength=lm.config.vocab_size).float() / b.size(0)
            worst = max(worst, 0.5 * float((ca - cb).abs().sum()))
        return worst

    torch.manual_seed(1)
    ours = generate(lm, q, pad_id=pad, stop_ids=[], max_new_tokens=4, temperature=0.7, chunk=1000).responses
    torch.manual_seed(2)
    theirs = _hf_sample(lm, q, pad, [], 4, 0.7)
    torch.manual_seed(3)
    hotter = generate(lm, q, pad_id=pad, stop_ids=[], max_new_tokens=4, temperature=1.0, chunk=1000).responses
    same, different = tv(ours, theirs), tv(hotter, theirs)
    assert same < 0.12, same  # measured 0.06 to 0.08 per position
    assert different > 0.18, different  # measured 0.25 to 0.27


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
