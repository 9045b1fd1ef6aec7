"""PPO math against hand-computed numbers (the cases T1-T7, T9-T11 and T17 of docs/ppo.md, "References"), plus the
edge cases they call out (empty and single-element whitening, NaN in masked slots)."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.batching import batch_sizes
from pipeline.core.ppo_math import (
    AdaptiveKLController,
    advantages,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    final_scores,
    first_true_indices,
    gae,
    group_advantages,
    group_token_advantages,
    kl_estimate,
    masked_mean,
    masked_whiten,
    truncate_after_stop,
)

D = torch.float64


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def close(a, b, atol=1e-6):
    assert torch.allclose(torch.as_tensor(a, dtype=D), t(b), atol=atol), (a, b)


# T1 ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "gamma, lam, adv, ret",
    [
        (1.0, 0.95, [0.46575, 0.385, 0.3], [0.96575, 0.985, 1.0]),
        (1.0, 1.0, [0.5, 0.4, 0.3], [1.0, 1.0, 1.0]),
        (0.9, 0.95, [0.2849575, 0.2865, 0.3], [0.7849575, 0.8865, 1.0]),
        (1.0, 0.0, [0.1, 0.1, 0.3], [0.6, 0.7, 1.0]),
    ],
)
def test_t1_gae(gamma, lam, adv, ret):
    a, r = gae(t([[0, 0, 1.0]]), t([[0.5, 0.6, 0.7]]), gamma, lam)
    close(a[0], adv)
    close(r[0], ret)


# T2 ------------------------------------------------------------------------------------------------------------
X = t([[1, 2, 3, 99], [4, 5, -7, 42]])
M = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)


def test_t2_whitening():
    close(masked_whiten(X, M), [[-1.2649110615, -0.6324555308, 0, 0], [0.6324555308, 1.2649110615, 0, 0]])
    w = masked_whiten(X, M, shift_mean=False)
    close(w[M], [1.7350889385, 2.3675444692, 3.0, 3.6324555308, 4.2649110615])
    close(masked_whiten(X, M, unbiased=False)[M], [-1.4142135624, -0.7071067812, 0, 0.7071067812, 1.4142135624])


def test_t2_whitening_edges_are_defined():
    none = torch.zeros_like(M)
    assert torch.equal(masked_whiten(X, none), torch.zeros_like(X))
    one = torch.zeros_like(M)
    one[0, 1] = True
    assert torch.equal(masked_whiten(X, one), torch.zeros_like(X))
    assert masked_whiten(X, one, shift_mean=False)[0, 1] == 2 and masked_whiten(X, one, shift_mean=False).sum() == 2


# T3 ------------------------------------------------------------------------------------------------------------
def test_t3_kl_estimators():
    lp, ref = t([-1.0, -2.0, -0.5]), t([-1.2, -1.5, -0.5])
    close(kl_estimate(lp, ref, "k1"), [0.2, -0.5, 0.0])
    close(kl_estimate(lp, ref, "k2"), [0.02, 0.125, 0.0])
    k3 = kl_estimate(lp, ref, "k3")
    close(k3, [0.0187307531, 0.1487212707, 0.0])
    close(k3.sum(), 0.1674520238)
    close(-0.05 * kl_estimate(lp, ref, "k1"), [-0.01, 0.025, 0.0])
    close(-0.05 * k3, [-0.0009365377, -0.0074360635, 0.0])
    assert (k3 >= 0).all()
    with pytest.raises(ValueError):
        kl_estimate(lp, ref, "k4")


# T4 ------------------------------------------------------------------------------------------------------------
def test_t4_truncation_and_lengths():
    responses = torch.tensor([[5, 7, 2, 9, 4], [5, 2, 2, 3, 1], [1, 3, 4, 6, 8], [2, 3, 4, 6, 8]])
    assert first_true_indices(responses == 2).tolist() == [2, 1, 5, 0]
    trunc, seq_len, stopped = truncate_after_stop(responses, [2], pad_id=0)
    assert trunc.tolist() == [[5, 7, 2, 0, 0], [5, 2, 0, 0, 0], [1, 3, 4, 6, 8], [2, 0, 0, 0, 0]]
    assert seq_len.tolist() == [2, 1, 4, 0] and stopped.tolist() == [True, True, False, True]
    scores = t([1.0, 1.0, 1.0, 1.0]) - 1.0 * (~stopped).to(D)  # missing_eos_penalty 1.0
    assert scores.tolist() == [1.0, 1.0, 0.0, 1.0]


def test_t4_pad_equal_to_stop_is_refused():
    with pytest.raises(ValueError, match="pad token must differ"):
        truncate_after_stop(torch.tensor([[5, 2, 9]]), [2], pad_id=2)


def test_several_stop_tokens():
    trunc, seq_len, stopped = truncate_after_stop(torch.tensor([[5, 1, 7], [5, 6, 7]]), [5_000, 1], pad_id=0)
    assert (
        trunc.tolist() == [[5, 1, 0], [5, 6, 7]] and seq_len.tolist() == [1, 2] and stopped.tolist() == [True, False]
    )


# T5 ------------------------------------------------------------------------------------------------------------
RESP = torch.tensor([[5, 7, 2, 9, 4], [6, 3, 8, 1, 4]])
LOGP = t([[-1.0, -2.0, -0.5, -3.0, -1.0], [-0.3, -0.7, -1.1, -0.2, -0.9]])
REF = t([[-1.2, -1.5, -0.5, -2.0, -2.0], [-0.4, -0.6, -1.0, -0.5, -0.9]])
VALUES = t([[0.1, 0.2, 0.3, 0.4, 0.5], [0.2, 0.1, 0.0, -0.1, -0.2]])


def _t5(estimator: str, position: str, whiten_rewards: bool = False):
    """The T5 batch through the production post-processing: truncation, ``final_scores`` (missing-stop penalty 1)
    and ``advantages`` (the functions ``ppo.rollout`` calls)."""
    _, seq_len, stopped = truncate_after_stop(RESP, [2], pad_id=0)
    scores = final_scores(t([2.0, 1.5]), stopped, missing_stop_penalty=1.0)
    a = advantages(
        LOGP,
        REF,
        VALUES,
        scores,
        seq_len,
        kl_coef=0.05,
        kl_estimator=estimator,
        reward_position=position,
        whiten_rewards=whiten_rewards,
        gamma=1.0,
        lam=0.95,
    )
    return dict(
        seq_len=seq_len,
        scores=scores,
        kl=a.kl,
        rewards=a.rewards,
        non_score=a.non_score,
        raw_adv=a.raw_advantages,
        returns=a.returns,
        adv=a.advantages,
        values=a.values,
        action_mask=a.action_mask,
        value_mask=a.value_mask,
    )


def test_final_scores_order_normalise_clip_then_penalty():
    """Catches a penalty applied before normalisation (it would be divided by std) or clipped away."""
    raw = t([7.0, 1.0, 7.0])
    ended = torch.tensor([True, True, False])
    got = final_scores(raw, ended, mean=3.0, std=2.0, normalize=True, clip=1.5, missing_stop_penalty=1.0)
    close(got, [1.5, -1.0, 0.5])  # (7-3)/2 = 2 -> 1.5; (1-3)/2 = -1; 1.5 - 1
    close(final_scores(raw, ended), raw)  # nothing asked: the raw scores


def test_t5_trl_convention_k1():
    r = _t5("k1", "after_eos")
    assert r["seq_len"].tolist() == [2, 4]
    close(r["values"], [[0.1, 0.2, 0.3, 0.4, 0], [0.2, 0.1, 0.0, -0.1, -0.2]])
    close(r["kl"], [[0.2, -0.5, 0, 0, 0], [0.1, -0.1, -0.1, 0.3, 0]])
    close(r["rewards"], [[-0.01, 0.025, 0, 2.0, 0], [-0.005, 0.005, 0.005, -0.015, 0.5]])
    close(r["raw_adv"], [[1.6708, 1.664, 1.62, 1.6, 0], [0.19056875, 0.311125, 0.4275, 0.55, 0.7]])
    close(r["returns"], [[1.7708, 1.864, 1.92, 2.0, 0], [0.39056875, 0.411125, 0.4275, 0.45, 0.5]])
    close(
        r["adv"],
        [
            [1.2038415617, 1.1933337452, 1.1253419917, 0, 0],
            [-1.0835111277, -0.8972195177, -0.7173890560, -0.5280938330, -0.2963037642],
        ],
    )
    close(r["kl"].sum(1).mean(), -0.05)  # objective/kl
    close(r["non_score"].sum(1).mean(), 0.0025)  # objective/non_score_reward
    close(r["scores"].mean(), 1.25)  # objective/scores
    close(r["non_score"].sum(1).mean() + r["scores"].mean(), 1.2525)  # objective/rlhf_reward
    close(
        masked_mean(-torch.where(r["action_mask"], LOGP, t(0.0)), r["action_mask"], 1)
        .mul(r["action_mask"].sum(1))
        .mean(),
        3.35,
    )  # objective/entropy: summed sampled-token NLL


def test_t5_trl_convention_k3():
    r = _t5("k3", "after_eos")
    close(
        r["kl"], [[0.0187307531, 0.1487212707, 0, 0, 0], [0.0048374180, 0.0051709181, 0.0051709181, 0.0408182207, 0]]
    )
    close(
        r["raw_adv"],
        [[1.6490492020, 1.6315639365, 1.62, 1.6, 0], [0.1966962217, 0.3125664133, 0.4345525886, 0.5629590890, 0.7]],
    )
    close(
        r["adv"],
        [
            [1.1976309958, 1.1700998539, 1.1518920450, 0, 0],
            [-1.0891478818, -0.9067063471, -0.7146349892, -0.5124546124, -0.2966790641],
        ],
    )
    close(r["kl"].sum(1).mean(), 0.1117247493)
    close(r["non_score"].sum(1).mean(), -0.0055862375)
    close(r["non_score"].sum(1).mean() + r["scores"].mean(), 1.2444137625)


def test_t5_eos_convention():
    r = _t5("k1", "eos")
    close(r["rewards"], [[-0.01, 0.025, 2.0, 0, 0], [-0.005, 0.005, 0.005, -0.015, 0.5]])
    close(r["raw_adv"], [[1.743, 1.74, 1.7, 0, 0], [0.19056875, 0.311125, 0.4275, 0.55, 0.7]])
    close(r["returns"][0], [1.843, 1.94, 2.0, 0, 0])


def test_t5b_first_step_invariants_and_reward_whitening():
    r = _t5("k1", "after_eos")
    pg, _, ratio = clipped_policy_loss(LOGP, LOGP, r["adv"], r["action_mask"], 0.2)
    assert torch.all(ratio == 1)
    assert abs(float(masked_mean(pg, r["action_mask"]))) < 1e-12
    vf, _ = clipped_value_loss(r["values"], r["values"], r["returns"], r["value_mask"], 0.2)
    vf_loss = masked_mean(vf, r["value_mask"])
    close(vf_loss, 0.6585133391)
    close(masked_mean(pg, r["action_mask"]) + 0.1 * vf_loss, 0.0658513339)
    w = _t5("k1", "after_eos", whiten_rewards=True)
    close(
        w["rewards"],
        [
            [-0.1542734748, -0.1017605096, -0.1392697705, 2.8614710951, 0],
            [-0.1467716226, -0.1317679183, -0.1317679183, -0.1617753270, 0.6109154459],
        ],
    )
    close(
        w["raw_adv"],
        [
            [2.0190168534, 2.1824108718, 2.2991277699, 2.4614710951, 0],
            [-0.2400656133, 0.0070589572, 0.2513967111, 0.5085943467, 0.8109154459],
        ],
    )


# T6 ------------------------------------------------------------------------------------------------------------
def test_t6_clipped_policy_loss():
    ratio = t([1.5, 1.5, 0.5, 0.5, 1.0, 1.1])
    adv = t([1, -1, 1, -1, 2, -0.5])
    mask = torch.ones(6, dtype=torch.bool)
    loss, clipped, r = clipped_policy_loss(torch.log(ratio), torch.zeros(6, dtype=D), adv, mask, 0.2)
    close(loss, [-1.2, 1.5, -0.5, 0.8, -2.0, 0.55])
    assert clipped.tolist() == [True, False, False, True, False, False]
    close(loss.mean(), -0.1416666667)
    close(clipped.to(D).mean(), 1 / 3)
    logr = torch.log(ratio)
    close(logr, [0.4054651081, 0.4054651081, -0.6931471806, -0.6931471806, 0, 0.0953101798])
    close(0.5 * (logr**2).mean(), 0.1082328305)  # approxkl
    close(((ratio - 1) - logr).mean(), 0.0966756608)
    # P9: a masked slot holding NaN leaves the loss unchanged.
    new = torch.cat([torch.log(ratio), t([0.3])])
    old = torch.cat([torch.zeros(6, dtype=D), t([float("nan")])])
    m7 = torch.cat([mask, torch.tensor([False])])
    loss7, _, _ = clipped_policy_loss(new, old, torch.cat([adv, t([float("nan")])]), m7, 0.2)
    close(masked_mean(loss7, m7), -0.1416666667)


# T7 ------------------------------------------------------------------------------------------------------------
def test_t7_clipped_value_loss():
    mask = torch.ones(3, dtype=torch.bool)
    loss, clipped = clipped_value_loss(t([0.5, 0.7, 0.55]), t([0.0, 1.0, 0.5]), t([1.0, 0.0, 0.6]), mask, 0.2)
    close(loss, [0.32, 0.32, 0.00125])
    close(loss.mean(), 0.21375)
    close(clipped.to(D).mean(), 2 / 3)
    unclipped, _ = clipped_value_loss(t([0.5, 0.7, 0.55]), t([0.0, 1.0, 0.5]), t([1.0, 0.0, 0.6]), mask, 10.0)
    close(unclipped.mean(), 0.12375)
    close(-0.1416666667 + 0.1 * loss.mean(), -0.1202916667)


# T9 ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, expected",
    [
        ((4, 2, 2, 1, 1000), (8, 16, 16, 8, 63, 2)),
        ((4, 4, 2, 2, 1000), (16, 32, 16, 8, 32, 2)),
        ((16, 4, 8, 1, 1_000_000), (64, 512, 512, 64, 1954, 4)),
    ],
)
def test_t9_batch_bookkeeping(args, expected):
    b = batch_sizes(*args, num_ppo_epochs=4)
    assert (b.local_batch, b.batch, b.mini_batch, b.local_mini_batch, b.num_updates, b.micro_per_mini) == expected
    assert b.optimizer_steps_per_update == 4 * args[3]


def test_t9_indivisible_batches_are_refused():
    with pytest.raises(ValueError, match="divisible by num_mini_batches"):
        batch_sizes(3, 1, 1, 2, 100, 1)
    with pytest.raises(ValueError, match="micro-batches"):
        batch_sizes(4, 3, 1, 2, 100, 1)


# T10 -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "beta, kl, n, expected",
    [(0.2, 8, 256, 0.201024), (0.2, 3, 256, 0.198976), (0.2, 6.6, 256, 0.200512), (0.15, 6, 512, 0.15)],
)
def test_t10_adaptive_kl(beta, kl, n, expected):
    c = AdaptiveKLController(beta, target=6, horizon=10000)
    c.update(kl, n)
    assert c.value == pytest.approx(expected, abs=1e-9)
    c2 = AdaptiveKLController(0.0, 6, 10000)
    c2.load_state_dict(c.state_dict())
    assert c2.value == c.value


def test_explained_variance():
    mask = torch.ones(1, 4, dtype=torch.bool)
    assert explained_variance(t([[1.0, 2, 3, 4]]), t([[1.0, 2, 3, 4]]), mask) == pytest.approx(1.0)
    assert explained_variance(t([[0.0, 0, 0, 0]]), t([[1.0, 2, 3, 4]]), mask) == pytest.approx(0.0)


# T11: one group of n = 4 with scores [1.0, 0.0, 0.5, 0.5] (../shared/ppo_reference.md, computed by hand)
T11_SCORES = [1.0, 0.0, 0.5, 0.5]


@pytest.mark.parametrize(
    "estimator, scale, expected",
    [
        ("rloo", True, [2 / 3, -2 / 3, 0.0, 0.0]),  # 1 - (0 + 0.5 + 0.5) / 3 = 2/3
        ("grpo", True, [1.2247448714, -1.2247448714, 0.0, 0.0]),  # 0.5 / unbiased std 0.4082482905
        ("grpo", False, [0.5, -0.5, 0.0, 0.0]),  # Dr. GRPO: centred only
    ],
)
def test_t11_group_advantages(estimator, scale, expected):
    got = group_advantages(torch.tensor(T11_SCORES, dtype=torch.float64), 4, estimator, scale)
    assert got.tolist() == pytest.approx(expected, abs=1e-9)


def test_t11_groups_are_consecutive_rows_and_never_mix():
    """Catches groups taken as strided rows (prompt i's samples at i, i + B/k, ...) or a baseline over the whole batch:
    two groups with different means each centre on their own mean."""
    scores = torch.tensor(T11_SCORES + [10.0, 10.0, 12.0, 8.0], dtype=torch.float64)
    got = group_advantages(scores, 4, "grpo", scale=False)
    assert got.tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0, 0.0, 0.0, 2.0, -2.0])
    # negative controls: one mean over the batch (5.25) moves the first group's advantages by 4.75; strided groups
    # (rows 0, 2, 4, 6 and 1, 3, 5, 7) give other numbers too
    whole = scores - scores.mean()
    assert whole[0].item() - got[0].item() == pytest.approx(-4.75)
    strided = scores.view(4, 2).T
    strided = (strided - strided.mean(1, keepdim=True)).T.reshape(-1)
    assert strided.tolist() != pytest.approx(got.tolist())


def test_t11_one_sample_per_prompt_is_refused():
    """P16: with n = 1 every group advantage is 0 and training silently does nothing."""
    with pytest.raises(ValueError, match="at least 2 samples per prompt"):
        group_advantages(torch.tensor([1.0, 2.0]), 1, "rloo")
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        group_advantages(torch.tensor([1.0, 2.0, 3.0]), 4, "grpo")


def _group_case(kl_in_reward: bool):
    # One group of 4, L = 3; k1 KL = logprobs - ref (ref 0). Junk (5.0) past each response's last valid index.
    logprobs = t([[0.2, 0.0, 0.4], [0.1, 0.1, 5.0], [0.0, 0.0, 0.0], [0.3, 5.0, 5.0]])
    return group_token_advantages(
        logprobs,
        torch.zeros_like(logprobs),
        t(T11_SCORES),
        torch.tensor([2, 1, 2, 0]),
        k=4,
        estimator="rloo",
        scale=True,
        kl_coef=0.5,
        kl_estimator="k1",
        kl_in_reward=kl_in_reward,
    )


def test_t11_group_token_advantages_with_the_kl_in_the_reward():
    """Catches the group score put anywhere but the stop token, a discount or whitening applied to a group
    estimator, the KL penalty left out or counted past the stop, and junk after the stop leaking in. By hand
    (RLOO advantages [2/3, -2/3, 0, 0], rewards -0.5 kl per token, A_t = sum of rewards from t on):
    sample 0: rewards [-0.1, 0, -0.2 + 2/3] -> [0.3666667, 0.4666667, 0.4666667]; sample 1: [-0.05, -0.05 - 2/3, .]
    -> [-0.7666667, -0.7166667, 0]; sample 2: 0; sample 3: [-0.15, ., .]."""
    a = _group_case(True)
    close(
        a.advantages,
        [[0.3666667, 0.4666667, 0.4666667], [-0.7666667, -0.7166667, 0.0], [0.0, 0.0, 0.0], [-0.15, 0.0, 0.0]],
    )
    assert torch.equal(a.returns, a.advantages) and not a.values.any()
    close(a.non_score.sum(1), [-0.3, -0.1, 0.0, -0.15])
    assert a.action_mask.tolist() == [[True] * 3, [True, True, False], [True] * 3, [True, False, False]]


def test_t11_group_token_advantages_with_the_kl_as_a_loss():
    """With ``kl_penalty: loss`` the rewards carry no KL: every valid token of a response has its group advantage
    (negative control: the KL-in-reward case above differs on every response with a non-zero KL)."""
    a = _group_case(False)
    close(a.advantages, [[2 / 3] * 3, [-2 / 3, -2 / 3, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert not a.non_score.any()
    assert not torch.allclose(a.advantages, _group_case(True).advantages)


def test_a_group_without_signal_gets_no_advantage_and_is_the_group_the_metric_counts():
    """Catches two thresholds for "no signal in this group": the advantage dividing rounding noise by its std (an
    O(1) advantage from scores that differ by 1e-8) while ``objective/zero_std_groups`` calls the group signal-free.
    Negative control: the old rule, ``centred / (std + 1e-9)``, gives that group advantages of order 1."""
    from pipeline.core.ppo_math import NO_SIGNAL_STD, group_std

    scores = torch.tensor([1.0, 1.0 + 1e-8, 1.0, 1.0, 1.0, 0.0, 0.5, 0.5], dtype=torch.float64)
    std = group_std(scores, 4)
    assert std[0] < NO_SIGNAL_STD <= std[1]  # the metric counts group 0, not group 1
    for estimator, scale in (("grpo", True), ("grpo", False), ("rloo", True)):
        got = group_advantages(scores, 4, estimator, scale)
        assert got[:4].tolist() == [0.0] * 4 and got[4:].abs().max() > 0.4
    groups = scores.view(-1, 4)
    old = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-9)
    assert old[0].abs().max() > 0.4


# T17: the KL as a loss, by exact expectation over a categorical distribution -------------------------------------
def _categorical(seed: int, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=D)


def _expected_gradient(loss_fn, theta, old_logp, ref_logp):
    """d/d theta of E_{y ~ pi_old}[loss_fn(log pi_theta(y), log pi_old(y), log ref(y))], summed exactly over the
    categories (the samples' distribution pi_old is fixed: it is the rollout's)."""
    theta = theta.clone().requires_grad_(True)
    logp = torch.log_softmax(theta, -1)
    per_token = loss_fn(logp, old_logp, ref_logp)
    (grad,) = torch.autograd.grad((old_logp.exp() * per_token).sum(), theta)
    return grad


def _kl_gradients(theta, ref_logp):
    """The exact gradients of KL(pi_theta || ref) and of KL(ref || pi_theta) in theta."""
    out = []
    for reverse in (False, True):
        x = theta.clone().requires_grad_(True)
        logp = torch.log_softmax(x, -1)
        kl = (logp.exp() * (logp - ref_logp)).sum() if not reverse else (ref_logp.exp() * (ref_logp - logp)).sum()
        out.append(torch.autograd.grad(kl, x)[0])
    return out


@pytest.mark.parametrize("estimator", ["k2", "k3"])
@pytest.mark.parametrize("off_policy", [False, True], ids=["first minibatch", "later minibatch"])
def test_t17_kl_loss_has_the_gradient_of_kl_pi_ref(estimator, off_policy):
    """Catches a KL loss that pulls along the other KL (k3 without the ratio: the gradient of KL(ref || pi)), or
    along neither once the samples are off-policy (k2 without the ratio at a later minibatch). Expected gradients are
    exact sums over six categories; the ratio-weighted loss equals the gradient of KL(pi || ref) to 1e-12, on policy
    and off. Negative controls: the unweighted k3 matches KL(ref || pi) exactly and misses KL(pi || ref) by more than
    0.05; the unweighted k2 off policy misses it by more than 0.01."""
    from pipeline.core.ppo_math import kl_loss

    theta, ref_logp = _categorical(0), torch.log_softmax(_categorical(1), -1)
    old_theta = theta + (0.7 * _categorical(2) if off_policy else 0.0)
    old_logp = torch.log_softmax(old_theta, -1)
    forward, reverse = _kl_gradients(theta, ref_logp)
    got = _expected_gradient(lambda lp, old, ref: kl_loss(lp, old, ref, estimator)[0], theta, old_logp, ref_logp)
    assert torch.allclose(got, forward, atol=1e-12), (got, forward)
    assert (forward - reverse).abs().max() > 0.05  # the two directions are told apart on this distribution

    plain_k3 = _expected_gradient(lambda lp, old, ref: kl_estimate(lp, ref, "k3"), theta, old_logp, ref_logp)
    if not off_policy:
        assert torch.allclose(plain_k3, reverse, atol=1e-12)  # DeepSeekMath's k3 loss: KL(ref || pi)
    assert (plain_k3 - forward).abs().max() > 0.05
    plain_k2 = _expected_gradient(lambda lp, old, ref: kl_estimate(lp, ref, "k2"), theta, old_logp, ref_logp)
    if off_policy:
        assert (plain_k2 - forward).abs().max() > 0.01
    else:
        assert torch.allclose(plain_k2, forward, atol=1e-12)  # k2 on policy: the right gradient


def test_t17_kl_loss_value_is_an_unbiased_kl_and_no_gradient_is_clamped_away():
    """Catches a logged KL that is not KL(pi || ref) (the ratio-weighted k3's expectation over pi_old is exactly
    KL(pi_theta || ref)) and a clamp on the gradient's path: a token whose log-ratio is 30 (k3 = e^30) keeps its
    gradient, rho * (log pi - log ref). Negative control: the old per-token clamp at 10 gives that token zero
    gradient."""
    from pipeline.core.ppo_math import kl_loss

    theta, ref_logp = _categorical(0), torch.log_softmax(_categorical(1), -1)
    old_logp = torch.log_softmax(theta + 0.7 * _categorical(2), -1)
    logp = torch.log_softmax(theta, -1)
    _, value = kl_loss(logp, old_logp, ref_logp, "k3")
    exact = (logp.exp() * (logp - ref_logp)).sum()
    assert float((old_logp.exp() * value).sum()) == pytest.approx(float(exact), abs=1e-12)

    lp = torch.tensor([-30.0], dtype=D, requires_grad=True)  # the policy left a token the reference likes
    ref, old = torch.tensor([0.0], dtype=D), torch.tensor([-30.0], dtype=D)
    (ours,) = torch.autograd.grad(kl_loss(lp, old, ref, "k3")[0].sum(), lp)
    assert float(ours) == pytest.approx(-30.0)  # rho (log pi - log ref) with rho = 1
    (clamped,) = torch.autograd.grad(kl_estimate(lp, ref, "k3").clamp(-10.0, 10.0).sum(), lp)
    assert float(clamped) == 0.0


def test_t17_k1_and_unknown_estimators_are_not_a_loss():
    """Catches a KL loss that silently accepts k1 (zero expected gradient on policy)."""
    from pipeline.core.ppo_math import kl_loss

    x = torch.zeros(2, dtype=D)
    with pytest.raises(ValueError, match="cannot be a loss"):
        kl_loss(x, x, x, "k1")
