"""PPO's cheaper paths compute what the plain ones compute: the output head only on valid response positions, the
logits kept within ``ppo.logits_memory_mb`` and recomputed past it, the sampler's log-probs in place of a second
policy forward, frozen models in bf16 within the stated tolerance, and the stage's AdamW step (each against an
independent reference, tests/helpers/reference_math.py). Each test names the defect it catches; where a check could
pass with the defect present, a negative control shows it fails on the broken variant.
(Speed and memory themselves are measured by ``make bench``, not here.)"""

from __future__ import annotations

import pytest
import torch

from pipeline.core import ppo_math as pm
from pipeline.core.sampling import left_pad
from tests.helpers import reference_math as ref
from tests.helpers.chain import ppo_setup


def _prompts(tok, texts=("사과는 무엇인가요?", "3 더하기 4는?", "녹차에 대해 알려 주세요.")):
    return [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_dict=False)
        for p in texts
    ]


def _batch(s, tok, L=6):
    """Three left-padded prompts with L response tokens each; the rows end after 2, 4 and 6 valid tokens."""
    q = left_pad(_prompts(tok), s.pad_id, "cpu")
    torch.manual_seed(0)
    resp = torch.randint(10, 200, (3, L))
    seq_len = torch.tensor([1, 3, 5])
    valid = pm.valid_mask(seq_len, L)
    resp = resp.masked_fill(~valid, s.pad_id)
    seq = torch.cat([q, resp], 1)
    mask = torch.cat([(q != s.pad_id).long(), valid.long()], 1)
    from pipeline.core.sampling import positions

    return seq, mask, positions(mask), resp, valid


def _head_rows(policy):
    """Rows of hidden states that reach the output head, per call (forward hooks; a recompute calls it again)."""
    rows: list[int] = []
    handle = policy.get_output_embeddings().register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    return rows, handle


LP_TOL = 2e-5  # nats; see the two tests below
GRAD_TOL = 2e-5  # of each gradient tensor's largest entry


def _lp_gap(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> float:
    return float((a - b)[valid].abs().max())


def _grads(model, logprobs, weights: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """``logprobs()`` (detached) and every trainable parameter's gradient (zeros where none arrived) of
    ``sum(weights * logprobs())`` over the valid positions."""
    model.zero_grad()
    lp = logprobs()
    (lp * weights)[valid].sum().backward()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return lp.detach(), {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in trained}


def _grad_gap(got: dict, want: dict) -> float:
    """The largest difference over parameters, each relative to the reference gradient's largest entry."""
    assert got.keys() == want.keys()
    return max(float((got[k] - want[k]).abs().max() / want[k].abs().max()) for k in want)


@pytest.mark.slow
def test_the_head_runs_only_on_valid_response_positions_with_the_same_numbers(chain):
    """Catches the output head applied to post-stop padding (wasted work on a 262k vocabulary), and a packing of
    the valid positions that scatters log-probs or gradients back to the wrong place (or reads the wrong position,
    or forgets the temperature).

    The numbers are compared with an independent reference (tests/helpers/reference_math.py): the Hugging Face
    model's own full forward, ``log_softmax(logits / T)`` gathered at each response token from the logit one position
    earlier, and autograd through it. Tolerances: log-probs within 2e-5 nats (they reach -20 here, where one fp32 ulp
    is 2e-6; the two paths round differently: measured 3e-6); every parameter's gradient within 2e-5 of that
    gradient's largest entry (measured 1.4e-6). Negative controls: the reference read one position late (off by one)
    or without the temperature misses by far more than either tolerance."""
    from pipeline.core.policy import response_logprobs

    s, tok = ppo_setup(chain)
    policy = s.unwrapped.policy
    seq, mask, pos, resp, valid = _batch(s, tok)
    T = 0.7
    # Gradients of a loss that weighs each position differently, so a gradient sent to the wrong position shows.
    weights = torch.rand(resp.shape, generator=torch.Generator().manual_seed(1)) + 0.5
    rows, handle = _head_rows(policy)
    packed, got_g = _grads(
        policy, lambda: response_logprobs(policy, seq, mask, pos, resp, T, valid=valid)[0], weights, valid
    )
    handle.remove()
    assert rows == [int(valid.sum())] == [2 + 4 + 6]  # one head call, on the valid positions only
    assert (packed[~valid] == 0).all()

    def naive(temperature=T, shift=1):
        return ref.response_logprobs(ref.causal_lm_logits(policy, seq, mask, pos), resp, temperature, shift)

    want, want_g = _grads(policy, naive, weights, valid)
    assert _lp_gap(packed, want, valid) <= LP_TOL
    assert _grad_gap(got_g, want_g) <= GRAD_TOL
    # Negative controls: the broken readings are far outside both tolerances.
    for broken in (dict(shift=0), dict(temperature=1.0)):
        lp, g = _grads(policy, lambda b=broken: naive(**b), weights, valid)
        assert _lp_gap(lp, want, valid) > 1000 * LP_TOL, broken
        assert _grad_gap(g, want_g) > 1000 * GRAD_TOL, broken


@pytest.mark.slow
def test_logits_within_the_budget_are_kept_and_past_it_recomputed_with_equal_gradients(chain, monkeypatch):
    """Catches the head always recomputed in the backward pass (a third of the training step's head work on a real
    vocabulary) or, past ``ppo.logits_memory_mb``, never recomputed (the whole micro-batch's logits held), and a
    chunked, recomputed path whose log-probs or gradients differ from an independent reference (the Hugging Face
    model's full forward, ``log_softmax(logits / T)`` and autograd, tests/helpers/reference_math.py) beyond 2e-5
    nats and 2e-5 of each gradient's largest entry (fp32 sums in another order: measured 4e-6 and 1.4e-6).
    Negative control: pieces whose hidden states are detached from the backbone (a recompute that loses the
    gradient) give the same log-probs but gradients far outside the tolerance."""
    from pipeline.core import heads
    from pipeline.core.policy import response_logprobs

    s, tok = ppo_setup(chain)
    policy = s.unwrapped.policy
    seq, mask, pos, resp, valid = _batch(s, tok)
    T = 0.7
    # The smallest budget (in KB) whose pieces hold 3 positions on the toy's vocabulary.
    small = next(kb / 1024 for kb in range(1, 1024) if heads.logit_positions(policy, kb / 1024, "fp32") >= 3)
    per_mb = heads.logit_positions(policy, small, "fp32")
    assert 1 < per_mb < int(valid.sum()) <= heads.logit_positions(policy, 256, "fp32")
    weights = torch.rand(resp.shape, generator=torch.Generator().manual_seed(1)) + 0.5

    def naive():
        return ref.response_logprobs(ref.causal_lm_logits(policy, seq, mask, pos), resp, T)

    want, want_g = _grads(policy, naive, weights, valid)

    def ours(budget):
        return response_logprobs(policy, seq, mask, pos, resp, T, valid=valid, memory_mb=budget)[0]

    calls = {}
    for budget in (256, small):
        rows, handle = _head_rows(policy)
        got, got_g = _grads(policy, lambda b=budget: ours(b), weights, valid)
        handle.remove()
        calls[budget] = rows
        assert _lp_gap(got, want, valid) <= LP_TOL, budget
        assert _grad_gap(got_g, want_g) <= GRAD_TOL, budget
    n = int(valid.sum())
    assert calls[256] == [n]  # once: kept for the backward pass
    # Pieces: as many as B x L positions need (the same on every process), the valid ones spread over them.
    pieces = [len(c) for c in torch.arange(n).tensor_split(-(-valid.numel() // per_mb))]
    assert len(pieces) > 1 and max(pieces) <= per_mb
    assert sorted(calls[small]) == sorted(pieces * 2)  # every piece twice: forward, then recomputed in backward
    # Negative control: the pieces cut from the backbone's graph. Same log-probs, wrong gradients.
    token_logprobs = heads.token_logprobs
    monkeypatch.setattr(heads, "token_logprobs", lambda m, x, *a: token_logprobs(m, x.detach(), *a))
    broken, broken_g = _grads(policy, lambda: ours(small), weights, valid)
    assert _lp_gap(broken, want, valid) <= LP_TOL
    assert _grad_gap(broken_g, want_g) > 1000 * GRAD_TOL


def _rollout(chain, *overrides):
    from pipeline.core.ppo_step import rollout

    s, tok = ppo_setup(chain, *overrides)
    s.model.eval()
    torch.manual_seed(3)
    return rollout(s, _prompts(tok) * 2, 0.05), s


@pytest.mark.slow
def test_sampler_logprobs_stand_in_for_the_second_policy_forward(chain):
    """Catches rollout log-probs from the sampler that are not the training forward's function (temperature,
    positions, cache), which would make the first PPO ratio differ from 1; in fp32 they agree within 1e-5. The
    forward path stays available (``ppo.rollout_logprobs: forward``) and gives the same rollout."""
    hot = "ppo.temperature=1.5"  # the trained toy is nearly deterministic at 0.7: every log-prob would be about 0
    sampled, s = _rollout(chain, hot, "ppo.rollout_logprobs=sampler")
    forward, _ = _rollout(chain, hot, "ppo.rollout_logprobs=forward")
    assert torch.equal(sampled.responses, forward.responses)  # same seed, same draws
    am = sampled.action_mask
    assert am.sum() > 6
    assert (sampled.logprobs - forward.logprobs)[am].abs().max() < 1e-5
    assert torch.equal(sampled.values, forward.values)
    assert abs(float(sampled.stats["policy/entropy_avg"] - forward.stats["policy/entropy_avg"])) < 1e-4
    # The first training forward of the update sees ratio 1 against the sampler's log-probs.
    s.model.train()
    new_lp, _, _ = s.model(sampled.seq, sampled.mask, sampled.pos, sampled.responses, s.cfg.temperature, valid=am)
    assert (new_lp.detach() - sampled.logprobs)[am].abs().max() < 1e-5
    # Negative control: log-probs at temperature 1 (what a sampler forgetting T reports) are far off.
    wrong, _, _ = s.model(sampled.seq, sampled.mask, sampled.pos, sampled.responses, 1.0, valid=am)
    assert (wrong.detach() - sampled.logprobs)[am].abs().max() > 1e-2
    assert sampled.logprobs[am].min() < -0.5  # the draws were not all near-certain tokens


@pytest.mark.slow
def test_frozen_models_in_bf16_stay_within_the_stated_tolerance(chain):
    """Catches ``ppo.frozen_precision: bf16`` changing more than docs/ppo.md states (reference log-probs within
    0.05 nats per token, reward-model scores within 0.05 of the fp32 ones) or not applying at all (the models still
    fp32, which would leave the memory and time unchanged)."""
    fp32, s32 = _rollout(chain)
    bf16, s16 = _rollout(chain, "ppo.frozen_precision=bf16")
    assert s32.ref.dtype == s32.reward.dtype == torch.float32
    assert s16.ref.dtype == s16.reward.dtype == torch.bfloat16
    assert s16.unwrapped.policy.dtype == s16.unwrapped.value.dtype == torch.float32  # trained models stay fp32
    assert torch.equal(fp32.responses, bf16.responses) and torch.equal(fp32.logprobs, bf16.logprobs)
    am = fp32.action_mask
    from pipeline.core.ppo_step import ref_logprobs

    seq, mask, pos, resp = fp32.seq, fp32.mask, fp32.pos, fp32.responses
    r32 = ref_logprobs(s32, seq, mask, pos, resp, am)
    r16 = ref_logprobs(s16, seq, mask, pos, resp, am)
    ref_gap = float((r32 - r16)[am].abs().max())
    from pipeline.core.sampling import score_at

    idx = seq.size(1) - resp.size(1) + (am.sum(1) - 1)
    score_gap = float(
        (score_at(s32.reward, seq, mask, pos, idx) - score_at(s16.reward, seq, mask, pos, idx)).abs().max()
    )
    assert 0 < ref_gap < 0.05, ref_gap
    assert 0 < score_gap < 0.05, score_gap


def _optimizer_test_grads(params, steps, seed=0):
    """Gradients for ``steps`` AdamW steps: random signs, magnitudes spread evenly in log scale over 1e-7 to 1e-2,
    so some entries sit near ``adam_eps`` (1e-5), where a wrong eps changes the step, and most far from it."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        row = []
        for p in params:
            magnitude = 10 ** (torch.rand(p.shape, generator=gen, dtype=torch.float64) * 5 - 7)
            sign = torch.randint(0, 2, p.shape, generator=gen) * 2 - 1
            row.append((magnitude * sign).to(p.dtype))
        out.append(row)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_the_stage_optimizer_takes_the_adamw_step_of_the_recipe(chain, method):
    """Catches an optimizer that does not step as the recipe says: another learning rate or ``adam_eps`` than
    ``ppo.learning_rate`` and ``ppo.adam_eps``, weight decay (PPO has none; torch's AdamW default is 0.01), no bias
    correction, moments that are not carried from step to step, or parameters the stage trains that it never
    steps. The optimizer the stage builds (``build_setup``, through accelerate's wrapper as the loop calls it) takes
    three steps on given gradients; every trainable entry must land where a hand-written AdamW
    (tests/helpers/reference_math.py, fp64) puts it, within 4 fp32 ulps of the weight plus 1e-5 of the learning
    rate (the fused kernel rounds m, v and the weight to fp32 each step: measured at most 0.35 of that).
    Negative controls: the same formula with torch's default eps 1e-8, without bias correction, or with weight
    decay 0.01 misses by more than that tolerance (gradients near eps make a wrong eps show; measured 2.7e5, 8e5
    and 6.5 times the tolerance)."""
    from tests.helpers.chain import chain_recipe

    overrides = (f"ppo.method={method}",)
    s, _ = ppo_setup(chain, *overrides)
    cfg = chain_recipe(chain, *overrides).ppo
    trained = [p for p in s.unwrapped.parameters() if p.requires_grad]
    inner = s.optimizer.optimizer if hasattr(s.optimizer, "optimizer") else s.optimizer
    stepped = [p for g in inner.param_groups for p in g["params"]]
    assert {id(p) for p in stepped} == {id(p) for p in trained}  # it steps exactly what the stage trains
    if method == "lora":
        assert all("lora_" in n for n, p in s.unwrapped.policy.named_parameters() if p.requires_grad)
    start = [p.detach().clone() for p in trained]
    grads = _optimizer_test_grads(trained, 3)
    got = []
    for step in grads:
        for p, g in zip(trained, step):
            p.grad = g.clone()
        s.optimizer.step()
        s.optimizer.zero_grad()
        got.append([p.detach().clone() for p in trained])

    # PPO's AdamW: the recipe's rate and eps, torch's (and the papers') betas, no weight decay.
    right = dict(lr=cfg.learning_rate, betas=(0.9, 0.999), eps=cfg.adam_eps, weight_decay=0.0)

    def worst(**formula) -> float:
        """The largest miss of the hand formula over every entry and step, in units of the tolerance."""
        out = 0.0
        for i, w0 in enumerate(start):
            want = ref.adamw_steps(w0, [step[i] for step in grads], **formula)
            for t in range(len(grads)):
                tol = 4 * torch.finfo(torch.float32).eps * want[t].abs() + 1e-5 * cfg.learning_rate
                out = max(out, float(((got[t][i].double() - want[t]).abs() / tol).max()))
        return out

    assert max(float((g - w).abs().max()) for g, w in zip(got[-1], start)) > cfg.learning_rate  # it moved
    assert worst(**right) <= 1.0
    assert worst(**{**right, "eps": 1e-8}) > 100
    assert worst(**right, bias_correction=False) > 100
    assert worst(**{**right, "weight_decay": 0.01}) > 3


@pytest.mark.slow
def test_bf16_frozen_models_are_refused_under_zero3(chain, monkeypatch):
    """Catches ``ppo.frozen_precision: bf16`` silently ignored under ZeRO-3, whose ``zero.Init`` casts every model
    it builds to the engine's dtype (the start line would claim bf16 while the models are fp32). The stage must
    refuse it before building anything, with a ConfigError naming the key ``ppo.frozen_precision`` and ZeRO-3.
    Controls: fp32 gets past every check (to the accelerator, which is where this test stops the stage); the stage
    with that one rule left out (the broken variant) also gets there with bf16, so it fails the check. (A stage
    started by hand under ZeRO-3 is refused here; through make it is refused before any stage runs,
    tests/test_recipe_rules.py.)"""
    import dataclasses

    from pipeline import ppo
    from pipeline.core import topology
    from pipeline.core.config import ConfigError
    from tests.helpers.chain import chain_recipe

    class PastTheChecks(Exception):
        """Raised where the stage starts building (its accelerator): every check before it passed."""

    def no_accelerator(*args, **kwargs):
        raise PastTheChecks

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what accelerate sets in a stage it launched
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setattr(ppo, "make_accelerator", no_accelerator)

    def outcome(*overrides) -> str:
        """``refused`` (the ConfigError naming the key), ``past the checks``, or what else happened."""
        try:
            ppo.setup(chain_recipe(chain, *overrides), None)
        except PastTheChecks:
            return "past the checks"
        except ConfigError as e:
            if "key 'ppo.frozen_precision'" in str(e) and "bf16 is not supported under DeepSpeed ZeRO-3" in str(e):
                return "refused"
            return f"another ConfigError: {e}"
        return "returned"

    assert outcome("ppo.frozen_precision=bf16") == "refused"
    assert outcome() == "past the checks"  # fp32: the check refuses only bf16, and nothing else on the way fails
    # Negative control: the launch checks without the frozen-precision rule (what the stage did before) let bf16
    # through to building the models, so the first assertion fails on it.
    check = topology.check

    def without_the_rule(recipe, topo, source="recipe"):
        plain = dataclasses.replace(recipe, ppo=dataclasses.replace(recipe.ppo, frozen_precision="fp32"))
        return check(plain, topo, source)

    monkeypatch.setattr(topology, "check", without_the_rule)
    assert outcome("ppo.frozen_precision=bf16") == "past the checks"
