"""Our decoding loop (``pipeline.core.sampling.generate``: StaticCache, left padding, the soft-capped head of
``pipeline.core.heads``) on the architectures it is meant for, where transformers' own ``generate`` was the only
thing the other tests ran: Gemma 2 (final-logit soft-cap, alternating sliding-window layers, attention soft-cap) and
Gemma 3 (a mix of sliding-window and full-attention layers), as tiny random-init models built here (no downloads),
with left-padded prompts, some longer than the sliding window.

The log-probs ``generate`` records for each token must be those of the training forward (``response_logprobs`` over
the padded prompt + response) and of a plain per-row forward without any padding (transformers' own forward, which
soft-caps by itself). Measured on this machine: at most 4.5e-6 (float32, both architectures, eager and SDPA
attention, greedy and T=0.7); the tolerance is ``TOL`` = 2e-5."""

from __future__ import annotations

import pytest
import torch

from pipeline.core import ppo_math as pm
from pipeline.core.policy import response_logprobs
from pipeline.core.sampling import generate, left_pad

PAD, EOS, BOS = 0, 1, 2
VOCAB = 256
WINDOW = 4
PROMPT_LENGTHS = (11, 3, 7, 5)  # left-padded to 11; three prompts are longer than the window
NEW_TOKENS = 8
STOPS = [i for i in range(3, VOCAB) if i % 16 == 5]  # sampling: a sixteenth of the vocabulary stops, some rows early
TOL = 2e-5  # measured max |difference| 4.5e-6
CAP = 5.0  # Gemma 2's final-logit soft-cap here (30 in the real model): the logits reach past it, so it matters


def tiny_lm(
    kind: str,
    *,
    sliding_window: int = WINDOW,
    vocab: int = VOCAB,
    layers: int = 4,
    head_std: float = 0.5,
    attn: str = "eager",
    seed: int = 0,
):
    """A random-init causal LM of ``kind`` ("gemma2": soft-capped at ``CAP``, sliding-window layers alternating with
    full attention; "gemma3": three sliding-window layers and one full-attention layer) with hidden size 32 and an
    untied head of weight std ``head_std``, so the logits spread over several units (with transformers' 0.02
    initialisation every distribution is close to uniform and neither the soft-cap nor the temperature shows)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=sliding_window,
        max_position_embeddings=128,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
        attn_implementation=attn,
    )
    torch.manual_seed(seed)
    if kind == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(final_logit_softcapping=CAP, **common))
    else:
        types = (["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"] * layers)[:layers]
        model = Gemma3ForCausalLM(Gemma3TextConfig(layer_types=types, final_logit_softcapping=None, **common))
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, head_std)
    return model.eval()


def _widened(model):
    """The same weights with a sliding window wider than any sequence here: full attention everywhere."""
    config = type(model.config)(**{**model.config.to_dict(), "sliding_window": 1000})
    wide = type(model)(config).eval()
    wide.load_state_dict(model.state_dict())
    return wide


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def _unpadded_logprobs(model, prompts, g, temperature: float) -> list[torch.Tensor]:
    """Per row, without any padding: transformers' own forward over prompt + valid response (soft-capped by the
    model's forward), log_softmax(logits / T) at the response tokens; with the logits, for argmax checks."""
    out = []
    for i, p in enumerate(prompts):
        n = int(g.seq_len[i]) + 1
        resp = g.responses[i, :n]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + resp.tolist()])).logits[0, len(p) - 1 : -1].float()
        out.append((torch.log_softmax(logits / temperature, -1).gather(-1, resp.unsqueeze(-1)).squeeze(-1), logits))
    return out


CASES = [("gemma2", "eager"), ("gemma3", "eager"), ("gemma3", "sdpa")]


@pytest.mark.parametrize("temperature", [None, 0.7], ids=["greedy", "sampled"])
@pytest.mark.parametrize(("kind", "attn"), CASES, ids=[f"{k}-{a}" for k, a in CASES])
def test_our_decoding_loop_equals_the_full_forward_on_sliding_window_and_soft_capped_models(kind, attn, temperature):
    """Catches a decoding loop whose per-step logits differ from the model's: a StaticCache whose sliding-window
    layers drop or keep the wrong keys once a left-padded prompt is longer than the window, the final-logit soft-cap
    missing or applied after the temperature, response positions that ignore the prompt's padding, a pad column
    attended to, a token fed back into the wrong cache slot. ``g.logprobs`` (what PPO stores as the rollout's
    log-probs) must equal (a) ``response_logprobs`` over the padded prompt + response, as training computes them,
    and (b) transformers' forward of each row alone, without padding; greedy tokens must be the argmax of (b).

    Negative controls, each beyond ``TOL`` by orders of magnitude: (b) without the soft-cap (Gemma 2); (a) with the
    sliding window widened to full attention (the window matters for these prompts); (a) with the response's
    positions counted from the padded column (a loop that starts the response at position C instead of the prompt's
    length: measured 4.6e-3 to 6.2); (a) with the pads attended to. (Position ids that are simply not shifted for
    padding, ``arange`` over every column, are no control: RoPE sees only position differences, and the unshifted
    forward agrees with ``g.logprobs`` to 7e-6.)"""
    model = tiny_lm(kind, attn=attn)
    prompts = _prompts()
    q = left_pad(prompts, PAD, "cpu")
    assert (q == PAD).any() and max(PROMPT_LENGTHS) > WINDOW
    torch.manual_seed(3)
    stops = STOPS if temperature else []  # greedy runs every row to the full length
    g = generate(model, q, pad_id=PAD, stop_ids=stops, max_new_tokens=NEW_TOKENS, temperature=temperature, chunk=3)
    T = temperature or 1.0
    C, L = q.size(1), NEW_TOKENS
    valid = pm.valid_mask(g.seq_len, L)
    ids, mask, pos = g.inputs()

    def padded(m, attention=mask, position_ids=pos) -> float:
        with torch.no_grad():
            lp, _ = response_logprobs(m, ids, attention, position_ids, g.responses, T, valid=valid)
        return (lp - g.logprobs).abs().max().item()

    d_padded = padded(model)
    assert d_padded < TOL, d_padded  # (a)
    unpadded = _unpadded_logprobs(model, prompts, g, T)
    d_unpadded = max((lp - g.logprobs[i, : lp.numel()]).abs().max().item() for i, (lp, _) in enumerate(unpadded))
    assert d_unpadded < TOL, d_unpadded  # (b)
    if temperature is None:
        for i, (_, logits) in enumerate(unpadded):
            assert torch.equal(logits.argmax(-1), g.responses[i, : logits.size(0)]), i
    assert (g.logprobs[~valid] == 0).all()

    # Negative controls.
    if kind == "gemma2":
        no_cap = []
        for i, p in enumerate(prompts):
            n = int(g.seq_len[i]) + 1
            resp = g.responses[i, :n]
            with torch.no_grad():
                hidden = model.model(input_ids=torch.tensor([p + resp.tolist()])).last_hidden_state
                z = model.lm_head(hidden[0, len(p) - 1 : -1]).float()  # the head without the soft-cap
            lp = torch.log_softmax(z / T, -1).gather(-1, resp.unsqueeze(-1)).squeeze(-1)
            no_cap.append((lp - g.logprobs[i, :n]).abs().max().item())
        assert max(no_cap) > 100 * TOL, no_cap  # measured 2.4 (greedy) and 4.3 (T=0.7)
    assert padded(_widened(model)) > 100 * TOL  # measured 4.7 to 18
    gap = pos.clone()
    gap[:, C:] = torch.arange(C, C + L)
    assert padded(model, position_ids=gap) > 100 * TOL  # measured 4.6e-3 (Gemma 2) to 6.2 (Gemma 3)
    assert padded(model, attention=torch.ones_like(mask)) > 100 * TOL  # measured 0.027 to 2.5
    unshifted = torch.arange(C + L).expand_as(ids)
    assert padded(model, position_ids=unshifted) < TOL  # RoPE: a constant offset changes nothing


def test_sampled_rows_are_drawn_independently_under_padding_and_chunks():
    """Catches a loop that shares one uniform draw across rows or across chunks (every row would then follow the
    same path through the same distribution): one prompt six times, left-padded by a longer prompt and split over
    chunks of 3, gives six different samples at T=0.7, each with the log-probs of its own unpadded forward.
    Negative control: greedy decoding of the same batch gives six identical rows."""
    model = tiny_lm("gemma3")
    long = _prompts()[0]
    rows = [long] + [long[3:]] * 6  # the six copies get 3 pad columns
    q = left_pad(rows, PAD, "cpu")
    torch.manual_seed(4)
    g = generate(model, q, pad_id=PAD, stop_ids=[], max_new_tokens=NEW_TOKENS, temperature=0.7, chunk=3)
    assert len({tuple(r) for r in g.responses[1:].tolist()}) == 6
    for i, (lp, _) in enumerate(_unpadded_logprobs(model, rows, g, 0.7)):
        assert (lp - g.logprobs[i]).abs().max().item() < TOL, i
    greedy = generate(model, q, pad_id=PAD, stop_ids=[], max_new_tokens=NEW_TOKENS, chunk=3)
    assert len({tuple(r) for r in greedy.responses[1:].tolist()}) == 1
