"""Generate until a model turn ends, and score what was generated.

One helper for PPO's rollouts and prompt panel, the SFT prompt panel and the run report, so all of them stop at the
same tokens (``data_prep.gemma_format.stop_token_ids``: ``<end_of_turn>``, then ``<eos>``), truncate the same way
and read the reward model at the same position: the stop token of the sampled ids themselves. (Decoding a sample and
tokenizing the text again may give other ids than the model produced, so a score computed that way is not the score
PPO optimised.)

    g = generate(model, left_pad(prompt_ids, pad_id, device), pad_id=pad_id, stop_ids=stop_token_ids(tokenizer),
                 max_new_tokens=64, temperature=0.7)
    g.texts(tokenizer), g.stopped, score(reward_model, g)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.core import heads
from pipeline.core import ppo_math as pm
from pipeline.core.faults import NonFiniteLossError


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: Any) -> torch.Tensor:
    """Prompts as one (B, C) tensor, left-padded so that every response starts at column C."""
    width = max(len(p) for p in prompts)
    out = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        out[i, width - len(p) :] = torch.tensor(p)
    return out.to(device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """position_ids for left-padded rows: the first real token is 0 (pads get 0 too), so padding never changes a
    token's logits."""
    mask = mask.long()
    return mask.cumsum(1) - mask


def chunks(n: int, size: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` covering ``range(n)`` in pieces of at most ``size`` rows."""
    return [(i, min(i + size, n)) for i in range(0, n, size)]


@dataclass
class Generation:
    """Responses generated for left-padded prompts, kept as the sampled ids."""

    queries: torch.Tensor  # (B, C) left-padded prompts
    responses: torch.Tensor  # (B, L) generated ids; pad after the stop token
    seq_len: torch.Tensor  # (B,) index of the last valid token: the stop token, or L - 1 when the row never stopped
    stopped: torch.Tensor  # (B,) True where the response produced a stop token
    pad_id: int
    logprobs: torch.Tensor | None = (
        None  # (B, L) log softmax(logits / T)[token] as sampled (float32; 0 after the stop)
    )
    entropy: torch.Tensor | None = None  # (B, L) entropy of the sampled distribution (float32; 0 after the stop)

    @property
    def stop_index(self) -> torch.Tensor:
        """(B,) position of each response's last valid token in ``inputs()``: where the reward is read."""
        return self.queries.size(1) + self.seq_len

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids, attention_mask, position_ids)``, each (B, C+L), of prompt and truncated response. Inside a
        response only the tokens up to the stop token are attended to (a pad id there was never generated)."""
        C, L = self.queries.size(1), self.responses.size(1)
        seq = torch.cat([self.queries, self.responses], 1)
        mask = (seq != self.pad_id).long()
        mask[:, C:] = pm.valid_mask(self.seq_len, L).long()
        return seq, mask, positions(mask)

    def texts(self, tokenizer: Any) -> list[str]:
        """Each response's text before its stop token (the whole response when it never stopped), in one batch
        decode, without special tokens."""
        rows = zip(self.responses.tolist(), self.seq_len.tolist(), self.stopped.tolist())
        return tokenizer.batch_decode([r[: n + (0 if st else 1)] for r, n, st in rows], skip_special_tokens=True)

    def ended_on(self, token_id: int) -> list[bool]:
        """Whether each response stopped on ``token_id`` (e.g. ``<end_of_turn>`` rather than ``<eos>``)."""
        last = self.responses.gather(1, self.seq_len.unsqueeze(1)).squeeze(1)
        return (self.stopped & (last == token_id)).tolist()

    def rows(self, r: slice) -> Generation:
        """The rows ``r`` of every field."""
        pick = lambda t: None if t is None else t[r]  # noqa: E731
        return Generation(
            self.queries[r],
            self.responses[r],
            self.seq_len[r],
            self.stopped[r],
            self.pad_id,
            pick(self.logprobs),
            pick(self.entropy),
        )


def _synced_by_default() -> bool:
    """Under DeepSpeed ZeRO-3 with several processes every forward gathers parameters collectively, so every
    process must run the same number of decoding steps (transformers' ``synced_gpus``)."""
    import torch.distributed as dist
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled() and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def generate(
    model: Any,
    queries: torch.Tensor,
    *,
    pad_id: int,
    stop_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float | None = None,
    chunk: int = 64,
    synced_gpus: bool | None = None,
    head_precision: str = "fp32",
) -> Generation:
    """Responses of ``model`` to the left-padded ``queries`` (B, C), ``chunk`` rows at a time: plain temperature
    sampling (no top-k, no top-p, nothing else) or, with ``temperature=None``, greedy; stopping at ``stop_ids``
    (none: always ``max_new_tokens``). ``synced_gpus`` (every process runs every step, for ZeRO-3's collective
    parameter gathers) defaults to on under DeepSpeed ZeRO-3 with several processes. The result carries the
    log-prob and entropy of every sampled token under the distribution it was drawn from.

    Our own decoding loop rather than ``model.generate``: nothing of the model's ``generation_config`` can change
    the distribution (a ``repetition_penalty``, ``suppress_tokens``, a top_k of 50... docs/ppo.md, P5); no
    per-token logits processors, stopping criteria or cache set-up per call; and the sampled token's log-prob comes
    with it without keeping every step's (B, vocabulary) scores, as ``output_scores`` would (1 GB for 8 x 48 tokens
    on a 262k vocabulary). A token is drawn from ``softmax(logits / T)`` by inverse transform sampling: the first id
    whose cumulative probability (in float64) exceeds a uniform draw. It is the distribution transformers draws
    from with ``torch.multinomial`` (tests/test_sampling.py compares the two statistically) at a fraction of the
    cost: on a 262k vocabulary ``multinomial`` takes 72 ms per step for 8 rows on 2 CPU cores, the cumulative sum
    and search 3 ms (``exponential_`` for the Gumbel-max trick alone takes 62 ms). The output head runs in
    ``head_precision`` (``pipeline.core.heads``), soft-capped where the model caps. A chosen token whose log-prob is
    not finite (NaN or inf logits: the weights hold NaN or inf) stops generation, greedy or sampled, by name.
    """
    was_training = model.training
    model.eval()
    synced = _synced_by_default() if synced_gpus is None else synced_gpus
    parts = []
    try:
        for a, b in chunks(queries.size(0), chunk):
            parts.append(
                _decode(
                    model, queries[a:b], pad_id, list(stop_ids), max_new_tokens, temperature, synced, head_precision
                )
            )
    finally:
        if was_training:
            model.train()
    responses, logprobs, entropy = (torch.cat(t) for t in zip(*parts))
    responses, seq_len, stopped = pm.truncate_after_stop(responses, stop_ids, pad_id)
    after = ~pm.valid_mask(seq_len, responses.size(1))
    return Generation(
        queries, responses, seq_len, stopped, pad_id, logprobs.masked_fill(after, 0.0), entropy.masked_fill(after, 0.0)
    )


@torch.no_grad()
def _decode(
    model: Any,
    q: torch.Tensor,
    pad_id: int,
    stop_ids: list[int],
    max_new_tokens: int,
    temperature: float | None,
    synced: bool,
    head_precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk: a prefill forward over the prompts, then one forward per token over a key/value cache allocated
    once for prompt + response. Returns (responses, log-probs, entropies), each (B, max_new_tokens); a row that
    stopped gets pad ids after its stop token; the loop ends when every row has stopped (unless ``synced``)."""
    from transformers import StaticCache

    B, C = q.shape
    total = C + max_new_tokens
    decoder = model.get_decoder()
    cache = StaticCache(config=heads.text_config(model), max_cache_len=total)
    prompt_mask = (q != pad_id).long()
    attention = torch.zeros(B, total, dtype=torch.long, device=q.device)  # the whole width: future columns are 0
    attention[:, :C] = prompt_mask
    next_position = prompt_mask.sum(1, keepdim=True)  # (B, 1): left padding, so the first response token's position
    responses = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=q.device)
    logprobs = torch.zeros(B, max_new_tokens, device=q.device)
    entropy = torch.zeros(B, max_new_tokens, device=q.device)
    stops = torch.tensor(stop_ids, dtype=torch.long, device=q.device)
    done = torch.zeros(B, dtype=torch.bool, device=q.device)

    def next_logits(input_ids, position_ids) -> torch.Tensor:
        """(B, V) fp32 logits / T (soft-capped where the model caps) after the last given token."""
        hidden = decoder(
            input_ids=input_ids, attention_mask=attention, position_ids=position_ids, cache=cache, use_cache=True
        ).last_hidden_state[:, -1]
        return heads.scaled_logits(model, hidden, temperature or 1.0, head_precision)

    scaled = next_logits(q, positions(prompt_mask))
    for t in range(max_new_tokens):
        logp = torch.log_softmax(scaled, dim=-1)
        p = logp.exp()
        if temperature is None:
            token = scaled.argmax(-1)
        else:
            token = draw(p, torch.rand(B, 1, dtype=torch.float64, device=q.device))
        chosen = logp.gather(1, token.unsqueeze(1)).squeeze(1)
        if not bool(torch.isfinite(chosen[~done]).all()):
            how = "greedy decoding" if temperature is None else "sampling"
            raise NonFiniteLossError(
                f"non-finite logits at response token {t + 1} ({how}): the model's weights hold NaN or inf"
            )
        token = token.masked_fill(done, pad_id)
        responses[:, t] = token
        logprobs[:, t] = chosen
        entropy[:, t] = -(p * logp).nan_to_num_(0.0).sum(-1)  # 0 * -inf of a masked id counts 0
        done |= torch.isin(token, stops)
        if t + 1 == max_new_tokens or (bool(done.all()) and not synced):
            break
        attention[:, C + t] = 1
        scaled = next_logits(token.unsqueeze(1), next_position + t)
    return responses, logprobs, entropy


def draw(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(B,) ids drawn from (B, V) probabilities by inverse transform sampling with (B, 1) float64 uniforms ``u``
    in [0, 1): the first id whose cumulative probability (in float64) exceeds ``u`` times the total. Never an id of
    probability 0: where ``u`` times the total rounds up to the total itself, the last id of positive probability
    (not the vocabulary's last id, which may have probability 0)."""
    cdf = torch.cumsum(p, -1, dtype=torch.float64)
    total = cdf[:, -1:]
    token = torch.searchsorted(cdf, u * total, right=True)
    last_positive = torch.searchsorted(cdf, total.contiguous(), right=False)  # where the cdf reaches its total
    # NaN probabilities put both searches past the end: the clamp keeps the id in range, so that the caller's finiteness
    # check, not an out-of-range gather, reports them
    return torch.minimum(token, last_positive).clamp_(max=p.size(-1) - 1).squeeze(1)


@torch.no_grad()
def score_at(reward_model: nn.Module, seq, mask, pos, index: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """(B,) the reward model's score read at ``index`` of each row (for a Generation: its stop token)."""
    out = []
    for a, b in chunks(seq.size(0), chunk):
        per_token = heads.token_values(reward_model, seq[a:b], mask[a:b], pos[a:b])
        out.append(per_token.gather(1, index[a:b].unsqueeze(1)).squeeze(1))
    return torch.cat(out)


def score(reward_model: nn.Module, g: Generation, chunk: int = 64) -> torch.Tensor:
    """(B,) the reward model's score of each generated response, read at its stop token (at its last token when it
    never stopped), where the reward model was trained to read it."""
    return score_at(reward_model, *g.inputs(), g.stop_index, chunk)
