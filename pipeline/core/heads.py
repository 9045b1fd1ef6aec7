"""The output heads PPO reads: the language-model head as log-probabilities of given tokens (for the loss) and as the
sampler's distribution, in the precision ``ppo.head_precision`` asks for, and a sequence classifier's one-output
head at every position (values, rewards), always in fp32; and what the head's (positions x vocabulary) tensors
cost.

    lp = token_logprobs(model, hidden, tokens, temperature, "fp32")      # (N,), differentiable
    z = scaled_logits(model, hidden, temperature, "fp32")                # (N, V) fp32, for sampling and entropy

Every vocabulary-sized setting (the vocabulary, Gemma 2's final-logit soft-cap) is read from the text config, so a
multimodal wrapper whose top config holds a vision tower reads the language model's numbers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

_ROWS = 16  # rows per row-wise temporary (row_stats, the soft-cap's backward): 16 MB on a 262k vocabulary


def text_config(model: nn.Module) -> Any:
    """The language model's config (``get_text_config()``; the config itself for a text-only model)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def softcap(model: nn.Module) -> float | None:
    """Gemma 2's ``final_logit_softcapping`` (``cap * tanh(logits / cap)``), None when the model has none."""
    return getattr(text_config(model), "final_logit_softcapping", None) or None


def vocabulary_size(model: nn.Module) -> int:
    """Rows of the output head, from the config: under ZeRO-3 the head's weight is a partitioned parameter whose
    local shape is (0,)."""
    return int(text_config(model).vocab_size)


def head_output(head: nn.Module, x: torch.Tensor, precision: str) -> torch.Tensor:
    """``head(x)``; with ``precision="fp32"`` computed in fp32 whatever autocast is on (the module is called, so
    ZeRO-3's hooks gather its weight). A frozen head held in bf16 (``ppo.frozen_precision: bf16``, never
    partitioned: ZeRO-3 refuses it) is multiplied through an fp32 copy of its weight. ``auto``: as the context
    computes (bf16 under bf16 autocast)."""
    if precision == "auto":
        return head(x)
    weight = head.weight
    with torch.autocast(x.device.type, enabled=False):
        if weight.dtype == torch.float32:
            return head(x.float())
        bias = getattr(head, "bias", None)
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float())


def row_stats(z: torch.Tensor, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N,) ``logsumexp(z)`` and (with ``with_entropy``) the (N,) entropy of softmax(z), ``logsumexp(z) -
    sum(softmax(z) z)``, for (N, V) scaled logits, ``_ROWS`` rows at a time: ``torch.logsumexp`` allocates a
    temporary as large as ``z`` on the CPU, and the entropy's softmax another."""
    n = z.size(0)
    lse = torch.empty(n, dtype=z.dtype, device=z.device)
    ent = torch.empty(n, dtype=z.dtype, device=z.device) if with_entropy else None
    with torch.autocast(z.device.type, enabled=False):
        for a in range(0, n, _ROWS):
            part = z[a : a + _ROWS]
            top = part.amax(-1, keepdim=True)
            e = torch.sub(part, top).exp_()
            total = e.sum(-1)
            lse[a : a + _ROWS] = top.squeeze(-1) + total.log()
            if ent is not None:
                ent[a : a + _ROWS] = lse[a : a + _ROWS] - e.mul_(part).sum(-1) / total
    return lse, ent


def _scale_(z: torch.Tensor, cap: float | None, temperature: float) -> torch.Tensor:
    """``cap * tanh(z / cap) / T`` (or ``z / T``) in place."""
    if cap:
        z.div_(cap).tanh_().mul_(cap)
    if temperature != 1.0:
        z.div_(temperature)
    return z


class _HeadLogprob(torch.autograd.Function):
    """log softmax(cap * tanh(logits / cap) / T)[token] for (N, V) head outputs of any float dtype, with a
    hand-written backward. It keeps one fp32 (N, V) tensor for the backward pass and allocates one more there
    (autograd's composition of soft-cap, temperature, log-softmax and gather keeps three and makes about six passes
    over the logits in the backward pass; on a 262k vocabulary the head is the largest tensor of PPO). No maintained
    library offers this on the CPU (fused linear cross-entropy kernels are GPU-only Triton)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, tokens: torch.Tensor, cap: float | None, temperature: float):
        dtype = torch.promote_types(logits.dtype, torch.float32)  # fp32, or fp64 where the logits are
        if cap or temperature != 1.0 or logits.dtype != dtype:
            z = _scale_(logits.to(dtype, copy=True), cap, temperature)
        else:
            z = logits  # kept as it is: nothing in this function writes to it
        lse = row_stats(z)[0]
        ctx.save_for_backward(z, tokens, lse)
        ctx.cap, ctx.temperature, ctx.dtype = cap, temperature, logits.dtype
        return z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        z, tokens, lse = ctx.saved_tensors
        out = torch.sub(z, lse.unsqueeze(-1)).exp_()  # softmax, in the one new (N, V) allocation
        out.mul_(-grad.unsqueeze(-1))
        out.scatter_add_(-1, tokens.unsqueeze(-1), grad.unsqueeze(-1))  # d lp / d z
        cap, temperature = ctx.cap, ctx.temperature
        if cap:  # d z / d logits = (1 - tanh^2) / T with tanh = z T / cap, a few rows at a time (z stays as it is)
            for rows in range(0, z.size(0), _ROWS):
                part = slice(rows, rows + _ROWS)
                out[part].mul_(z[part].mul(temperature / cap).square_().neg_().add_(1.0))
        if temperature != 1.0:
            out.div_(temperature)
        return out.to(ctx.dtype), None, None, None


def logprob_of(
    logits: torch.Tensor, tokens: torch.Tensor, cap: float | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """(N,) log softmax(cap * tanh(logits / cap) / T)[token] for (N, V) logits and (N,) tokens, differentiable in
    ``logits`` (no soft-cap when ``cap`` is None)."""
    return _HeadLogprob.apply(logits, tokens, cap, temperature)


def _linear_head(model: nn.Module) -> bool:
    """Whether the logits are a linear function of the hidden state (no soft-cap, no bias): the temperature can then
    divide the (N, H) hidden states instead of the (N, V) logits."""
    return not softcap(model) and getattr(model.get_output_embeddings(), "bias", None) is None


def token_logprobs(
    model: nn.Module, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float, precision: str
) -> torch.Tensor:
    """(N,) log softmax(logits / T)[token] of a causal LM's head over (N, H) hidden states, differentiable in the
    hidden states and the head's weight."""
    head = model.get_output_embeddings()
    if _linear_head(model):
        return logprob_of(head_output(head, hidden / temperature, precision), tokens)
    return logprob_of(head_output(head, hidden, precision), tokens, softcap(model), temperature)


@torch.no_grad()
def scaled_logits(model: nn.Module, hidden: torch.Tensor, temperature: float, precision: str) -> torch.Tensor:
    """(N, V) fp32 ``logits / T`` (soft-capped first where the model caps), without gradients: the sampler's
    distribution and the entropy's."""
    head = model.get_output_embeddings()
    if _linear_head(model):  # the same operations, in the same order, as token_logprobs
        return head_output(head, hidden / temperature, precision).float()
    z = head_output(head, hidden, precision)  # a fresh tensor (no gradients): scaled in place
    return _scale_(z.to(torch.promote_types(z.dtype, torch.float32)), softcap(model), temperature)


def logprobs_and_entropy(
    z: torch.Tensor, tokens: torch.Tensor, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N,) log softmax(z)[token] and (with ``with_entropy``) the (N,) entropy of softmax(z), for (N, V) scaled
    logits (``scaled_logits``) without gradients: the numbers ``token_logprobs`` computes, from one head call."""
    lse, ent = row_stats(z, with_entropy)
    return z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse, ent


def entropy(z: torch.Tensor) -> torch.Tensor:
    """(N,) entropy of softmax(z) for (N, V) scaled logits (``row_stats``)."""
    return row_stats(z, with_entropy=True)[1]


LOGIT_BYTES = {"fp32": 8, "auto": 10}
"""Bytes per (position, vocabulary id) the head holds at its peak, forward and backward (``_HeadLogprob``): an fp32
(N, V) tensor kept for the backward pass and one allocated there (in the forward, the head's output and its scaled
copy); with ``auto`` under bf16 autocast also the bf16 gradient handed back to the head. Besides them the row-wise
temporaries of ``row_stats`` and the soft-cap's backward, two of ``_ROWS`` rows. tests/test_heads.py measures the
allocator's peak against it."""


_POSITION_BYTES = 64  # per position, the (N,) vectors beside the logits: tokens, log-sum-exp, log-probs, gradients


def logit_positions(model: nn.Module, memory_mb: float, precision: str) -> int:
    """Response positions whose head tensors (``LOGIT_BYTES`` per logit, a few (N,) vectors, and the row-wise
    temporaries) fit in ``memory_mb`` (``ppo.logits_memory_mb``); at least 1."""
    vocabulary = vocabulary_size(model)
    free = int(memory_mb * (1 << 20)) - 2 * _ROWS * 4 * vocabulary
    return max(1, free // (LOGIT_BYTES[precision] * vocabulary + _POSITION_BYTES))


def token_values(seq_cls: nn.Module, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """A sequence classifier's one-output head applied at every position, (B, T) fp32: per-token values or rewards.
    The head always runs in fp32 (it costs H multiply-adds per position; in bf16 a reward of 45 would be rounded to
    steps of 0.25)."""
    backbone = getattr(seq_cls, seq_cls.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    return head_output(seq_cls.score, hidden, "fp32").squeeze(-1).float()
