"""The policy and value model PPO trains, and the forward that reads the log-probs of given response tokens from a
causal LM (the same function in the rollout and in training, so the first update's ratio is 1).

    model = PolicyAndValue(policy, value, value_shift, value_scale)
    logprobs, values, entropy = model(ids, attention_mask, position_ids, responses, temperature, entropy=True)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.core import heads


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
        head_precision: str = "fp32",
    ):
        """Log-probs of ``responses`` (B, L) under the policy (0 where ``valid`` is False), the value of the state
        before each response token (B, L), and (with ``entropy``) the policy's entropy at each response position
        (B, L) or None. ``policy=False``: the values alone (log-probs and entropy None). Values are None without a
        value model."""
        L = responses.size(1)
        lp = ent = None
        if policy:
            lp, ent = response_logprobs(
                self.policy,
                input_ids,
                attention_mask,
                position_ids,
                responses,
                temperature,
                entropy,
                valid,
                memory_mb,
                head_precision,
            )
        if self.value is None:
            return lp, None, ent
        values = heads.token_values(self.value, input_ids, attention_mask, position_ids)[:, -L - 1 : -1]
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
    head_precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits / T)[token] of each response token, (B, L), from a causal LM; 0 where ``valid`` (B, L) is
    False (prompt, padding and post-stop positions never reach the output head).

    The backbone runs once; the output head and the log-softmax run only on the valid response positions, in
    ``head_precision`` (``pipeline.core.heads``). When the head's tensors for B x L positions fit in ``memory_mb``
    they are computed at once and kept for the backward pass; past it they are computed in pieces of at most that
    size and, when gradients are needed, recomputed in the backward pass (activation checkpointing of the head)
    instead of being kept. With Gemma's 262k vocabulary the logits are the largest tensor of PPO: 8 x 48 positions
    hold 403 MB in fp32, and the head's forward and backward twice that at their peak (``heads.LOGIT_BYTES``).
    """
    from torch.utils.checkpoint import checkpoint

    B, L = responses.shape
    hidden = model.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state[:, -L - 1 : -1]  # (B, L, H): positions predicting y_t
    if valid is None:
        valid = torch.ones(B, L, dtype=torch.bool, device=responses.device)
    where = valid.reshape(-1).nonzero().squeeze(1)
    h, tokens = hidden.reshape(B * L, -1).index_select(0, where), responses.reshape(-1).index_select(0, where)

    def piece_logprobs(x: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        return heads.token_logprobs(model, x, tok, temperature, head_precision)

    # The number of pieces (and whether they are recomputed) depends only on (B, L), the same on every process:
    # under ZeRO-3 each head call gathers the head's weight collectively, so every process must call it equally
    # often. The valid positions are spread evenly over the pieces (a piece may be empty).
    pieces = -(-(B * L) // heads.logit_positions(model, memory_mb, head_precision))
    recompute = torch.is_grad_enabled() and pieces > 1
    lps, ents = [], []
    for x, tok in zip(h.tensor_split(pieces), tokens.tensor_split(pieces)):
        if not torch.is_grad_enabled():  # the rollout: one head call for both (the same numbers as with gradients)
            z = heads.scaled_logits(model, x, temperature, head_precision)
            lp, ent = heads.logprobs_and_entropy(z, tok, entropy)
            lps.append(lp)
            ents.append(ent)
            continue
        lps.append(checkpoint(piece_logprobs, x, tok, use_reentrant=False) if recompute else piece_logprobs(x, tok))
        if entropy:  # a head call of its own, without gradients (the loss never needs the entropy's)
            ents.append(heads.entropy(heads.scaled_logits(model, x.detach(), temperature, head_precision)))
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
