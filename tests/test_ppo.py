"""PPO stage on the tiny chain: invariants with learning rate 0, the exact optimizer-step count, rollout log-probs
equal to the training forward's (and to the sampler's), left-pad invariance, dropout off, the score read at the stop
token, learning, exact resume, safety stops, the reward-model gate, LoRA."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from pipeline.core.notices import missing_notices
from tests.helpers import REPO
from tests.helpers.chain import BASE, RECIPE, chain_recipe, fresh_run, ppo_metrics, ppo_setup, rule_rate

# Every test here runs PPO on the tiny chain (the session's ``chain`` fixture takes minutes to build).
pytestmark = pytest.mark.slow


def test_lr0_invariants(chain, tmp_path):
    from pipeline import ppo

    out = fresh_run(chain, tmp_path)
    ppo.run(chain_recipe(out, "ppo.learning_rate=0", "ppo.total_episodes=64", "ppo.panel_every=0"))
    for m in ppo_metrics(out):
        assert m["val/ratio"] == pytest.approx(1.0, abs=1e-6)
        assert m["policy/approxkl_avg"] == pytest.approx(0.0, abs=1e-10)
        assert m["policy/clipfrac_avg"] == 0.0 and m["val/clipfrac_avg"] == 0.0
        assert m["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference
        assert m["objective/rlhf_reward"] == pytest.approx(m["objective/scores"], abs=1e-6)
        # The Korean answer measures reach metrics.jsonl every update, measured on the same responses: the stop
        # rate and length agree with the rollout's own (a decode of the wrong rows or fields would not).
        for key in ("korean/hangul_ratio", "korean/script_switch_rate", "korean/repetition", "korean/stop_rate"):
            assert 0.0 <= m[key] <= 1.0, (key, m[key])
        assert m["korean/stop_rate"] == pytest.approx(1 - m["ppo/no_stop_rate"], abs=1e-6)
        assert m["korean/length"] == pytest.approx(m["ppo/response_length"], abs=1e-4)
        assert m["korean/hangul_ratio"] > 0.5  # the SFT model of the tiny chain answers in Korean


def test_optimizer_steps_are_epochs_times_minibatches(chain, tmp_path, monkeypatch):
    """Catches a wrong number of optimizer steps per update (TRL 1.12 takes num_ppo_epochs, or one per
    micro-batch: quirk Q5). Counts the real AdamW steps, not a counter kept beside them."""
    from pipeline import ppo

    real, calls = torch.optim.AdamW.step, {"inner": 0}

    def counted(self, *args, **kwargs):
        calls["inner"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counted)
    outer = []
    from accelerate.optimizer import AcceleratedOptimizer

    real_outer = AcceleratedOptimizer.step
    monkeypatch.setattr(
        AcceleratedOptimizer, "step", lambda self, *a, **k: outer.append(1) or real_outer(self, *a, **k)
    )
    out = fresh_run(chain, tmp_path)
    final = ppo.run(
        chain_recipe(
            out,
            "ppo.total_episodes=32",
            "ppo.per_device_train_batch_size=4",
            "ppo.gradient_accumulation_steps=4",
            "ppo.num_mini_batches=2",
            "ppo.num_ppo_epochs=2",
            "ppo.panel_every=0",
        )
    )
    lineage = json.loads((final / "lineage.json").read_text())
    assert lineage["metrics"]["updates"] == 2
    assert calls["inner"] == 2 * 2 * 2  # updates x epochs x minibatches
    assert lineage["metrics"]["optimizer_steps_this_session"] == calls["inner"]
    # Negative control: the accelerate wrapper is called once per micro-batch (2 per minibatch here); counting
    # those calls would give twice the real number.
    assert len(outer) == 2 * calls["inner"]


def test_rollout_logprobs_equal_training_forward_and_sampler(chain):
    from transformers import GenerationConfig

    from pipeline.core.ppo_step import policy_logprobs_and_values
    from pipeline.core.sampling import left_pad, positions

    s, tok = ppo_setup(chain, "ppo.temperature=0.7")
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_dict=False)
        for p in ("사과는 무엇인가요?", "3 더하기 4는?")
    ]
    q = left_pad(prompts, s.pad_id, "cpu")
    torch.manual_seed(0)
    gen = GenerationConfig(
        max_new_tokens=8,
        do_sample=True,
        temperature=0.7,
        top_k=0,
        top_p=1.0,
        pad_token_id=s.pad_id,
        eos_token_id=None,
    )
    policy = s.unwrapped.policy.eval()
    policy.generation_config.eos_token_id = None  # sample 8 tokens, through no processor but the temperature
    out = policy.generate(
        input_ids=q,
        attention_mask=(q != s.pad_id).long(),
        generation_config=gen,
        output_scores=True,
        return_dict_in_generate=True,
    )
    resp = out.sequences[:, q.size(1) :]
    sampler = torch.stack([torch.log_softmax(sc, -1) for sc in out.scores], 1).gather(-1, resp.unsqueeze(-1))[..., 0]
    seq = torch.cat([q, resp], 1)
    mask = torch.cat([(q != s.pad_id).long(), torch.ones_like(resp)], 1)  # a sampled token is never padding
    pos = positions(mask)
    rollout_lp, _, _ = policy_logprobs_and_values(s, seq, mask, pos, resp)
    assert (rollout_lp - sampler).abs().max() < 1e-4  # T8: temperature and positions as the sampler had them
    s.model.train()  # dropout is off, so training mode gives the same log-probs (T14)
    train_lp, _, _ = s.model(seq, mask, pos, resp, 0.7)
    assert torch.equal(train_lp.detach(), rollout_lp)
    # Negative control: without the temperature the log-probs differ.
    no_temperature, _, _ = s.model(seq, mask, pos, resp, 1.0)
    assert (no_temperature.detach() - sampler).abs().max() > 1e-2


def test_left_padding_invariance(chain):
    """Catches forwards without ``position_ids = cumsum(mask) - mask`` (P4). Gemma's RoPE is relative, so the
    default positions (every position shifted by the pad count) change its log-probs only by fp32 rounding of large
    angles (8e-6 to 2e-4 with 8000 pads, depending on the weights): an invariance check alone cannot catch the
    defect on Gemma. So the test also records the positions every backbone forward receives, and checks them."""
    from pipeline.core.ppo_step import policy_logprobs_and_values
    from pipeline.core.sampling import positions

    s, tok = ppo_setup(chain)
    seen: list = []
    for backbone in (s.unwrapped.policy.get_decoder(), s.unwrapped.value.model):
        backbone.forward = lambda *a, f=backbone.forward, **k: seen.append(k.get("position_ids")) or f(*a, **k)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "사과는 무엇인가요?"}], add_generation_prompt=True, return_dict=False
    )
    resp = tok("사과는 좋습니다.", add_special_tokens=False)["input_ids"]
    results = []
    for pads in (0, 1, 3, 7):
        seq = torch.tensor([[s.pad_id] * pads + prompt + resp])
        mask = (seq != s.pad_id).long()
        seen.clear()
        lp, values, _ = policy_logprobs_and_values(s, seq, mask, positions(mask), torch.tensor([resp]))
        results.append((lp, values))
        assert len(seen) == 2  # policy and value
        for pos in seen:
            assert pos is not None and pos[0, pads:].tolist() == list(range(len(prompt) + len(resp)))
    for lp, values in results[1:]:
        assert torch.allclose(lp, results[0][0], atol=1e-5) and torch.allclose(values, results[0][1], atol=1e-5)
    # Negative control: a forward that drops position_ids (the defect) fails the check above.
    from pipeline.core.policy import response_logprobs

    seen.clear()
    with torch.no_grad():
        response_logprobs(s.unwrapped.policy, seq, mask, None, torch.tensor([resp]), 1.0)
    assert seen == [None]


def test_score_is_read_at_the_stop_token(chain):
    from transformers import AutoModelForSequenceClassification

    from pipeline.core.sampling import left_pad, positions, score_at

    s, tok = ppo_setup(chain)
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "사과는 무엇인가요?"}], add_generation_prompt=True, return_dict=False
    )
    resp = tok("사과는 좋습니다.", add_special_tokens=False)["input_ids"] + [eot]
    q = left_pad([prompt, prompt[2:]], s.pad_id, "cpu")  # the second row is shorter: left pads
    r = torch.tensor([resp + [s.pad_id] * 3, resp + [s.pad_id] * 3])
    seq = torch.cat([q, r], 1)
    mask = (seq != s.pad_id).long()
    got = score_at(s.reward, seq, mask, positions(mask), torch.tensor([q.size(1) + len(resp) - 1] * 2))
    rm = AutoModelForSequenceClassification.from_pretrained(chain / "tiny_ko" / "rm" / "final").eval()
    with torch.no_grad():
        expected = rm(input_ids=torch.tensor([prompt + resp])).logits[0, 0]
        expected2 = rm(input_ids=torch.tensor([prompt[2:] + resp])).logits[0, 0]
    assert torch.allclose(got, torch.stack([expected, expected2]), atol=1e-5)


@pytest.mark.slow
def test_ppo_learns_the_ground_truth_property(chain, tmp_path):
    from pipeline import ppo

    out = fresh_run(chain, tmp_path)
    final = ppo.run(chain_recipe(out, "ppo.total_episodes=1920", "ppo.panel_every=0"))  # 60 updates
    metrics = ppo_metrics(out)
    first = sum(m["objective/scores"] for m in metrics[:5]) / 5
    last = sum(m["objective/scores"] for m in metrics[-5:]) / 5
    assert last > first + 0.2
    assert max(m["objective/kl"] for m in metrics) < 5.0
    sft_rate, ppo_rate = rule_rate(out / "tiny_ko" / "sft" / "final"), rule_rate(final)
    assert ppo_rate > sft_rate + 0.15, (sft_rate, ppo_rate)
    assert missing_notices(final) == [] and missing_notices(final / "value") == []
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    AutoModelForCausalLM.from_pretrained(final)
    AutoModelForSequenceClassification.from_pretrained(final / "value")


def _cmd(out, *overrides):
    return [sys.executable, "-m", "pipeline.ppo", "--recipe", str(RECIPE), f"run.output_dir={out}", *BASE, *overrides]


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["gae", "rloo"])
def test_resume_after_kill_continues_exactly(chain, tmp_path_factory, estimator):
    """Catches state a resumed run does not restore (RNG streams, optimizer, scheduler, KL controller, the prompt
    order, with groups of samples per prompt for rloo): the killed-and-resumed run must match an uninterrupted
    one update for update and weight for weight."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = ["ppo.total_episodes=256", "ppo.save_steps=3", "ppo.panel_every=0"]  # 8 updates
    if estimator == "rloo":
        args += ["ppo.estimator=rloo", "ppo.num_generations=4"]
    critic = estimator == "gae"
    a = fresh_run(chain, tmp_path_factory.mktemp("a"))
    assert subprocess.run(_cmd(a, *args), cwd=REPO, env=env, capture_output=True, timeout=600).returncode == 0
    b = fresh_run(chain, tmp_path_factory.mktemp("b"))
    proc = subprocess.Popen(_cmd(b, *args), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = b / "tiny_ko" / "ppo" / "checkpoints" / "checkpoint-3" / "COMPLETE"
    deadline = time.time() + 300
    while not ckpt.exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    res = subprocess.run(_cmd(b, *args), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stdout and "(update 3)" in res.stdout
    ma, mb = ppo_metrics(a), ppo_metrics(b)
    assert [m["update"] for m in mb] == list(range(1, 9))
    for x, y in zip(ma, mb):  # the resumed run continues the killed run's RNG stream and state exactly
        keys = ["objective/scores", "objective/kl", "loss/policy_avg", "episode"] + ["loss/value_avg"] * critic
        for k in keys:
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7), (x["update"], k)
    from safetensors.torch import load_file

    parts = ["model.safetensors"] + ["value/model.safetensors"] * critic
    for part in parts:  # and the same weights, policy and value
        wa, wb = (load_file(x / "tiny_ko" / "ppo" / "final" / part) for x in (a, b))
        assert wa.keys() == wb.keys()
        assert all(torch.allclose(wa[k], wb[k], rtol=0, atol=1e-6) for k in wa), part
    again = subprocess.run(_cmd(b, *args), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "already finished" in again.stdout


def test_non_finite_loss_stops_naming_the_update_and_keeps_the_last_good_checkpoint(
    chain, tmp_path, capsys, monkeypatch
):
    from pipeline import ppo
    from pipeline.core.faults import FAULT_ENV

    out = fresh_run(chain, tmp_path)
    ckpts = out / "tiny_ko" / "ppo" / "checkpoints"
    monkeypatch.setenv(FAULT_ENV, "ppo:3")  # one weight becomes NaN just before update 3 trains
    args = [*BASE, "ppo.total_episodes=320", "ppo.panel_every=0", "ppo.save_steps=1"]
    rc = ppo.main(["--recipe", str(RECIPE), f"run.output_dir={out}", *args])
    assert rc == 1
    err = capsys.readouterr().err
    assert "non-finite PPO loss (nan) at update 3, epoch 1, minibatch 1" in err, err[-2000:]
    assert f"the last good checkpoint, {ckpts / 'checkpoint-2'}, is kept" in err
    assert (ckpts / "checkpoint-2" / "COMPLETE").is_file() and not (ckpts / "checkpoint-3").exists()
    assert not (out / "tiny_ko" / "ppo" / "final").exists()
    rows = [json.loads(x) for x in (out / "tiny_ko" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rows] == [1, 2]


def test_weights_stepped_to_inf_stop_before_the_next_rollout(chain, tmp_path, capsys):
    from pipeline import ppo

    out = fresh_run(chain, tmp_path)
    # An exploding learning rate: the loss and the clipped gradient stay finite, the step makes the weights inf.
    args = [*BASE, "ppo.total_episodes=320", "ppo.panel_every=0", "ppo.learning_rate=1e30", "ppo.max_grad_norm=1e30"]
    assert ppo.main(["--recipe", str(RECIPE), f"run.output_dir={out}", *args]) == 1
    err = capsys.readouterr().err
    assert "update 1" in err and "non-finite" in err and "no checkpoint was saved yet" in err, err[-2000:]
    assert "Traceback" not in err and not (out / "tiny_ko" / "ppo" / "final").exists()


def test_kl_limit_stops(chain, tmp_path, capsys):
    from pipeline import ppo

    out = fresh_run(chain, tmp_path)
    rc = ppo.main(
        [
            "--recipe",
            str(RECIPE),
            f"run.output_dir={out}",
            *BASE,
            "ppo.max_kl=1e-9",
            "ppo.learning_rate=1e-3",
            "ppo.total_episodes=160",
            "ppo.panel_every=0",
        ]
    )
    assert rc == 1
    assert "passed ppo.max_kl 1e-09" in capsys.readouterr().err


def test_reward_model_gate(chain, tmp_path, capsys):
    """Catches PPO starting from a reward model below ``rm.min_accuracy``, a gate that refuses one at or above it
    (``<=`` for ``<``, or a gate that always closes: accuracy 1.0 must pass), a gate that reads another number than
    the stored held-out accuracy, and an override that does not work. The accuracy is written into the reward
    model's ``reward_stats.json`` (mean and std kept), so both sides of the gate are tested whatever accuracy the
    chain's reward model reached. Negative control: ``ppo.ignore_rm_gate: true`` turns the refusal into a warning
    and the run completes."""
    import dataclasses

    from pipeline import ppo
    from pipeline.core.reward_stats import RewardStats

    out = fresh_run(chain, tmp_path)
    rm_dir = out / "tiny_ko" / "rm" / "final"
    stored = RewardStats.read(rm_dir)

    def with_accuracy(accuracy: float) -> None:
        dataclasses.replace(stored, accuracy=accuracy).write(rm_dir)

    base = ["--recipe", str(RECIPE), f"run.output_dir={out}", *BASE, "ppo.total_episodes=32", "ppo.panel_every=0"]
    final = out / "tiny_ko" / "ppo" / "final"
    # At the threshold the gate opens (it refuses only below), here at 0.75 and at 1.0.
    with_accuracy(0.75)
    assert ppo.read_inputs(chain_recipe(out, "rm.min_accuracy=0.75")).rm_accuracy == 0.75
    with_accuracy(1.0)
    capsys.readouterr()
    assert ppo.main([*base, "rm.min_accuracy=1.0"]) == 0 and (final / "COMPLETE").exists()
    assert "rm.min_accuracy" not in capsys.readouterr().err
    shutil.rmtree(out / "tiny_ko" / "ppo")
    # Below it PPO refuses to start, saying why, and writes no policy.
    with_accuracy(0.75)
    args = [*base, "rm.min_accuracy=0.76"]
    assert ppo.main(args) == 2
    err = capsys.readouterr().err
    assert "held-out pairwise accuracy 0.750, below rm.min_accuracy 0.76" in err and "Traceback" not in err, err
    assert not final.exists()
    # Negative control: the override starts it anyway, with the reason as a warning.
    assert ppo.main([*args, "ppo.ignore_rm_gate=true"]) == 0 and (final / "COMPLETE").exists()
    err = capsys.readouterr().err
    assert "warning (ppo.ignore_rm_gate): " in err and "below rm.min_accuracy 0.76" in err, err


def test_lora_policy_exports_merged(chain, tmp_path):
    from transformers import AutoModelForCausalLM

    from pipeline import ppo

    out = fresh_run(chain, tmp_path)
    final = ppo.run(
        chain_recipe(
            out,
            "ppo.method=lora",
            "ppo.lora.r=4",
            "ppo.total_episodes=64",
            "ppo.panel_every=2",
            "ppo.learning_rate=1e-3",
        )
    )
    assert missing_notices(final) == [] and not (final / "adapter_config.json").exists()
    assert (final / "adapter" / "adapter_config.json").is_file()
    AutoModelForCausalLM.from_pretrained(final)
