"""Plain, independent references for what PPO's cheaper paths compute, written from the textbook formulas with no
code from ``pipeline/``: the tests compare the pipeline's numbers with these (and, as negative controls, with the
broken variants these functions can be asked for)."""

from __future__ import annotations

import torch


def causal_lm_logits(model, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """(B, T, V) logits of a Hugging Face causal LM: its own full forward, the output head on every position."""
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits


def response_logprobs(logits: torch.Tensor, responses: torch.Tensor, temperature: float, shift: int = 1):
    """(B, L) ``log_softmax(logits / T)[y_t]`` of each response token y_t (the last L tokens of the sequence), in fp32.

    The logit at position ``t - 1`` predicts the token at ``t`` (``shift=1``, the right reading). ``shift=0`` reads
    each token's own position: the off-by-one variant, for negative controls."""
    L, T = responses.size(1), logits.size(1)
    z = logits[:, T - L - shift : T - shift].float() / temperature
    return torch.log_softmax(z, dim=-1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)


def adamw_steps(
    start: torch.Tensor,
    grads: list[torch.Tensor],
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    bias_correction: bool = True,
) -> list[torch.Tensor]:
    """The weights after each of ``len(grads)`` AdamW steps (Loshchilov and Hutter, decoupled weight decay), in
    fp64 from ``start``: the parameter after step t (counted from 1) is

        p = p (1 - lr wd);  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        p = p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    ``bias_correction=False`` leaves out the two ``1 - b^t`` divisions (a broken variant, for negative controls)."""
    b1, b2 = betas
    p = start.double().clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    out = []
    for t, g in enumerate(grads, start=1):
        g = g.double()
        p = p * (1 - lr * weight_decay)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = (m / (1 - b1**t), v / (1 - b2**t)) if bias_correction else (m, v)
        p = p - lr * m_hat / (v_hat.sqrt() + eps)
        out.append(p.clone())
    return out
