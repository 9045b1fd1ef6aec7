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

from pipeline.core import ppo_math as pm


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


def token_values(seq_cls: nn.Module, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """A sequence classifier's one-output head applied at every position, (B, T): per-token values or rewards."""
    backbone = getattr(seq_cls, seq_cls.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    return seq_cls.score(hidden).squeeze(-1).float()


@dataclass
class Generation:
    """Responses generated for left-padded prompts, kept as the sampled ids."""

    queries: torch.Tensor  # (B, C) left-padded prompts
    responses: torch.Tensor  # (B, L) generated ids; pad after the stop token
    seq_len: torch.Tensor  # (B,) index of the last valid token: the stop token, or L - 1 when the row never stopped
    stopped: torch.Tensor  # (B,) True where the response produced a stop token
    pad_id: int

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
        """Each response's text before its stop token (the whole response when it never stopped)."""
        return [
            tokenizer.decode(r[: int(n) + (0 if st else 1)].tolist(), skip_special_tokens=True)
            for r, n, st in zip(self.responses, self.seq_len, self.stopped)
        ]

    def ended_on(self, token_id: int) -> list[bool]:
        """Whether each response stopped on ``token_id`` (e.g. ``<end_of_turn>`` rather than ``<eos>``)."""
        last = self.responses.gather(1, self.seq_len.unsqueeze(1)).squeeze(1)
        return (self.stopped & (last == token_id)).tolist()


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
) -> Generation:
    """Responses of ``model`` to the left-padded ``queries`` (B, C), ``chunk`` rows per ``generate`` call: plain
    temperature sampling (top_k 0, top_p 1) or, with ``temperature=None``, greedy; stopping at ``stop_ids`` (none:
    always ``max_new_tokens``). ``synced_gpus`` (every process steps until all are done) is left to transformers by
    default: on under DeepSpeed ZeRO-3 with several processes.

    The model's own ``generation_config`` is replaced by ours for the call: transformers fills every field a passed
    config leaves unset from the model's (a ``min_new_tokens``, a ``repetition_penalty``, ``suppress_tokens``, a top_k
    of 50...), and any of them would change the distribution that was sampled (docs/ppo.md, P5). With no stop ids the
    model's own eos does not stop it either.
    """
    from transformers import GenerationConfig

    greedy = temperature is None
    gen = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=None if greedy else temperature,
        top_k=None if greedy else 0,
        top_p=None if greedy else 1.0,
        eos_token_id=list(stop_ids) or None,
        pad_token_id=pad_id,
        bos_token_id=None,
        use_cache=True,
    )
    was_training = model.training
    model.eval()
    holder = model.get_base_model() if hasattr(model, "peft_config") else model  # PEFT generates with the base's
    own = holder.generation_config
    holder.generation_config = gen  # nothing of the model's own config can merge in
    out = []
    try:
        for a, b in chunks(queries.size(0), chunk):
            q = queries[a:b]
            with torch.no_grad():
                ids = model.generate(
                    input_ids=q, attention_mask=(q != pad_id).long(), generation_config=gen, synced_gpus=synced_gpus
                )
            resp = ids[:, q.size(1) :]
            if resp.size(1) < max_new_tokens:  # every row stopped early
                resp = nn.functional.pad(resp, (0, max_new_tokens - resp.size(1)), value=pad_id)
            out.append(resp)
    finally:
        holder.generation_config = own
        if was_training:
            model.train()
    responses, seq_len, stopped = pm.truncate_after_stop(torch.cat(out), stop_ids, pad_id)
    return Generation(queries, responses, seq_len, stopped, pad_id)


@torch.no_grad()
def score_at(reward_model: nn.Module, seq, mask, pos, index: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """(B,) the reward model's score read at ``index`` of each row (for a Generation: its stop token)."""
    out = []
    for a, b in chunks(seq.size(0), chunk):
        per_token = token_values(reward_model, seq[a:b], mask[a:b], pos[a:b])
        out.append(per_token.gather(1, index[a:b].unsqueeze(1)).squeeze(1))
    return torch.cat(out)


def score(reward_model: nn.Module, g: Generation, chunk: int = 64) -> torch.Tensor:
    """(B,) the reward model's score of each generated response, read at its stop token (at its last token when it
    never stopped), where the reward model was trained to read it."""
    return score_at(reward_model, *g.inputs(), g.stop_index, chunk)
