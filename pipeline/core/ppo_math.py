"""The math of PPO for language models, as pure tensor functions (every one tested with hand-computed numbers in
tests/test_ppo_math.py; the formulas and their sources are in docs/ppo.md).

Conventions: responses have a fixed width L; ``*_mask`` booleans are True where a token is kept (valid);
shapes are noted as (B, L) for batch x response position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

INVALID_LOGPROB = 1.0  # fill value of log-probs at invalid positions (TRL's convention; never averaged)


# ----------------------------------------------------------------------------------------------------------------
# Truncation at the stop token
# ----------------------------------------------------------------------------------------------------------------


def first_true_indices(bools: torch.Tensor) -> torch.Tensor:
    """Index of the first True per row of a (B, L) bool tensor; L when a row has none."""
    L = bools.size(-1)
    idx = torch.arange(L, device=bools.device).expand_as(bools)
    return torch.where(bools, idx, torch.full_like(idx, L)).min(-1).values


def truncate_after_stop(
    responses: torch.Tensor, stop_ids: Sequence[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens after the first stop token become pad; the stop token itself stays.

    Returns ``(truncated (B, L), sequence_length (B,), stopped (B,))`` where ``sequence_length`` is the index of the
    last valid token: the stop token when there is one, else L - 1. Refuses ``pad_id`` among the stop ids (a pad
    equal to eos hides the stop token from the loss: PPO pitfall P1).
    """
    if pad_id in stop_ids:
        raise ValueError("the pad token must differ from the stop tokens (pad == eos hides the stop token)")
    L = responses.size(1)
    is_stop = torch.isin(responses, torch.tensor(list(stop_ids), device=responses.device))
    stop_idx = first_true_indices(is_stop)
    stopped = stop_idx < L
    after = torch.arange(L, device=responses.device).unsqueeze(0) > stop_idx.unsqueeze(1)
    truncated = responses.masked_fill(after, pad_id)
    sequence_length = torch.where(stopped, stop_idx, torch.full_like(stop_idx, L - 1))
    return truncated, sequence_length, stopped


def valid_mask(sequence_length: torch.Tensor, L: int, extra: int = 0) -> torch.Tensor:
    """(B, L) True at positions <= sequence_length + extra (``extra=1``: TRL's one slot after the stop token)."""
    return torch.arange(L, device=sequence_length.device).unsqueeze(0) <= (sequence_length + extra).unsqueeze(1)


# ----------------------------------------------------------------------------------------------------------------
# Masked statistics
# ----------------------------------------------------------------------------------------------------------------


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum over kept entries; masked entries are replaced before any arithmetic, so a NaN there cannot leak
    (``NaN * 0 = NaN``: pitfall P9)."""
    kept = torch.where(mask, x, torch.zeros_like(x))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over kept entries (0 where nothing is kept)."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over kept entries; unbiased (n - 1) like TRL, or biased like OpenRLHF and the OpenAI code.
    0 when fewer than two entries (one for biased) are kept."""
    n = mask.sum()
    mean = masked_mean(x, mask)
    sq = masked_sum((x - mean) ** 2, mask)
    denom = n - 1 if unbiased else n
    return sq / denom if denom > 0 else torch.zeros((), dtype=x.dtype, device=x.device)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, unbiased: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over kept entries (``shift_mean=False`` adds the mean back); masked entries are 0.

    Defined for every population: with no kept entry the result is all zeros; with one, the entry whitens to 0
    (its own mean), or stays as it is when ``shift_mean=False`` (TRL raises, or returns NaN, there: pitfall P10).
    """
    zeros = torch.zeros_like(x)
    n = int(mask.sum())
    if n == 0:
        return zeros
    mean = masked_mean(x, mask)
    if n == 1:
        return torch.where(mask, zeros if shift_mean else x, zeros)
    w = (x - mean) * torch.rsqrt(masked_var(x, mask, unbiased) + 1e-8)
    if not shift_mean:
        w = w + mean
    return torch.where(mask, w, zeros)


# ----------------------------------------------------------------------------------------------------------------
# KL, rewards, advantages
# ----------------------------------------------------------------------------------------------------------------


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate from tokens sampled from pi (Schulman, "Approximating KL divergence"):
    k1 = logp - logp_ref (unbiased, can be negative); k2 = (logp_ref - logp)^2 / 2; k3 = (r - 1) - log r with
    r = p_ref / p (unbiased, >= 0). A value to log or to put in the rewards: as a loss see :func:`kl_loss`."""
    log_r = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    if estimator == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {estimator!r} (k1, k2, k3)")


LOG_RATIO_LIMIT = 20.0  # exp(20) = 4.9e8: the largest p_ref / p_old the logged k3 value takes (never a gradient)


def kl_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL(pi || ref) as a loss on tokens sampled from pi_old (the rollout), (B, L) each: returns
    ``(loss, value)``, the term to differentiate and its value, an estimate of KL(pi || ref) to log.

    Each token is weighted by the importance ratio rho = pi / pi_old, so the expected gradient is that of
    KL(pi || ref) at every minibatch, not only the first (after it the samples are off-policy):

    - ``k2``: ``stopgrad(rho) * (log pi - log ref)^2 / 2``, gradient ``rho * (log pi - log ref) * grad log pi``;
    - ``k3``: ``rho * k3``, the same gradient (``grad(rho k3) = rho (-log r) grad log pi``) and a value that is an
      unbiased, non-negative estimate of KL(pi || ref). It is computed as ``p_ref / p_old - rho (1 + log r)``: the
      first term has no gradient and its exponent is limited to ``LOG_RATIO_LIMIT`` (the value only).

    k3 without the ratio, the usual GRPO loss, has the expected gradient of KL(ref || pi), the other direction
    (tests/test_ppo_math.py computes both on a categorical distribution); k1 as a loss has zero expected gradient on
    policy. Neither is offered. Nothing is clamped on the gradient's path."""
    log_rho = logprobs - old_logprobs
    rho = torch.exp(log_rho)
    log_r = ref_logprobs - logprobs
    if estimator == "k2":
        k2 = 0.5 * log_r**2
        return rho.detach() * k2, (rho * k2).detach()
    if estimator == "k3":
        constant = torch.exp((ref_logprobs - old_logprobs).clamp(max=LOG_RATIO_LIMIT))
        loss = constant - rho * (1.0 + log_r)
        return loss, loss.detach()
    raise ValueError(f"KL estimator {estimator!r} cannot be a loss (k2 or k3)")


def score_index(sequence_length: torch.Tensor, L: int, position: str) -> torch.Tensor:
    """Where the sequence-level score lands in the per-token rewards.

    ``eos``: on the last valid token (the stop token), as OpenRLHF and DeepSpeed-Chat do. ``after_eos``: one slot
    later, where TRL puts it (the value there is computed from the stop token's hidden state), or on the last token
    when there is no slot left.
    """
    if position == "eos":
        return sequence_length
    if position == "after_eos":
        return torch.where(sequence_length + 1 < L, sequence_length + 1, sequence_length)
    raise ValueError(f"unknown reward position {position!r} (eos, after_eos)")


def shape_rewards(
    scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, sequence_length: torch.Tensor, position: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards ``-kl_coef * kl`` plus the score at ``score_index``. Returns (rewards, non_score_reward)."""
    non_score = -kl_coef * kl
    rewards = non_score.clone()
    idx = score_index(sequence_length, kl.size(1), position)
    rewards[torch.arange(kl.size(0), device=kl.device), idx] += scores.to(rewards.dtype)
    return rewards, non_score


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the full width (V after the last position is 0).

    delta_t = r_t + gamma V_{t+1} - V_t; A_t = delta_t + gamma lam A_{t+1}; returns R = A + V (from the raw
    advantages). Rewards and values must already be zero where they are not valid.
    """
    L = rewards.size(1)
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(L)):
        next_value = values[:, t + 1] if t + 1 < L else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    return advantages, advantages + values


def final_scores(
    raw: torch.Tensor,
    ended: torch.Tensor,
    *,
    mean: float = 0.0,
    std: float = 1.0,
    normalize: bool = False,
    clip: float | None = None,
    missing_stop_penalty: float | None = None,
) -> torch.Tensor:
    """(B,) the scores PPO optimises from the reward model's raw scores, in order: standardised with the reward
    model's stored mean and std (``normalize``), clipped to [-clip, clip], then ``missing_stop_penalty`` subtracted
    where ``ended`` is False (the response did not end its turn; TRL subtracts)."""
    scores = raw
    if normalize:
        scores = (scores - mean) / max(std, 1e-8)
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    if missing_stop_penalty is not None:
        scores = scores - missing_stop_penalty * (~ended).to(scores.dtype)
    return scores


@dataclass
class Advantages:
    """The rollout post-processing's outputs, (B, L) each: masks, masked log-probs and values, per-token KL and
    rewards, whitened advantages and returns."""

    action_mask: torch.Tensor
    value_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    kl: torch.Tensor
    rewards: torch.Tensor
    non_score: torch.Tensor
    raw_advantages: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


def advantages(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    scores: torch.Tensor,
    sequence_length: torch.Tensor,
    *,
    kl_coef: float,
    kl_estimator: str,
    reward_position: str,
    whiten_rewards: bool,
    gamma: float,
    lam: float,
) -> Advantages:
    """From a rollout's log-probs, reference log-probs and values (B, L), its scores (B,) and each response's last
    valid index (B,) to the per-token KL, rewards, GAE returns and whitened advantages. Invalid positions are
    replaced before any arithmetic (log-probs by INVALID_LOGPROB, values by 0), so nothing there can leak."""
    L = logprobs.size(1)
    action_mask = valid_mask(sequence_length, L)
    value_mask = valid_mask(sequence_length, L, extra=1 if reward_position == "after_eos" else 0)
    invalid = torch.full_like(logprobs, INVALID_LOGPROB)
    logprobs = torch.where(action_mask, logprobs, invalid)
    ref_logprobs = torch.where(action_mask, ref_logprobs, invalid)
    values = torch.where(value_mask, values, torch.zeros_like(values))
    kl = torch.where(action_mask, kl_estimate(logprobs, ref_logprobs, kl_estimator), torch.zeros_like(logprobs))
    rewards, non_score = shape_rewards(scores, kl, kl_coef, sequence_length, reward_position)
    if whiten_rewards:
        rewards = masked_whiten(rewards, value_mask, shift_mean=False)
    raw_advantages, returns = gae(rewards, values, gamma, lam)
    return Advantages(
        action_mask,
        value_mask,
        logprobs,
        ref_logprobs,
        values,
        kl,
        rewards,
        non_score,
        raw_advantages,
        masked_whiten(raw_advantages, action_mask),
        returns,
    )


NO_SIGNAL_STD = 1e-6
"""A group whose scores have a smaller (unbiased) standard deviation carries no signal: its advantages are 0, and the
metric ``objective/zero_std_groups`` counts it (one threshold for both)."""


def group_std(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B / k,) the unbiased standard deviation of each group's scores (groups: ``k`` consecutive rows)."""
    return scores.view(-1, k).std(1, unbiased=True)


def group_advantages(scores: torch.Tensor, k: int, estimator: str, scale: bool = True) -> torch.Tensor:
    """Critic-free sequence advantages (B,) from the scores (B,) of ``k`` samples per prompt, each prompt's samples in
    consecutive rows (rows ``i*k`` to ``i*k + k - 1``).

    - ``rloo`` (Ahmadian et al. 2024; TRL ``RLOOTrainer``, OpenRLHF ``rloo``): ``r - (sum_group(r) - r) / (k - 1)``,
      each sample's baseline the mean of the other ``k - 1``;
    - ``grpo`` (Shao et al. 2024; OpenRLHF ``group_norm``): ``(r - mean_group(r)) / std_group(r)`` with the
      unbiased std; ``scale=False`` keeps the centring only (Dr. GRPO, OpenRLHF ``dr_grpo``).

    A group whose std is below ``NO_SIGNAL_STD`` gets advantage 0 under every estimator (dividing its rounding noise
    by its std would give it O(1) advantages).
    With one sample per prompt every advantage would be 0 and training a silent no-op (OpenRLHF PR #1250): refused."""
    if k < 2:
        raise ValueError(f"a group estimator needs at least 2 samples per prompt (ppo.num_generations), got {k}")
    if scores.dim() != 1 or scores.numel() % k:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {k}")
    groups = scores.view(-1, k)
    std = group_std(scores, k).unsqueeze(1)
    signal = std >= NO_SIGNAL_STD
    if estimator == "rloo":
        out = groups - (groups.sum(1, keepdim=True) - groups) / (k - 1)
    elif estimator == "grpo":
        out = groups - groups.mean(1, keepdim=True)
        if scale:
            out = out / torch.where(signal, std, torch.ones_like(std))
    else:
        raise ValueError(f"unknown group estimator {estimator!r} (rloo, grpo)")
    return torch.where(signal, out, torch.zeros_like(out)).reshape(-1)


def group_token_advantages(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    scores: torch.Tensor,
    sequence_length: torch.Tensor,
    *,
    k: int,
    estimator: str,
    scale: bool,
    kl_coef: float,
    kl_estimator: str,
    kl_in_reward: bool,
) -> Advantages:
    """The critic-free counterpart of :func:`advantages` (OpenRLHF's ``rloo`` / ``group_norm`` / ``dr_grpo`` path):
    the group-transformed score (:func:`group_advantages`) lands on each response's stop token, ``-kl_coef * kl``
    on every token when ``kl_in_reward``, and each token's advantage is its undiscounted return, the sum of the
    rewards from it to the end (gamma is 1 for group estimators). No whitening over the batch: the group transform
    is the normalisation. ``values`` are zeros and ``returns`` equal the advantages (nothing trains on them)."""
    L = logprobs.size(1)
    action_mask = valid_mask(sequence_length, L)
    invalid = torch.full_like(logprobs, INVALID_LOGPROB)
    logprobs = torch.where(action_mask, logprobs, invalid)
    ref_logprobs = torch.where(action_mask, ref_logprobs, invalid)
    kl = torch.where(action_mask, kl_estimate(logprobs, ref_logprobs, kl_estimator), torch.zeros_like(logprobs))
    group = group_advantages(scores.float(), k, estimator, scale)
    rewards, non_score = shape_rewards(group, kl, kl_coef if kl_in_reward else 0.0, sequence_length, "eos")
    returns = rewards.flip(1).cumsum(1).flip(1) * action_mask
    zeros = torch.zeros_like(logprobs)
    return Advantages(
        action_mask, action_mask, logprobs, ref_logprobs, zeros, kl, rewards, non_score, returns, returns, returns
    )


# ----------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------


def clipped_policy_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token: max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = exp(new - old).

    Masked positions get log-ratio 0 before exponentiating (so a sentinel or NaN there cannot leak). Returns
    (per-token loss, per-token clipped flag, ratio), each (B, L); reduce them over ``mask``.
    """
    log_ratio = torch.where(mask, new_logprobs - old_logprobs, torch.zeros_like(new_logprobs))
    ratio = torch.exp(log_ratio)
    adv = torch.where(mask, advantages, torch.zeros_like(advantages))
    loss1 = -adv * ratio
    loss2 = -adv * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return torch.maximum(loss1, loss2), loss2 > loss1, ratio


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * max((V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2) per token, and the clipped flag."""
    v = torch.where(mask, values, torch.zeros_like(values))
    v_old = torch.where(mask, old_values, torch.zeros_like(old_values))
    r = torch.where(mask, returns, torch.zeros_like(returns))
    clipped = torch.clamp(v, v_old - cliprange_value, v_old + cliprange_value)
    loss1, loss2 = (v - r) ** 2, (clipped - r) ** 2
    return 0.5 * torch.maximum(loss1, loss2), loss2 > loss1


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over kept entries (nan when the returns do not vary)."""
    var_r = masked_var(returns, mask, unbiased=False)
    if var_r <= 0:
        return float("nan")
    return float(1 - masked_var(returns - values, mask, unbiased=False) / var_r)


# ----------------------------------------------------------------------------------------------------------------
# KL controllers and batch bookkeeping
# ----------------------------------------------------------------------------------------------------------------


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, value: float):
        self.value = value

    def update(self, current_kl: float, n_steps: int) -> None:  # noqa: ARG002 - same interface as the adaptive one
        return None

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019: beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon)."""

    def __init__(self, value: float, target: float, horizon: int):
        super().__init__(value)
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
