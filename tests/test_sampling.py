"""The one generate-and-score helper (PPO's rollouts and panel, the SFT panel, the report): stops and truncation,
the inputs it builds for scoring, texts before the stop token, and scores read on the sampled ids themselves; the
sampler's distribution (chi-square tests of ``draw`` and of ``generate``), ids of probability 0, and NaN logits.
The decoding loop on Gemma 2 and Gemma 3 architectures: tests/test_decoding.py."""

from __future__ import annotations

import pytest
import torch

from data_prep.gemma_format import stop_token_ids
from pipeline.core import ppo_math as pm
from pipeline.core.sampling import Generation, draw, generate, left_pad, score, score_at


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


# ----------------------------------------------------------------------------------------------------------------
# The sampler's distribution: chi-square goodness of fit
# ----------------------------------------------------------------------------------------------------------------

SIGNIFICANCE = 1e-3  # a sampler is rejected when the chi-square p-value falls below this


def chi_square(ids: torch.Tensor, p: torch.Tensor, min_expected: float = 5.0) -> tuple[float, float]:
    """(statistic, p-value) of Pearson's chi-square goodness-of-fit test of the drawn ``ids`` against the
    probabilities ``p`` (float64). Cells expected fewer than ``min_expected`` times are pooled into one (the usual
    condition for the chi-square approximation); an id of probability 0 that was drawn makes the statistic infinite.
    The p-value is the chi-square survival function, the regularised upper incomplete gamma Q(df/2, x/2)
    (``torch.special.gammaincc``: scipy is not installed)."""
    p = p.double()
    observed = torch.bincount(ids, minlength=p.numel()).double()
    expected = p * ids.numel()
    if bool((observed[p == 0] > 0).any()):
        return float("inf"), 0.0
    small = expected < min_expected
    obs = torch.cat([observed[~small], observed[small].sum().reshape(1)])
    exp = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = torch.tensor((obs.numel() - 1) / 2, dtype=torch.float64)
    return float(stat), float(torch.special.gammaincc(df, stat / 2))


def test_chi_square_p_values_match_the_tables():
    """The p-value function itself, at textbook critical values (df 10: 18.307 at 0.05, 29.588 at 0.001; df 80:
    124.839 at 0.001), so a wrong survival function cannot make the tests below accept anything."""
    for df, x, alpha in [(10, 18.307, 0.05), (10, 29.588, 0.001), (80, 124.839, 0.001)]:
        q = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(x / 2.0)))
        assert abs(q - alpha) < 0.01 * alpha, (df, x, q)


def _shaped_logits(V: int = 80) -> torch.Tensor:
    """A decreasing, bumpy distribution over V ids: at T=0.7 the 30 ids outside the top 50 hold 2.5% of the mass
    and the rarest id 2e-4 (43 expected draws in 200k)."""
    g = torch.Generator().manual_seed(0)
    return torch.linspace(2.0, -2.0, V) + 0.3 * torch.randn(V, generator=g)


def _draws(logp: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return draw(logp.exp().expand(n, -1), torch.rand(n, 1, dtype=torch.float64))


def test_draw_passes_a_chi_square_test_and_top_k_or_a_wrong_temperature_do_not():
    """Catches a sampler that draws from another distribution than softmax(logits / T): the wrong temperature, a
    top-k of 50 (transformers' default ``generation_config.top_k``), an off-by-one in the inverse transform. 200,000
    draws of ``sampling.draw`` on the probabilities ``softmax(logits / T)`` (what ``generate`` passes it) over 80 ids pass
    Pearson's chi-square test against the exact distribution at p > 1e-3 (measured p 0.017 to 0.95 over seeds 1 to
    5), as do 200,000 draws of ``torch.multinomial`` (transformers' sampler; on the CPU it consumes the same uniform
    stream as ``draw``, so it gets a seed of its own). Negative controls, the same test against the same exact
    distribution: draws from the top-50 truncation, from T * 1.1 and from T * 0.9 are each rejected (measured
    statistics 5230, 1630 and 1910 on 79 degrees of freedom: p below 1e-280; even a temperature 2% off gives
    p 6e-5)."""
    T, n = 0.7, 200_000
    logits = _shaped_logits()
    exact = torch.softmax(logits.double() / T, -1)

    def logp(temperature: float, top_k: int | None = None) -> torch.Tensor:
        z = logits / temperature
        if top_k is not None:
            z = z.masked_fill(z < z.topk(top_k).values[-1], -float("inf"))
        return torch.log_softmax(z, -1)

    stat, p = chi_square(_draws(logp(T), n, seed=1), exact)
    assert p > SIGNIFICANCE, (stat, p)
    torch.manual_seed(2)
    stat, p = chi_square(torch.multinomial(exact, n, replacement=True), exact)
    assert p > SIGNIFICANCE, (stat, p)
    for name, wrong in [("top-k 50", logp(T, top_k=50)), ("T * 1.1", logp(T * 1.1)), ("T * 0.9", logp(T * 0.9))]:
        stat, p = chi_square(_draws(wrong, n, seed=3), exact)
        assert p < SIGNIFICANCE and stat > 500, (name, stat, p)


def test_generate_draws_its_first_token_from_the_soft_capped_tempered_distribution(monkeypatch):
    """The same test through the whole decoding loop, not only ``draw``: 30,000 left-padded copies of one prompt to a
    tiny soft-capped Gemma 2 (tests/test_decoding.py), one token each at T=0.7, against softmax of transformers'
    own forward of the unpadded prompt (soft-capped by the model) at T. Catches a loop that applies the temperature
    twice or not at all, skips the final-logit soft-cap, or shifts the distribution under padding (51 of the 64
    cells expected 5 or more times, the rest pooled; measured p 0.065 to 0.83 over seeds). Negative controls
    rejected by the same test: ``generate`` at T * 1.1 (measured p 1e-57 to 1e-74) and ``generate`` with the
    soft-cap removed from our head (statistic 2488, p 0)."""
    from pipeline.core import heads
    from tests.test_decoding import tiny_lm

    V, T, n = 64, 0.7, 30_000
    model = tiny_lm("gemma2", vocab=V, layers=2, head_std=0.3)
    prompt = [5, 17, 9, 33]
    with torch.no_grad():
        z = model(input_ids=torch.tensor([prompt])).logits[0, -1].double()
    exact = torch.softmax(z / T, -1)
    q = torch.zeros(n, len(prompt) + 1, dtype=torch.long)  # one pad column (pad id 0) on every row
    q[:, 1:] = torch.tensor(prompt)

    def first_tokens(temperature: float) -> torch.Tensor:
        torch.manual_seed(11)
        g = generate(model, q, pad_id=0, stop_ids=[], max_new_tokens=1, temperature=temperature, chunk=n)
        return g.responses[:, 0]

    stat, p = chi_square(first_tokens(T), exact)
    assert p > SIGNIFICANCE, (stat, p)
    stat, p = chi_square(first_tokens(T * 1.1), exact)
    assert p < SIGNIFICANCE, ("T * 1.1", stat, p)
    monkeypatch.setattr(heads, "softcap", lambda model: None)
    stat, p = chi_square(first_tokens(T), exact)
    assert p < SIGNIFICANCE, ("no soft-cap", stat, p)


def test_draw_never_returns_an_id_of_probability_zero_when_u_times_the_total_is_the_total():
    """Catches the inverse transform returning an id of probability 0 (a masked id: a pad, an id -inf in the
    logits) when ``u * total`` rounds up to the total itself (``u`` of 1.0, or a float32 uniform rounded up): the
    cumulative sum is flat over the trailing zero-probability ids, so the first index above the total is past the
    vocabulary. ``draw`` returns the last id of positive probability. Negative control: the old rule,
    ``searchsorted(cdf, u * total, right=True).clamp(max=V - 1)``, returns the vocabulary's last id, of probability
    0."""
    V = 10
    logits = torch.randn(2, V)
    logits[0, 6:] = -float("inf")  # ids 6..9 have probability 0; id 5 is the last positive one
    logits[1, [2, 8, 9]] = -float("inf")  # a zero-probability id inside as well; id 7 is the last positive one
    logp = torch.log_softmax(logits, -1)
    u = torch.ones(2, 1, dtype=torch.float64)
    assert draw(logp.exp(), u).tolist() == [5, 7]
    nearly = torch.full((2, 1), 1.0 - 2.0**-53, dtype=torch.float64)  # the largest float64 below 1
    assert draw(logp.exp(), nearly).tolist() == [5, 7]
    assert draw(logp.exp(), torch.zeros(2, 1, dtype=torch.float64)).tolist() == [0, 0]
    cdf = torch.cumsum(logp.exp(), -1, dtype=torch.float64)
    old = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=V - 1).squeeze(1)
    assert old.tolist() == [V - 1, V - 1] and bool((logp.gather(1, old.unsqueeze(1)) == -float("inf")).all())


def _poisoned(model, where: str, rows):
    from copy import deepcopy

    bad = deepcopy(model)
    with torch.no_grad():
        if where == "head":
            bad.lm_head.weight[7, 3] = float("nan")
        else:
            bad.model.embed_tokens.weight[rows] = float("nan")
    return bad


@pytest.mark.parametrize("temperature", [None, 0.7], ids=["greedy", "sampled"])
def test_non_finite_logits_stop_decoding_by_name_at_the_response_token(temperature):
    """Catches a decoding loop that keeps going on NaN logits (weights holding NaN), returning arbitrary ids whose
    NaN log-probs only surface later in the PPO loss, far from the cause: greedy decoding and sampling both stop
    with ``NonFiniteLossError`` naming the response token and the decoding mode. A NaN in the output head stops
    at response token 1; a NaN in the input embedding of the token generated first stops at response token 2 (its
    logits were finite when it was chosen; the next step reads its embedding). Negative control: the finite model
    decodes the same batch without raising."""
    from pipeline.core.faults import NonFiniteLossError
    from tests.test_decoding import tiny_lm

    model = tiny_lm("gemma2", vocab=64, layers=2)
    q = left_pad([[5, 17, 9, 33], [12, 40]], 0, "cpu")
    how = "greedy decoding" if temperature is None else "sampling"

    def run(m):
        torch.manual_seed(5)
        return generate(m, q, pad_id=0, stop_ids=[], max_new_tokens=4, temperature=temperature)

    finite = run(model)  # negative control: no error
    assert torch.isfinite(finite.logprobs).all()
    with pytest.raises(NonFiniteLossError, match=rf"response token 1 \({how}\)"):
        run(_poisoned(model, "head", None))
    first = sorted(set(finite.responses[:, 0].tolist()) - set(q.flatten().tolist()))
    assert first, finite.responses  # the first tokens are not prompt ids, so their embeddings are read only at step 2
    with pytest.raises(NonFiniteLossError, match=rf"response token 2 \({how}\)"):
        run(_poisoned(model, "embedding", first))
