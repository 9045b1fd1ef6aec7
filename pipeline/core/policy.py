"""The policy and value model PPO trains, and the forward that reads the log-probs of given response tokens from a
causal LM (the same function in the rollout and in training, so the first update's ratio is 1).

    model = PolicyAndValue(policy, value, value_shift, value_scale)
    logprobs, values, entropy = model(ids, attention_mask, position_ids, responses, temperature, entropy=True)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.core import ppo_math as pm
from pipeline.core.sampling import token_values


class PolicyAndValue(nn.Module):
    """Policy and value model trained together under one optimizer (and one DeepSpeed engine).

    The value is ``(head - value_shift) / value_scale``: a value model that starts from the reward model outputs
    reward-model units, and when PPO standardises the scores (``normalize_reward``) its values are standardised the
    same way, so values and returns share a scale from the first update (OpenRLHF's critic does the same). The two
    numbers are fixed for the run (the reward model's stored mean and std) and are not weights.

    ``value=None`` (a critic-free estimator): the policy alone; the values are None."""

    def __init__(self, policy: nn.Module, value: nn.Module | None, value_shift: float = 0.0, value_scale: float = 1.0):
        super().__init__()
        self.policy = policy
        self.value = value
        self.value_shift = value_shift
        self.value_scale = value_scale

    def forward(
        self,
        input_ids,
        attention_mask,
        position_ids,
        responses,
        temperature: float,
        entropy: bool = False,
        valid: torch.Tensor | None = None,
        memory_mb: float = 256,
        policy: bool = True,
    ):
        """Log-probs of ``responses`` (B, L) under the policy (0 where ``valid`` is False), the value of the state
        before each response token (B, L), and (with ``entropy``) the policy's entropy at each response position
        (B, L) or None. ``policy=False``: the values alone (log-probs and entropy None). Values are None without a
        value model."""
        L = responses.size(1)
        lp = ent = None
        if policy:
            lp, ent = response_logprobs(
                self.policy, input_ids, attention_mask, position_ids, responses, temperature, entropy, valid, memory_mb
            )
        if self.value is None:
            return lp, None, ent
        values = token_values(self.value, input_ids, attention_mask, position_ids)[:, -L - 1 : -1]
        if self.value_shift or self.value_scale != 1.0:
            values = (values - self.value_shift) / self.value_scale
        return lp, values, ent

    # generate() is called on the policy; these let TRL's unwrap_model_for_generation handle the wrapper.
    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(getattr(self.policy, "is_gradient_checkpointing", False))

    def gradient_checkpointing_disable(self) -> None:
        self.policy.gradient_checkpointing_disable()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None) -> None:
        self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)


def vocabulary_size(model: nn.Module) -> int:
    """Rows of the output head, from the config: under ZeRO-3 the head's weight is a partitioned parameter whose
    local shape is (0,)."""
    return int(model.config.get_text_config().vocab_size)


def logit_positions(model: nn.Module, memory_mb: float) -> int:
    """Response positions whose fp32 logits fit in ``memory_mb`` (``ppo.logits_memory_mb``)."""
    return max(1, int(memory_mb * (1 << 20)) // (4 * vocabulary_size(model)))


def response_logprobs(
    model: nn.Module,
    input_ids,
    attention_mask,
    position_ids,
    responses,
    temperature: float,
    entropy: bool = False,
    valid: torch.Tensor | None = None,
    memory_mb: float = 256,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits / T)[token] of each response token, (B, L), from a causal LM; 0 where ``valid`` (B, L) is
    False (prompt, padding and post-stop positions never reach the output head).

    The backbone runs once; the output head and the log-softmax run only on the valid response positions. When the
    fp32 logits of B x L positions fit in ``memory_mb`` they are computed at once and kept for the backward pass;
    past it they are computed in pieces of at most that size and, when gradients are needed, recomputed in the
    backward pass (activation checkpointing of the head) instead of being kept. With Gemma's 262k vocabulary the
    logits are the largest tensor of PPO: 8 x 48 positions hold 403 MB.
    """
    from torch.utils.checkpoint import checkpoint

    B, L = responses.shape
    backbone = model.get_decoder()
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state[:, -L - 1 : -1]  # (B, L, H): positions predicting y_t
    if valid is None:
        valid = torch.ones(B, L, dtype=torch.bool, device=responses.device)
    where = valid.reshape(-1).nonzero().squeeze(1)
    h, tokens = hidden.reshape(B * L, -1).index_select(0, where), responses.reshape(-1).index_select(0, where)

    # Without soft-capping the head is linear, so the temperature divides the (N, H) hidden states instead of the
    # (N, vocabulary) logits: one pass over the largest tensor less, forward and backward.
    linear = not cap and getattr(head, "bias", None) is None

    def scaled_logits(x: torch.Tensor) -> torch.Tensor:
        """logits / T in fp32, (N, vocabulary)."""
        if linear:
            return head(x / temperature).float()
        logits = head(x).float()
        return (torch.tanh(logits / cap) * cap if cap else logits) / temperature

    def chunk_logprobs(x: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        return pm.token_logprobs(scaled_logits(x), tok)

    def chunk_entropy(scaled: torch.Tensor) -> torch.Tensor:
        return pm.entropy_from_logits(scaled.detach().unsqueeze(0), 1.0).squeeze(0)

    # The number of pieces (and whether they are recomputed) depends only on (B, L), the same on every process:
    # under ZeRO-3 each head call gathers the head's weight collectively, so every process must call it equally
    # often. The valid positions are spread evenly over the pieces (a piece may be empty).
    pieces = -(-(B * L) // logit_positions(model, memory_mb))
    recompute = torch.is_grad_enabled() and pieces > 1
    lps, ents = [], []
    for x, tok in zip(h.tensor_split(pieces), tokens.tensor_split(pieces)):
        if recompute:  # nothing of the piece is kept, so the entropy needs its own head call
            lps.append(checkpoint(chunk_logprobs, x, tok, use_reentrant=False))
            if entropy:
                with torch.no_grad():
                    ents.append(chunk_entropy(scaled_logits(x)))
        else:  # one head call for both
            scaled = scaled_logits(x)
            lps.append(pm.token_logprobs(scaled, tok))
            if entropy:
                ents.append(chunk_entropy(scaled))
    flat = torch.zeros(B * L, dtype=torch.float32, device=responses.device)
    lp = flat.index_put((where,), torch.cat(lps) if lps else flat[:0]).reshape(B, L)
    ent = flat.index_put((where,), torch.cat(ents) if ents else flat[:0]).reshape(B, L) if entropy else None
    return lp, ent


def clip_each(acc: Any, model: PolicyAndValue, max_norm: float) -> tuple[torch.Tensor, ...]:
    """Clip the policy's and the value model's gradients each to ``max_norm`` (OpenRLHF clips its actor and critic
    apart): under one joint norm, large value gradients early in training would shrink the policy's step. Returns
    the norms before clipping (the policy's alone without a value model)."""
    parts = (model.policy,) if model.value is None else (model.policy, model.value)
    return tuple(
        torch.as_tensor(acc.clip_grad_norm_([p for p in part.parameters() if p.requires_grad], max_norm))
        for part in parts
    )
