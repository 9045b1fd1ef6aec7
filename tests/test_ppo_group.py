"""Critic-free estimators in the PPO loop (``ppo.estimator: rloo | grpo``) on the tiny chain: no value model
anywhere, each prompt's samples in consecutive rows of one process, the KL as a reward penalty or as a loss term,
learning on the held-out rule. The estimators' arithmetic is tested by hand in test_ppo_math.py (T11)."""

from __future__ import annotations

import pytest
import torch

from pipeline.core import ppo_math as pm
from pipeline.core.batching import batch_sizes
from pipeline.core.notices import missing_notices
from tests.helpers.chain import chain_recipe, fresh_run, ppo_metrics, ppo_setup, rule_rate

RLOO = ["ppo.estimator=rloo", "ppo.num_generations=4"]


def test_batch_prompts_puts_each_prompts_samples_in_consecutive_rows_of_one_process():
    """Catches groups split across processes (a baseline that misses samples), strided groups, and a prompt
    order that differs from the one-sample order (a resumed run must take the same prompts)."""
    from pipeline.ppo import batch_prompts

    prompts = [[i] for i in range(10)]
    sizes = batch_sizes(4, 2, 2, 1, 64, 1)  # 8 rows per process, 16 per update
    rows = [batch_prompts(prompts, 3, sizes, rank, 7, k=4) for rank in (0, 1)]
    for r in rows:
        assert len(r) == 8 and r[0:4] == [r[0]] * 4 and r[4:8] == [r[4]] * 4 and r[0] != r[4]
    firsts = [r[i] for r in rows for i in (0, 4)]
    assert len({x[0] for x in firsts}) == 4  # four different prompts over the two processes
    # The k = 4 batch takes the prompts a one-sample run with a quarter of the batch would take, in order.
    quarter = batch_sizes(1, 2, 2, 1, 64, 1)
    assert firsts == [p for rank in (0, 1) for p in batch_prompts(prompts, 3, quarter, rank, 7)]
    # Negative control: k = 1 on the same sizes gives eight different prompts per process, not groups.
    assert len({x[0] for x in batch_prompts(prompts, 3, sizes, 0, 7)}) > 2


def _largest_weight_change(a, b) -> float:
    """The largest absolute difference between the weights two checkpoint folders store under the same names."""
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


@pytest.mark.slow
def test_no_value_model_is_built_trained_or_saved(chain, tmp_path):
    """Catches a critic-free run that still loads, trains or saves a value model (its memory is the point of the
    estimator), and one whose training does not move the policy: the saved weights must differ from the SFT
    model's by at least the learning rate (Adam's first step moves every weight with a gradient by about the
    learning rate; 8 steps here, the first 4 at 1e-4). A no-op update (learning rate 0, a step never taken) or the
    SFT weights saved instead of the trained ones leave them equal. Negative controls: GAE's setup has the value
    model's parameters in its optimizer; ``ppo.learning_rate=0`` saves the SFT weights exactly (largest change 0,
    run by hand: the policy/approxkl_avg > 0 this replaces held there too)."""
    from pipeline import ppo

    s, _ = ppo_setup(chain, *RLOO)
    assert s.unwrapped.value is None
    policy_params = sum(p.numel() for p in s.unwrapped.policy.parameters())
    trained = sum(p.numel() for g in s.optimizer.param_groups for p in g["params"])
    assert trained == policy_params
    gae, _ = ppo_setup(chain)
    assert sum(p.numel() for g in gae.optimizer.param_groups for p in g["params"]) > 1.5 * policy_params

    out = fresh_run(chain, tmp_path)
    final = ppo.run(chain_recipe(out, *RLOO, "ppo.total_episodes=64", "ppo.panel_every=1"))
    assert not (final / "value").exists() and missing_notices(final) == []
    assert "| PPO (rloo, 4 samples per prompt) |" in (final / "README.md").read_text()  # the card says how
    metrics = ppo_metrics(out)
    assert [m["update"] for m in metrics] == [1, 2]
    for m in metrics:
        assert "loss/value_avg" not in m and "value/grad_norm" not in m and "val/explained_variance" not in m
        # Their values are recomputed from a rollout in test_group_metrics_are_the_consecutive_groups_unbiased_std.
        assert "objective/zero_std_groups" in m and "objective/score_std_in_group" in m
    moved = _largest_weight_change(final, out / "tiny_ko" / "sft" / "final")
    assert moved >= 1e-4, moved  # the policy moved: measured 6.0e-4 (4 steps at 1e-4, 4 at 5e-5); 0 at lr 0
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(final)


@pytest.mark.slow
def test_group_metrics_are_the_consecutive_groups_unbiased_std(chain):
    """Catches ``objective/score_std_in_group`` and ``objective/zero_std_groups`` computed over strided groups
    (``scores.view(k, -1)``: rows i, i + B/k, ... of different prompts) or with the biased std (ddof 0): both are
    recomputed by hand from a rollout's scores, each prompt's 4 samples in consecutive rows, with the unbiased std;
    the groups counted as carrying no signal must be those whose advantages are 0. The scores are clipped to
    +-0.05 so that some groups score alike (std exactly 0) and others do not. Negative controls: the strided groups
    and the biased std give other numbers for the same rollout (asserted below)."""
    import datasets

    from pipeline.core.ppo_step import rollout, score_responses

    k = 4
    s, _ = ppo_setup(chain, *RLOO, "ppo.reward_clip=0.05")
    prompts = datasets.Dataset.from_parquet(str(chain / "tiny_ko" / "data" / "prompts" / "train.parquet"))
    rows = [p for p in prompts["prompt_ids"][:8] for _ in range(k)]  # 8 prompts, each in 4 consecutive rows
    s.model.eval()
    torch.manual_seed(0)
    ro = rollout(s, rows, 0.0)  # kl_coef 0: each token's advantage is its sample's group advantage
    scores = score_responses(s, ro.generation)[2].double().tolist()  # the reward model's forward is deterministic

    def by_hand(groups: list[list[float]], ddof: int) -> tuple[float, float]:
        stds = []
        for g in groups:
            mean = sum(g) / len(g)
            stds.append((sum((x - mean) ** 2 for x in g) / (len(g) - ddof)) ** 0.5)
        return sum(stds) / len(stds), sum(sd < pm.NO_SIGNAL_STD for sd in stds) / len(stds)

    consecutive = [scores[i : i + k] for i in range(0, len(scores), k)]
    std_in_group, zero_std = by_hand(consecutive, ddof=1)
    assert 0 < zero_std < 1, consecutive  # some groups carry no signal and some do: both counts are tested
    assert float(ro.stats["objective/score_std_in_group"]) == pytest.approx(std_in_group, rel=1e-5)
    assert float(ro.stats["objective/zero_std_groups"]) == zero_std
    # The advantages agree: a group counted as carrying no signal has advantage 0 on every sample.
    no_signal = (ro.advantages[:, 0].view(-1, k) == 0).all(1).tolist()
    assert no_signal == [max(g) == min(g) for g in consecutive], (consecutive, ro.advantages[:, 0])
    # Negative controls: strided groups and the biased std give other numbers for this rollout.
    strided = [scores[i :: len(scores) // k] for i in range(len(scores) // k)]
    assert by_hand(strided, ddof=1) != pytest.approx((std_in_group, zero_std), rel=1e-3)
    assert by_hand(consecutive, ddof=0)[0] != pytest.approx(std_in_group, rel=1e-3)


@pytest.mark.slow
def test_lr0_ratio_is_one_and_kl_zero_without_a_value_model(chain, tmp_path):
    """The invariants of a no-op update hold in the critic-free loop too (a forward that differs between rollout
    and training, or a reference that is not the SFT model, breaks them)."""
    from pipeline import ppo

    out = fresh_run(chain, tmp_path)
    ppo.run(
        chain_recipe(
            out, "ppo.estimator=grpo", "ppo.num_generations=4", "ppo.learning_rate=0", "ppo.total_episodes=32"
        )
    )
    (m,) = ppo_metrics(out)
    assert m["val/ratio"] == pytest.approx(1.0, abs=1e-6)
    assert m["policy/approxkl_avg"] == pytest.approx(0.0, abs=1e-10)
    assert m["objective/kl"] == pytest.approx(0.0, abs=1e-6)


def _moved_policy_rollout(chain, *overrides):
    """A setup whose policy is the SFT model with noise on its weights (so its KL to the reference is > 0), and a
    rollout of it with every advantage set to 0: only a KL term can move the policy."""
    from pipeline.core.ppo_step import rollout

    s, tok = ppo_setup(
        chain,
        *RLOO,
        "ppo.learning_rate=1e-3",
        "ppo.num_ppo_epochs=1",
        "ppo.per_device_train_batch_size=32",
        "ppo.gradient_accumulation_steps=1",
        *overrides,
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for p in s.unwrapped.policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "사과는 무엇인가요?"}], add_generation_prompt=True, return_dict=False
    )
    sizes = batch_sizes(s.cfg.per_device_train_batch_size, s.cfg.gradient_accumulation_steps, 1, 1, 32, 1)
    s.model.eval()
    ro = rollout(s, [prompt] * sizes.local_batch, 0.5)
    ro.advantages = torch.zeros_like(ro.advantages)
    return s, ro, sizes


def _exact_kl(s, ro) -> tuple[float, torch.Tensor]:
    """KL(pi || ref) at each response position, exact over the whole vocabulary (not a sampled estimate), of the
    policy and the reference teacher-forced on the rollout's sequences at the PPO temperature: the mean over the
    rollout's response tokens, and the policy's (B, L) log-probs of the response tokens from the same forward."""
    L, T = ro.responses.size(1), s.cfg.temperature
    policy = s.unwrapped.policy
    was_training = policy.training
    policy.eval()

    @torch.no_grad()
    def log_softmax(model) -> torch.Tensor:  # (B, L, V)
        logits = model(input_ids=ro.seq, attention_mask=ro.mask, position_ids=ro.pos).logits
        return torch.log_softmax(logits[:, -L - 1 : -1].float() / T, -1)

    logp, logq = log_softmax(policy), log_softmax(s.ref)
    policy.train(was_training)
    kl = (logp.exp() * (logp - logq)).sum(-1)  # (B, L)
    return float(pm.masked_mean(kl, ro.action_mask)), logp.gather(-1, ro.responses.unsqueeze(-1)).squeeze(-1)


def _exact_kl_after_one_update(s, ro, sizes) -> tuple[float, float, dict]:
    """The exact KL (``_exact_kl``) before and after one optimizer step on the rollout, and the update's stats."""
    from pipeline.core.ppo_step import StepCounter, train_on_rollout

    before, sampled = _exact_kl(s, ro)
    # Before the step these are the distributions the tokens were sampled from (a slice one position off is not).
    assert torch.allclose(sampled[ro.action_mask], ro.logprobs[ro.action_mask], atol=1e-4)
    s.model.train()
    stats = train_on_rollout(s, ro, sizes, torch.Generator().manual_seed(0), StepCounter(), 1, kl_coef=0.5)
    return before, _exact_kl(s, ro)[0], stats


@pytest.mark.slow
def test_kl_as_a_loss_pulls_the_policy_to_the_reference(chain):
    """Catches ``kl_penalty: loss`` that never reaches the gradient (the term detached, or its coefficient
    dropped) or that pushes the policy away from the reference (its sign flipped): with every advantage 0 the KL
    term alone must lower the exact KL(pi || ref) over the whole vocabulary on the rollout's sequences (measured
    0.061 -> 0.051 at learning rate 1e-3 and kl_coef 0.5). The logged ``loss/kl_avg`` of the one minibatch, where
    the importance ratio is 1, is the rollout's k3 estimate. Negative control: with the KL in the reward (the
    rollout's advantages already hold it, here zeroed) the same update leaves the exact KL as it was."""
    s, ro, sizes = _moved_policy_rollout(chain, "ppo.kl_penalty=loss", "ppo.kl_estimator=k3")
    k3 = float(pm.masked_mean(pm.kl_estimate(ro.logprobs, ro.ref_logprobs, "k3"), ro.action_mask))
    before, after, stats = _exact_kl_after_one_update(s, ro, sizes)
    assert before > 1e-2 and after < 0.9 * before, (before, after)
    assert float(stats["loss/kl_avg"]) == pytest.approx(k3, rel=1e-3)  # the loss's KL is the rollout's at step one
    s, ro, sizes = _moved_policy_rollout(chain, "ppo.kl_penalty=reward", "ppo.kl_estimator=k3")
    before, after, stats = _exact_kl_after_one_update(s, ro, sizes)
    assert before > 1e-2 and after == pytest.approx(before, rel=1e-6) and "loss/kl_avg" not in stats


@pytest.mark.slow
def test_rloo_learns_the_ground_truth_property(chain, tmp_path):
    """The issue's goal on the toy: RLOO with 4 samples per prompt raises the held-out rule rate by 0.15 over
    SFT, with no value model."""
    from pipeline import ppo

    out = fresh_run(chain, tmp_path)
    final = ppo.run(chain_recipe(out, *RLOO, "ppo.total_episodes=1920", "ppo.panel_every=0"))  # 60 updates
    sft_rate, ppo_rate = rule_rate(out / "tiny_ko" / "sft" / "final"), rule_rate(final)
    assert ppo_rate > sft_rate + 0.15, (sft_rate, ppo_rate)
    assert not (final / "value").exists()


@pytest.mark.slow
def test_a_checkpoint_resumes_only_under_its_estimator(chain, tmp_path, capsys):
    """Catches a resume across estimators: a GAE checkpoint holds a value model that an rloo run has no place for
    (accelerate would fail deep in load_state), and another group size changes which prompts each update takes.
    Negative control: the same settings resume."""
    import shutil

    from pipeline import ppo
    from tests.helpers.chain import BASE, RECIPE

    out = fresh_run(chain, tmp_path)
    args = ["ppo.total_episodes=64", "ppo.save_steps=1", "ppo.panel_every=0"]
    ppo.run(chain_recipe(out, *args))
    stage = out / "tiny_ko" / "ppo"
    shutil.rmtree(stage / "final")  # as if killed after checkpoint-1 of its 2 updates
    cli = ["--recipe", str(RECIPE), f"run.output_dir={out}", *BASE, *args]
    assert ppo.main([*cli, *RLOO]) == 2
    err = capsys.readouterr().err
    assert "checkpoint-1 was written with ppo.estimator gae and ppo.num_generations 1" in err, err
    assert "Traceback" not in err and not (stage / "final").exists()
    assert ppo.main(cli) == 0
    assert "resuming from" in capsys.readouterr().out and (stage / "final" / "COMPLETE").exists()
