"""One PPO update over prepared models, the steps ``pipeline.ppo`` runs on every rollout batch: the rollout (steps
1-7: sample, log-probs under the policy and the reference, values, the score at the stop token, per-token KL,
advantages) and the update (step 8: ``num_ppo_epochs`` x ``num_mini_batches`` optimizer steps, each a forward and
backward pass per micro-batch and one step). The formulas are ``pipeline.core.ppo_math``; the models, their forward
and the helpers across processes are ``pipeline.core.policy`` and ``pipeline.core.distributed``; the stage (inputs,
setup, the loop over updates, metrics, checkpoints, the save) is ``pipeline.ppo``. docs/ppo.md has the details
and their sources.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function

from pipeline.core import ppo_math as pm
from pipeline.core import rewards
from pipeline.core.batching import BatchSizes
from pipeline.core.config import PPOConfig
from pipeline.core.distributed import check_deepspeed_step, check_loss, gathered, unwrapped_for_generation
from pipeline.core.faults import NonFiniteLossError, fail_if_asked, nonfinite_ranks, poison_if_asked
from pipeline.core.policy import PolicyAndValue, clip_each, response_logprobs
from pipeline.core.rewards import PromptRows, RewardFunction
from pipeline.core.sampling import Generation, chunks, generate, left_pad, score

# ----------------------------------------------------------------------------------------------------------------
# The models
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """Everything the rollout and update functions need."""

    accelerator: Any
    model: Any  # PolicyAndValue as prepared by accelerate (DDP or DeepSpeed engine)
    optimizer: Any
    ref: Any  # frozen reference, or None when the policy is LoRA (adapter disabled)
    reward: Any  # frozen reward model (sequence classifier), or None (ppo.reward_model: none)
    cfg: PPOConfig
    pad_id: int
    stop_ids: list[int]  # generation stops on these ([] : always the full response length)
    stage: str  # the stage's name in fault-injection specs (pipeline.core.faults)
    reward_mean: float = 0.0
    reward_std: float = 1.0
    reward_functions: list[RewardFunction] = field(default_factory=list)  # ppo.reward_functions, loaded
    tokenizer: Any = None  # decodes responses for the reward functions
    zero3: bool = False
    bf16: bool = False  # bf16 autocast compute over fp32 weights (run.precision)
    last_rewards: dict[str, torch.Tensor] = field(default_factory=dict)  # the last batch's reward/<name> means

    def autocast(self):
        """bf16 autocast for every rollout forward (the reference's and the reward model's included) when the run
        computes in bf16: the same context the training forward runs in, so the first update's ratio is 1 and its
        KL 0. Outside DeepSpeed accelerate's own autocast wraps the training forward; under DeepSpeed the engine's
        ``torch_autocast`` does (``make_accelerator``)."""
        return torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @property
    def turn_end_id(self) -> int:
        """<end_of_turn> (the first stop id): the only stop that ends a turn (the reward model reads there)."""
        return self.stop_ids[0] if self.stop_ids else -1

    @property
    def critic(self) -> bool:
        """Whether there is a value model (``ppo.estimator: gae``)."""
        return self.cfg.estimator == "gae"

    @property
    def sampler_logprobs(self) -> bool:
        """Whether the rollout takes the sampler's log-probs (``ppo.rollout_logprobs``; ``auto``: unless bf16)."""
        if self.cfg.rollout_logprobs == "auto":
            return not self.bf16
        return self.cfg.rollout_logprobs == "sampler"

    @property
    def unwrapped(self) -> PolicyAndValue:
        return self.accelerator.unwrap_model(self.model)


# ----------------------------------------------------------------------------------------------------------------
# Rollouts
# ----------------------------------------------------------------------------------------------------------------


def sample(s: Setup, queries: torch.Tensor, greedy: bool = False, model: nn.Module | None = None) -> Generation:
    """Responses of the policy (or of ``model``, a frozen one) to the left-padded ``queries``, truncated after the
    stop token: sampled at the PPO temperature, or greedy."""
    kwargs = dict(
        pad_id=s.pad_id,
        stop_ids=s.stop_ids,
        max_new_tokens=s.cfg.response_length,
        temperature=None if greedy else s.cfg.temperature,
        chunk=s.cfg.local_rollout_forward_batch_size,
        head_precision=s.cfg.head_precision,
    )
    if model is not None:
        module = model.module if hasattr(model, "module") else model  # a DeepSpeed inference engine's model
        with gathered(module, s.zero3):
            return generate(module, queries, **kwargs)
    with unwrapped_for_generation(s.model, s.accelerator, s.zero3) as unwrapped:
        return generate(unwrapped.policy, queries, **kwargs)


@torch.no_grad()
def policy_logprobs_and_values(s: Setup, seq, mask, pos, responses, entropy: bool = False, valid=None):
    """Rollout log-probs and values from the same forward the update uses; (B, L) each (and the entropy)."""
    lps, vals, ents = [], [], []
    for a, b in chunks(seq.size(0), s.cfg.local_rollout_forward_batch_size):
        v = None if valid is None else valid[a:b]
        lp, values, ent = s.model(
            seq[a:b],
            mask[a:b],
            pos[a:b],
            responses[a:b],
            s.cfg.temperature,
            entropy,
            v,
            s.cfg.logits_memory_mb,
            head_precision=s.cfg.head_precision,
        )
        lps.append(lp)
        vals.append(values)
        ents.append(ent)
    return torch.cat(lps), (torch.cat(vals).float() if s.critic else None), (torch.cat(ents) if entropy else None)


@torch.no_grad()
def rollout_values(s: Setup, seq, mask, pos, responses) -> torch.Tensor:
    """The value model alone (the log-probs came from the sampler); (B, L)."""
    out = []
    for a, b in chunks(seq.size(0), s.cfg.local_rollout_forward_batch_size):
        out.append(
            s.model(
                seq[a:b],
                mask[a:b],
                pos[a:b],
                responses[a:b],
                s.cfg.temperature,
                policy=False,
                head_precision=s.cfg.head_precision,
            )[1].float()
        )
    return torch.cat(out)


@torch.no_grad()
def ref_logprobs(s: Setup, seq, mask, pos, responses, valid=None) -> torch.Tensor:
    out = []
    for a, b in chunks(seq.size(0), s.cfg.local_rollout_forward_batch_size):
        args = (seq[a:b], mask[a:b], pos[a:b], responses[a:b], s.cfg.temperature)
        kwargs = {
            "valid": None if valid is None else valid[a:b],
            "memory_mb": s.cfg.logits_memory_mb,
            "head_precision": s.cfg.head_precision,
        }
        if s.ref is None:  # LoRA: the reference is the same base with the adapter disabled
            policy = s.unwrapped.policy
            with policy.disable_adapter():
                out.append(response_logprobs(policy, *args, **kwargs)[0])
        else:
            ref = s.ref.module if hasattr(s.ref, "module") else s.ref  # a DeepSpeed inference engine's model
            out.append(response_logprobs(ref, *args, **kwargs)[0])
    return torch.cat(out)


@dataclass
class Rollout:
    seq: torch.Tensor  # (B, C+L) query and truncated response
    mask: torch.Tensor  # (B, C+L) attention mask
    pos: torch.Tensor  # (B, C+L) position ids
    responses: torch.Tensor  # (B, L)
    logprobs: torch.Tensor  # (B, L), INVALID_LOGPROB where not valid
    values: torch.Tensor  # (B, L), 0 where not valid
    advantages: torch.Tensor  # (B, L) whitened
    returns: torch.Tensor  # (B, L)
    action_mask: torch.Tensor  # (B, L) the response tokens up to and including the stop token
    value_mask: torch.Tensor  # (B, L) where values and rewards are defined
    ref_logprobs: torch.Tensor | None = None  # (B, L), INVALID_LOGPROB where not valid (for ppo.kl_penalty: loss)
    stats: dict = field(default_factory=dict)
    generation: Generation | None = None  # the sampled responses, for the answer measures


def rollout(
    s: Setup, prompts: list[list[int]], kl_coef: float, update: int = 0, rows: PromptRows | None = None
) -> Rollout:
    """Steps 1-7 of PPO update ``update`` (counted from 1) on this process's ``prompts`` (``rows``: their texts and
    columns, which reward functions read)."""
    t0 = time.perf_counter()
    # 1-2. Left-padded prompts; sampled responses; tokens after the stop token become pad.
    with record_function("ppo/sample"):
        g = sample(s, left_pad(prompts, s.pad_id, s.accelerator.device))
        fail_if_asked(s.stage, "sample", update)
    responses = g.responses
    t_gen = time.perf_counter() - t0
    seq, mask, pos = g.inputs()  # pad ids inside a response are never generated before the stop
    valid = pm.valid_mask(g.seq_len, responses.size(1))
    # 3-5. Log-probs under the policy (the sampler's, or a forward like the training one) and the reference; values.
    t1 = time.perf_counter()
    if s.sampler_logprobs and g.logprobs is not None:  # (a Generation built by hand has none)
        logprobs, entropy = g.logprobs, g.entropy
        values = None
        if s.critic:
            with record_function("ppo/values"):
                values = rollout_values(s, seq, mask, pos, responses)
    else:
        with record_function("ppo/policy_and_values"):
            logprobs, values, entropy = policy_logprobs_and_values(s, seq, mask, pos, responses, True, valid)
    with record_function("ppo/reference"):
        ref_lp = ref_logprobs(s, seq, mask, pos, responses, valid)
    # 6. Score at the stop token (or the last token when the response never stopped); only <end_of_turn> ends a turn.
    scored = score_responses(s, g, rows)
    t_score = time.perf_counter() - t1
    # 7. Masks, per-token KL, rewards, GAE, whitening; or, critic-free, the group transform and plain returns.
    adv = estimate_advantages(s, logprobs, ref_lp, values, scored[2], g.seq_len, kl_coef)
    stats = rollout_stats(s, g, adv, entropy, scored, t_gen, t_score)
    return Rollout(
        seq=seq,
        mask=mask,
        pos=pos,
        responses=responses,
        logprobs=adv.logprobs,
        values=adv.values,
        advantages=adv.advantages,
        returns=adv.returns,
        action_mask=adv.action_mask,
        value_mask=adv.value_mask,
        ref_logprobs=adv.ref_logprobs,
        stats=stats,
        generation=g,
    )


def score_responses(
    s: Setup, g: Generation, rows: PromptRows | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 6: (raw scores, ended, final scores), each (B,). Only <end_of_turn> ends a turn: a response that stopped
    on <eos> is read at a token the reward model never learned to score, so it counts as not ended (the missing-stop
    penalty applies), like one cut at the length limit. With reward functions the score is their weighted sum with
    the reward model's standardised score (``pipeline.core.rewards``); each function's mean is in ``s.last_rewards``."""
    ended = torch.tensor(g.ended_on(s.turn_end_id), device=g.responses.device)
    raw_scores, combined = raw_and_combined(s, g, rows)
    scores = pm.final_scores(
        combined,
        ended,
        mean=s.reward_mean,
        std=s.reward_std,
        normalize=s.cfg.normalize_reward and not s.reward_functions,  # with functions: already standardised
        clip=s.cfg.reward_clip,
        missing_stop_penalty=s.cfg.missing_eos_penalty,
    )
    return raw_scores, ended, scores


def raw_and_combined(s: Setup, g: Generation, rows: PromptRows | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw, combined), each (B,): the reward model's raw score (the functions' weighted sum without one), and the
    score before clipping and the missing-stop penalty (the raw score itself when there are no functions)."""
    rm_raw = None
    if s.reward is not None:
        with record_function("ppo/reward"):
            rm_raw = score(s.reward, g, s.cfg.local_rollout_forward_batch_size)
    s.last_rewards = {}
    if not s.reward_functions:
        return rm_raw, rm_raw
    if rows is None or len(rows.prompts) != g.responses.size(0):
        raise ValueError("reward functions need each rollout row's prompt (rows)")
    with record_function("ppo/reward_functions"):
        by_name = rewards.function_scores(s.reward_functions, rows, g.texts(s.tokenizer), g.ended_on(s.turn_end_id))
    device = g.responses.device
    table = torch.tensor([by_name[f.name] for f in s.reward_functions], dtype=torch.float32, device=device)  # (F, B)
    s.last_rewards = {f"reward/{name}": torch.tensor(v).float().mean() for name, v in by_name.items()}
    rm_part = None
    if rm_raw is not None:
        rm_part = (rm_raw.float() - s.reward_mean) / max(s.reward_std, 1e-8)
        s.last_rewards["reward/model"] = rm_part.mean()
    combined = rewards.combine(rm_part, s.cfg.reward_model_weight, table, [f.weight for f in s.reward_functions])
    return (rm_raw.float() if rm_raw is not None else combined), combined


def estimate_advantages(s: Setup, logprobs, ref_lp, values, scores, seq_len, kl_coef: float) -> pm.Advantages:
    """Step 7: with a value model, the per-token KL penalty and the score as rewards, GAE, returns and whitened
    advantages; critic-free, the group transform of the scores and undiscounted returns (``pipeline.core.ppo_math``).
    """
    cfg = s.cfg
    kl_in_reward = cfg.kl_penalty == "reward"
    if s.critic:
        return pm.advantages(
            logprobs,
            ref_lp,
            values,
            scores,
            seq_len,
            kl_coef=kl_coef if kl_in_reward else 0.0,
            kl_estimator=cfg.kl_estimator_used,
            reward_position=cfg.reward_position,
            whiten_rewards=cfg.whiten_rewards,
            gamma=cfg.gamma,
            lam=cfg.lam,
        )
    return pm.group_token_advantages(
        logprobs,
        ref_lp,
        scores,
        seq_len,
        k=cfg.num_generations,
        estimator=cfg.estimator,
        scale=cfg.scale_rewards,
        kl_coef=kl_coef,
        kl_estimator=cfg.kl_estimator_used,
        kl_in_reward=kl_in_reward,
    )


def rollout_stats(s: Setup, g: Generation, adv: pm.Advantages, entropy, scored, t_gen: float, t_score: float) -> dict:
    """The rollout's metrics on this process (docs/ppo.md has the glossary); ``scored``: ``score_responses``."""
    raw_scores, ended, scores = scored
    action_mask, logprobs, non_score = adv.action_mask, adv.logprobs, adv.non_score
    stats = {
        "objective/kl": adv.kl.sum(1).mean(),
        "objective/entropy": pm.masked_sum(-logprobs, action_mask, 1).mean(),
        "policy/entropy_avg": pm.masked_mean(entropy, action_mask),
        "objective/non_score_reward": non_score.sum(1).mean(),
        "objective/rlhf_reward": non_score.sum(1).mean() + scores.mean(),
        "objective/scores": scores.mean(),
        "objective/raw_scores": raw_scores.mean(),
        "val/num_eos_tokens": ended.float().sum(),
        "ppo/response_length": (g.seq_len + 1).float().mean(),
        "ppo/no_stop_rate": (~ended).float().mean(),
        "ppo/eos_stop_rate": (g.stopped & ~ended).float().mean(),
        "time/generate": torch.tensor(t_gen),
        "time/score": torch.tensor(t_score),
        "tokens/generated": action_mask.float().sum(),
        **s.last_rewards,
    }
    if s.critic:
        stats["val/explained_variance"] = torch.tensor(pm.explained_variance(adv.values, adv.returns, adv.value_mask))
    else:  # how much of the batch carries a score signal: a group whose samples all score alike gets none
        group_std = pm.group_std(scores.float(), s.cfg.num_generations)
        stats["objective/score_std_in_group"] = group_std.mean()
        stats["objective/zero_std_groups"] = (group_std < pm.NO_SIGNAL_STD).float().mean()
    return stats


# ----------------------------------------------------------------------------------------------------------------
# The update
# ----------------------------------------------------------------------------------------------------------------


class StepCounter:
    """Counts the optimizer steps actually taken (not the no-op calls inside gradient accumulation)."""

    def __init__(self) -> None:
        self.steps = 0


def train_on_rollout(
    s: Setup,
    ro: Rollout,
    sizes: BatchSizes,
    generator: torch.Generator,
    counter: StepCounter,
    update: int,
    kl_coef: float,
) -> dict:
    """Step 8: ``num_ppo_epochs`` x ``num_mini_batches`` optimizer steps on one rollout batch (PPO update ``update``,
    counted from 1). With ``ppo.kl_penalty: loss`` the policy loss gains ``kl_coef`` times the per-token KL of the
    current policy to the reference (``ppo_math.kl_loss``: importance-weighted, its gradient that of KL(pi || ref)),
    averaged like the policy loss; ``kl_coef`` is the controller's value this update."""
    cfg = s.cfg
    where = f"update {update}"
    poison_if_asked(s.stage, update, s.unwrapped)
    grid: dict[str, list[torch.Tensor]] = defaultdict(list)  # each micro-batch's stats, each step's gradient norms
    kl_loss_coef = kl_coef if cfg.kl_penalty == "loss" else 0.0
    for epoch in range(cfg.num_ppo_epochs):
        order = torch.randperm(sizes.local_batch, generator=generator).to(ro.seq.device)
        for m in range(cfg.num_mini_batches):
            idx = order[m * sizes.local_mini_batch : (m + 1) * sizes.local_mini_batch]
            at = f"{where}, epoch {epoch + 1}, minibatch {m + 1}"
            train_minibatch(s, ro, idx, sizes, counter, kl_loss_coef, at, grid)
    # A finite loss and gradient can still step the weights to inf; the next rollout would then sample from NaN
    # logits. Every process checks the weights it holds (its partition under ZeRO-3) and all stop together.
    poison_if_asked(s.stage, update, s.unwrapped, after_step=True)
    if bad := nonfinite_ranks(s.model.parameters()):
        raise NonFiniteLossError(
            f"non-finite weights after the optimizer steps of {where} (held by process {', '.join(map(str, bad))})"
        )
    return update_stats(grid)


def train_minibatch(
    s: Setup,
    ro: Rollout,
    idx: torch.Tensor,
    sizes: BatchSizes,
    counter: StepCounter,
    kl_loss_coef: float,
    where: str,
    grid: dict[str, list[torch.Tensor]],
) -> None:
    """One optimizer step on the rollouts ``idx``: a forward and backward pass per micro-batch, the gradients
    accumulated, the step at the last. Each micro-batch's stats (and the step's gradient norms) go to ``grid``."""
    acc = s.accelerator
    # The loss of a minibatch is the mean over its valid tokens on every process: each micro-batch
    # contributes its token sum divided by the global count (x world: DDP averages gradients over
    # processes; x micro_per_mini: accelerate divides by the accumulation steps).
    n_pg = acc.reduce(ro.action_mask[idx].sum().float(), reduction="sum").clamp(min=1)
    n_vf = acc.reduce(ro.value_mask[idx].sum().float(), reduction="sum").clamp(min=1)
    scale, n = acc.num_processes * sizes.micro_per_mini, s.cfg.per_device_train_batch_size
    for k in range(sizes.micro_per_mini):
        mb = idx[k * n : (k + 1) * n]
        with acc.accumulate(s.model):
            loss, stats = ppo_loss(s, ro, mb, n_pg, n_vf, kl_loss_coef)
            loss = loss * scale
            check_loss(acc, loss, where, "PPO loss")
            acc.backward(loss)
            stats.update(optimizer_step(s, counter, where))
        for key, value in stats.items():
            grid[key].append(value)


def ppo_loss(
    s: Setup, ro: Rollout, mb: torch.Tensor, n_pg: torch.Tensor, n_vf: torch.Tensor, kl_loss_coef: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of micro-batch ``mb`` (rows of the rollout) and its stats: the clipped policy loss, the clipped value
    loss (with a value model) and the KL to the reference (``kl_loss_coef`` > 0), each a sum over the valid tokens
    divided by the minibatch's count of them on every process (``n_pg``, ``n_vf``)."""
    cfg = s.cfg
    am, vm = ro.action_mask[mb], ro.value_mask[mb]  # (b, L) each
    new_lp, vpred, _ = s.model(  # (b, L) log-probs under the current policy, (b, L) values or None
        ro.seq[mb],
        ro.mask[mb],
        ro.pos[mb],
        ro.responses[mb],
        cfg.temperature,
        valid=am,
        memory_mb=cfg.logits_memory_mb,
        head_precision=cfg.head_precision,
    )
    pg, pg_clipped, ratio = pm.clipped_policy_loss(new_lp, ro.logprobs[mb], ro.advantages[mb], am, cfg.cliprange)
    loss = pm.masked_sum(pg, am) / n_pg
    if vpred is not None:
        vf, vf_clipped = pm.clipped_value_loss(vpred.float(), ro.values[mb], ro.returns[mb], vm, cfg.cliprange_value)
        loss = loss + cfg.vf_coef * pm.masked_sum(vf, vm) / n_vf
    if kl_loss_coef:  # importance-weighted, so its gradient is that of KL(pi || ref) at every minibatch
        lp = new_lp.detach()
        old_lp = torch.where(am, ro.logprobs[mb], lp)  # masked positions: a zero log-ratio, nothing to leak
        kl_tok, kl_value = pm.kl_loss(new_lp, old_lp, torch.where(am, ro.ref_logprobs[mb], lp), cfg.kl_estimator_used)
        loss = loss + kl_loss_coef * pm.masked_sum(kl_tok, am) / n_pg
    with torch.no_grad():
        log_ratio = torch.where(am, new_lp - ro.logprobs[mb], torch.zeros_like(new_lp))
        stats = {
            "approxkl": pm.masked_mean(0.5 * log_ratio**2, am),
            "clipfrac": pm.masked_mean(pg_clipped.float(), am),
            "pg_loss": pm.masked_mean(pg, am),
            "ratio": pm.masked_mean(ratio, am),
        }
        if vpred is not None:
            stats.update(vf_loss=pm.masked_mean(vf, vm), vf_clipfrac=pm.masked_mean(vf_clipped.float(), vm))
        if kl_loss_coef:
            stats["kl_loss"] = pm.masked_mean(kl_value, am)
    return loss, stats


def optimizer_step(s: Setup, counter: StepCounter, where: str) -> dict[str, torch.Tensor]:
    """At the minibatch's last micro-batch: the policy's and the value model's gradients clipped apart (stopping on a
    non-finite norm before the step), the step, the gradients zeroed; accelerate makes the step and the zeroing
    no-ops inside gradient accumulation. Returns the norms before clipping of a step taken ({} otherwise, and under
    DeepSpeed, whose engine clipped and stepped in ``backward``)."""
    acc, norms = s.accelerator, {}
    if acc.sync_gradients:
        if acc.distributed_type == "DEEPSPEED":  # the engine clipped and stepped in backward()
            check_deepspeed_step(s.model, where)
        else:
            norms = clip_gradients(s, where)
        counter.steps += 1
    s.optimizer.step()
    s.optimizer.zero_grad()
    return norms


def clip_gradients(s: Setup, where: str) -> dict[str, torch.Tensor]:
    """The policy's and the value model's gradients clipped apart (``clip_each``); their norms before clipping."""
    norms, out = clip_each(s.accelerator, s.unwrapped, s.cfg.max_grad_norm), {}
    for name, norm in zip(("policy_grad_norm", "value_grad_norm"), norms):
        if not torch.isfinite(norm):  # the same on every process
            raise NonFiniteLossError(f"non-finite gradient norm ({float(norm)}) at {where} (the step was not taken)")
        out[name] = norm.float()
    return out


def update_stats(grid: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The update's metrics on this process: the means over its micro-batches (gradient norms: over its steps)."""
    mean = {k: torch.stack(v).mean() for k, v in grid.items() if v}
    norms = {f"{k.split('_')[0]}/grad_norm": mean[k] for k in ("policy_grad_norm", "value_grad_norm") if k in mean}
    out = {
        **norms,
        "policy/approxkl_avg": mean["approxkl"],
        "policy/clipfrac_avg": mean["clipfrac"],
        "loss/policy_avg": mean["pg_loss"],
        "val/ratio": mean["ratio"],
        "val/ratio_var": torch.stack(grid["ratio"]).var() if len(grid["ratio"]) > 1 else torch.tensor(0.0),
    }
    if "vf_loss" in mean:
        out.update({"loss/value_avg": mean["vf_loss"], "val/clipfrac_avg": mean["vf_clipfrac"]})
    if "kl_loss" in mean:
        out["loss/kl_avg"] = mean["kl_loss"]
    return out
