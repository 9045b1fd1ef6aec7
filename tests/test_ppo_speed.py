"""PPO's cheaper paths compute what the plain ones compute: the output head only on valid response positions, the
logits kept within ``ppo.logits_memory_mb`` and recomputed past it, the sampler's log-probs in place of a second
policy forward, frozen models in bf16 within the stated tolerance, and the fused AdamW. Each test names the defect it
catches; where a check could pass with the defect present, a negative control shows it fails on the broken variant.
(Speed and memory themselves are measured by ``make bench``, not here.)"""

from __future__ import annotations

import pytest
import torch

from pipeline.core import ppo_math as pm
from pipeline.core.sampling import left_pad
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


@pytest.mark.slow
def test_the_head_runs_only_on_valid_response_positions_with_the_same_numbers(chain):
    """Catches the output head applied to post-stop padding (wasted work on a 262k vocabulary), and a packing of
    the valid positions that scatters log-probs or gradients back to the wrong place."""
    from pipeline.core.policy import response_logprobs

    s, tok = ppo_setup(chain)
    policy = s.unwrapped.policy
    seq, mask, pos, resp, valid = _batch(s, tok)
    rows, handle = _head_rows(policy)
    packed, _ = response_logprobs(policy, seq, mask, pos, resp, 0.7, valid=valid)
    assert rows == [int(valid.sum())] == [2 + 4 + 6]
    rows.clear()
    everything, _ = response_logprobs(policy, seq, mask, pos, resp, 0.7)  # negative control: no mask
    handle.remove()
    assert rows == [3 * 6]
    assert torch.allclose(packed[valid], everything[valid], atol=1e-6)
    assert (packed[~valid] == 0).all() and (everything[~valid] != 0).all()
    # Gradients: the same through the packed path as through the full one restricted to valid positions.
    grads = []
    for v in (valid, None):
        policy.zero_grad()
        lp, _ = response_logprobs(policy, seq, mask, pos, resp, 0.7, valid=v)
        lp[valid].sum().backward()
        grads.append([p.grad.clone() for p in policy.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(*grads))


@pytest.mark.slow
def test_logits_within_the_budget_are_kept_and_past_it_recomputed_with_equal_gradients(chain):
    """Catches the head always recomputed in the backward pass (a third of the training step's head work on a real
    vocabulary) or, past ``ppo.logits_memory_mb``, never recomputed (the whole micro-batch's logits held), and a
    chunked path whose gradients differ."""
    from pipeline.core.policy import logit_positions, response_logprobs

    s, tok = ppo_setup(chain)
    policy = s.unwrapped.policy
    seq, mask, pos, resp, valid = _batch(s, tok)
    small = 20 / 1024  # 20 KB: pieces of a few positions on the toy's vocabulary
    per_mb = logit_positions(policy, small)
    assert 1 < per_mb < int(valid.sum()) <= logit_positions(policy, 256)
    calls, grads = {}, {}
    for budget in (256, small):
        rows, handle = _head_rows(policy)
        policy.zero_grad()
        lp, _ = response_logprobs(policy, seq, mask, pos, resp, 0.7, valid=valid, memory_mb=budget)
        lp.sum().backward()
        handle.remove()
        calls[budget] = rows
        grads[budget] = [p.grad.clone() for p in policy.parameters() if p.grad is not None]
    n = int(valid.sum())
    assert calls[256] == [n]  # once: kept for the backward pass
    # Pieces: as many as B x L positions need (the same on every process), the valid ones spread over them.
    pieces = [len(c) for c in torch.arange(n).tensor_split(-(-valid.numel() // per_mb))]
    assert len(pieces) > 1 and max(pieces) <= per_mb
    assert sorted(calls[small]) == sorted(pieces * 2)  # every piece twice: forward, then recomputed in backward
    assert len(grads[256]) == len(grads[small]) > 0
    # fp32 sums in another order: 2e-5 on an embedding gradient of 30, relative to the tensor's largest entry 1e-6;
    # a lost or misplaced piece would be of the gradient's own size.
    assert all((a - b).abs().max() <= 1e-5 * b.abs().max() for a, b in zip(grads[256], grads[small]))


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


def test_fused_adamw_steps_like_the_default_loop():
    """Catches a fused optimizer that steps differently from torch's default AdamW (the one the PPO tests' numbers
    were checked with): three steps on the same gradients agree within fp32 rounding."""
    torch.manual_seed(0)
    start = torch.randn(300, 70)
    a, b = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    oa = torch.optim.AdamW([a], lr=1e-3, eps=1e-5, weight_decay=0.0)
    ob = torch.optim.AdamW([b], lr=1e-3, eps=1e-5, weight_decay=0.0, fused=True)
    for _ in range(3):
        g = torch.randn_like(a)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    assert (a - start).abs().mean() > 1e-3  # the steps moved the weights (by up to 3 x lr)
    assert (a - b).abs().max() < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_the_stage_builds_a_fused_optimizer(chain, method):
    s, _ = ppo_setup(chain, f"ppo.method={method}")
    opt = s.optimizer.optimizer if hasattr(s.optimizer, "optimizer") else s.optimizer
    assert opt.defaults["fused"] is True


@pytest.mark.slow
def test_bf16_frozen_models_are_refused_under_zero3(chain, monkeypatch):
    """Catches ``ppo.frozen_precision: bf16`` silently ignored under ZeRO-3, whose ``zero.Init`` casts every model
    it builds to the engine's dtype (the start line would claim bf16 while the models are fp32). Control: fp32 is
    accepted up to the point where the stage needs its inputs. (A stage started by hand under ZeRO-3 is refused here;
    through make it is refused before any stage runs, tests/test_recipe_rules.py.)"""
    from pipeline import ppo
    from pipeline.core.config import ConfigError
    from tests.helpers.chain import chain_recipe

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what accelerate sets in a stage it launched
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ConfigError, match="frozen_precision': bf16 is not supported under DeepSpeed ZeRO-3"):
        ppo.setup(chain_recipe(chain, "ppo.frozen_precision=bf16"), None)
    with pytest.raises(AttributeError):  # past the checks: the missing inputs are reached
        ppo.setup(chain_recipe(chain), None)
