"""PPO against the reward model: our own loop on accelerate (TRL removed its PPOTrainer).

    make ppo RECIPE=recipes/tiny_ko.yaml [ACCELERATE_CONFIG=configs/accelerate/zero2.yaml NUM_PROCESSES=2]
    accelerate launch --config_file configs/accelerate/single.yaml -m pipeline.ppo --recipe recipes/tiny_ko.yaml

Models: the policy from ``runs/<run>/sft/final`` (full or LoRA); the reference is the frozen SFT model (for LoRA the
same base with the adapter disabled, no second copy); the value model starts from the reward model (or SFT) and
trains with the policy under one optimizer; the reward model is frozen. Dropout is off everywhere. With a critic-free
estimator (``ppo.estimator: rloo | grpo``) there is no value model: each prompt is sampled ``ppo.num_generations``
times and a sample's advantage is its score against its group's (step 7).

One update (numbered as in the code below; docs/ppo.md has the formulas and their sources):
  1. take the next rollout batch of prompts (left-padded);
  2. sample responses (temperature, top_k 0, top_p 1), stopping at <end_of_turn> or <eos>; tokens after the stop
     token become pad;
  3. log-probs of the sampled tokens under the policy, with the same forward used in training;
  4. log-probs under the reference;
  5. values;
  6. the reward model's score at each response's stop token (missing-stop penalty, normalisation, clipping);
  7. per-token KL penalty and the score -> rewards; GAE; returns; advantage whitening (critic-free: the group
     transform of the scores, then undiscounted returns; no whitening);
  8. ``num_ppo_epochs`` passes over the batch in ``num_mini_batches`` minibatches, exactly one optimizer step per
     minibatch, losses normalised by the valid-token count over all micro-batches and processes;
  9. metrics, KL controller, checkpoint, prompt panel, safety checks.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from data_prep.gemma_format import END_OF_TURN, stop_token_ids
from pipeline.core import peers, topology
from pipeline.core import ppo_math as pm
from pipeline.core.batching import BatchSizes, batch_sizes
from pipeline.core.checkpoint import (
    finished_or_announce,
    last_good_note,
    last_resumable,
    mark_intermediate,
    require_checkpoint,
    save_final,
    warn_if_changed,
)
from pipeline.core.cli import run_cli
from pipeline.core.config import ConfigError, PPOConfig, Recipe
from pipeline.core.consistency import check_inputs
from pipeline.core.devices import describe_processes, precision
from pipeline.core.distributed import (
    gather_stats,
    make_accelerator,
    parameter_dtypes,
    pooled_means,
    prepare_frozen,
)
from pipeline.core.errors import RunError
from pipeline.core.faults import NonFiniteLossError
from pipeline.core.heads import logit_positions, vocabulary_size
from pipeline.core.korean import korean_totals
from pipeline.core.loading import disable_dropout, load_causal_lm, load_sequence_classifier
from pipeline.core.locations import REPO_ROOT, portable
from pipeline.core.notices import write_notices
from pipeline.core.policy import PolicyAndValue
from pipeline.core.ppo_step import (
    Setup,
    StepCounter,
    policy_logprobs_and_values,
    raw_and_combined,
    ref_logprobs,
    rollout,
    sample,
    train_on_rollout,
)
from pipeline.core.progress import eta
from pipeline.core.provenance import Derivation, stage_derivation
from pipeline.core.reward_stats import RewardStats, check_gate
from pipeline.core.rewards import PromptRows, RewardFunction, default_name, load_all
from pipeline.core.rundir import (
    ADAPTER,
    VALUE,
    DataOutput,
    RunDir,
    StageDir,
    append_metrics,
    checkpoints,
    data_output,
    keep_metrics_until,
    lineage_metrics,
    lineage_recipe,
)
from pipeline.core.sampling import Generation, left_pad
from pipeline.core.starts import Start, policy_start
from pipeline.core.trainer_stage import control_token_indices, name_adapter_base

STAGE = "ppo"


class PPOStopError(RunError, RuntimeError):
    """The run was stopped by a safety check (KL past ppo.max_kl)."""


# ----------------------------------------------------------------------------------------------------------------
# Data order, progress, the answer measures, the panel
# ----------------------------------------------------------------------------------------------------------------


def answer_totals(g: Generation, tokenizer: Any, turn_end_id: int) -> dict[str, tuple[float, int]]:
    """The Korean answer measures of this process's responses (pipeline/core/korean.py) as (sum, count): each
    response's text up to its stop token (``Generation.texts``); stopped means it ended its turn; the length counts
    the stop token, as ``ppo/response_length`` does."""
    return korean_totals(zip(g.texts(tokenizer), g.ended_on(turn_end_id), [n + 1 for n in g.seq_len.tolist()]))


def batch_rows(n: int, update: int, sizes: BatchSizes, rank: int, seed: int, k: int = 1) -> list[int]:
    """The indices (among ``n`` prompts) of rollout batch ``update`` for process ``rank``: a fixed function of the
    update index (seeded reshuffle every pass over the data), so a resumed run takes exactly the batches the killed
    run would have. With ``k`` generations per prompt, each prompt fills ``k`` consecutive rows (its group, on one
    process)."""
    per_rank, per_batch = sizes.local_batch // k, sizes.batch // k
    out = []
    for j in range(rank * per_rank, (rank + 1) * per_rank):
        g = update * per_batch + j
        epoch, i = divmod(g, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        out.extend([perm[i]] * k)
    return out


def batch_prompts(
    prompts: list[list[int]], update: int, sizes: BatchSizes, rank: int, seed: int, k: int = 1
) -> list[list[int]]:
    """The prompts of rollout batch ``update`` for process ``rank`` (``batch_rows``)."""
    return [prompts[i] for i in batch_rows(len(prompts), update, sizes, rank, seed, k)]


class Progress:
    """Resumable counters, saved with accelerate's checkpoint."""

    def __init__(self) -> None:
        self.update = 0  # rollout batches finished
        self.episode = 0
        self.history: list[dict] = []

    def state_dict(self) -> dict:
        return {"update": self.update, "episode": self.episode, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.update, self.episode, self.history = state["update"], state["episode"], state["history"]


def panel_rows(
    s: Setup, tokenizer: Any, prompts: list[tuple[str, list[int]]], step: int, rows: PromptRows | None = None
) -> list[list[Any]]:
    """Greedy answers of the start model (reference) and the current policy to fixed prompts, with scores (the reward
    model's raw score, or the reward functions' sum without one) and KL."""
    if not prompts:
        return []
    queries = left_pad([p for _, p in prompts], s.pad_id, s.accelerator.device)
    current = sample(s, queries, greedy=True)
    if s.ref is None:
        with s.unwrapped.policy.disable_adapter():
            sft = sample(s, queries, greedy=True)
    else:
        sft = sample(s, queries, greedy=True, model=s.ref)
    rows_out = []
    for g in (sft, current):
        seq, mask, pos = g.inputs()
        lp, _, _ = policy_logprobs_and_values(s, seq, mask, pos, g.responses)
        ref = ref_logprobs(s, seq, mask, pos, g.responses)
        kl = pm.masked_sum(lp - ref, pm.valid_mask(g.seq_len, g.responses.size(1)), 1)
        rows_out.append((g.texts(tokenizer), raw_and_combined(s, g, rows)[0].tolist(), kl))
    (sft_t, sft_s, _), (cur_t, cur_s, cur_kl) = rows_out
    return [
        [step, p, a, float(b), c, float(d), float(e)]
        for (p, _), a, b, c, d, e in zip(prompts, sft_t, sft_s, cur_t, cur_s, cur_kl.tolist())
    ]


# ----------------------------------------------------------------------------------------------------------------
# The stage: inputs, setup, the loop, the save
# ----------------------------------------------------------------------------------------------------------------


def derivation(
    recipe: Recipe,
    start: Start,
    manifest: dict,
    method: str,
    step: int | None,
    metrics: dict,
    parent: str | None = None,
):
    """The derivation of a PPO checkpoint (``parent``: for the value model, the reward model it started from)."""
    inputs = {}
    if recipe.ppo.uses_reward_model:
        inputs["reward model"] = str(RunDir.of(recipe).stage("rm").final)  # its lineage beside the parent's
    for f in recipe.ppo.reward_functions:
        inputs[f"reward function {f.name or default_name(f.function)}"] = f"{f.function} (weight {f.weight:g})"
    return stage_derivation(
        recipe,
        STAGE,
        method,
        parent or start.location,
        [s.path for s in recipe.data.prompts.train],
        manifest,
        metrics,
        step,
        inputs=inputs,
        base_model=start.card_base(recipe),
    )


@dataclass
class Inputs:
    """What PPO starts from: the policy's start (the SFT checkpoint or ``ppo.init_from``) and the reward model
    (complete, with notices, past the gate; None under ``ppo.reward_model: none``), the reward functions, the data
    stage's prompts (ids, and the texts and columns reward functions read) and tokenizer, and the panel's prompts."""

    start: Start
    rm: Path | None
    rm_accuracy: float | None
    reward_stats: RewardStats | None
    reward_functions: list[RewardFunction]
    data: DataOutput
    tokenizer: Any
    prompts: list[list[int]]
    rows: PromptRows
    panel: list[tuple[str, list[int]]]
    panel_rows: PromptRows


def _warn(message: str) -> None:
    print(f"[ppo] warning {message}", file=sys.stderr, flush=True)


def read_inputs(recipe: Recipe) -> Inputs:
    import datasets
    from transformers import AutoTokenizer

    run_dir = RunDir.of(recipe)
    start = policy_start(recipe, STAGE)
    rm_dir = rm_accuracy = stats = None
    checked = {start.what: start.location}
    if recipe.ppo.uses_reward_model:
        rm_dir = require_checkpoint(run_dir.stage("rm").final, "the reward model (run `make rm` first)")
        rm_accuracy = check_gate(rm_dir, recipe.rm.min_accuracy, recipe.ppo.ignore_rm_gate, warn=_warn)
        stats = RewardStats.read(rm_dir)
        checked["the reward model"] = rm_dir
    functions = load_all(recipe.ppo.reward_functions, REPO_ROOT)
    data = data_output(run_dir)
    check_inputs(data.path, checked, foreign=(start.what,) if start.foreign else ())
    tokenizer = AutoTokenizer.from_pretrained(data.tokenizer)
    datasets.disable_progress_bars()
    train_path = data.split("prompts", "train")
    if train_path is None:
        raise ConfigError("the recipe has no PPO prompts (data.prompts.train)")
    train = datasets.Dataset.from_parquet(str(train_path))
    panel_path = data.split("prompts", "eval") or train_path
    panel_source = datasets.Dataset.from_parquet(str(panel_path))
    panel_source = panel_source.select(range(min(4, len(panel_source))))
    rows, panel_rows_ = (
        PromptRows.read(ds["messages"], ds["columns"] if "columns" in ds.column_names else None, str(path))
        for ds, path in ((train, train_path), (panel_source, panel_path))
    )
    panel = list(zip(panel_rows_.prompts, panel_source["prompt_ids"]))
    return Inputs(
        start,
        rm_dir,
        rm_accuracy,
        stats,
        functions,
        data,
        tokenizer,
        list(train["prompt_ids"]),
        rows,
        panel,
        panel_rows_,
    )


@dataclass
class PPORun:
    """One PPO run in progress: the models and optimizer, the schedules, the counters, where it writes."""

    recipe: Recipe
    inputs: Inputs
    s: Setup
    scheduler: Any
    kl_ctl: Any
    sizes: BatchSizes
    stage: StageDir
    tracker: Any
    local_seed: int
    progress: Progress = field(default_factory=Progress)
    counter: StepCounter = field(default_factory=StepCounter)
    started: float = 0.0  # when this process began training, and the update it began at (for the ETA)
    first_update: int = 0

    @property
    def accelerator(self) -> Any:
        return self.s.accelerator


def load_models(
    recipe: Recipe,
    policy_dir: Path | str,
    rm_dir: Path | None,
    value_dir: Path | str | None,
    prec: dict,
    control_ids: list[int] | None = None,
) -> tuple:
    """(policy, value, reward, reference), dropout off in all four, the reward model and the reference frozen. Under
    ``ppo.method: lora`` the policy is wrapped in LoRA and the reference is None (the same base with the adapter
    disabled, no second copy; with ``ppo.lora.train_control_tokens`` the ``control_ids`` rows train too, and the
    disabled adapter gives them back as they were); without ``value_dir`` the value is None, without ``rm_dir`` the
    reward model."""
    cfg = recipe.ppo
    load = {"dtype": prec["dtype"], "dropout_off": True}
    frozen = {**load, "dtype": torch.bfloat16} if cfg.frozen_precision == "bf16" else load
    policy = load_causal_lm(recipe.model, str(policy_dir), **load)
    # Critic-free estimators (rloo, grpo) build no value model at all: its weights, gradients and Adam moments are
    # the memory they save.
    value = load_sequence_classifier(recipe.model, str(value_dir), **load) if value_dir is not None else None
    reward = load_sequence_classifier(recipe.model, str(rm_dir), **frozen) if rm_dir is not None else None
    if cfg.gradient_checkpointing:
        for m in (policy, value):  # non-reentrant: also right for a LoRA policy whose inputs need no grad
            if m is not None:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref = None
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(
            policy,
            LoraConfig(
                task_type="CAUSAL_LM",
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=0.0,
                target_modules=list(cfg.lora.target_modules),
                **({"trainable_token_indices": control_ids} if cfg.lora.train_control_tokens and control_ids else {}),
            ),
        )
    else:
        ref = load_causal_lm(recipe.model, str(policy_dir), **frozen)
    for m in (policy, value, reward, ref):
        if m is not None:
            disable_dropout(m)
    for frozen in (reward, ref):
        if frozen is not None:
            frozen.requires_grad_(False)
            frozen.eval()
    return policy, value, reward, ref


def build_setup(
    recipe: Recipe,
    accelerator: Any,
    policy_dir: Path | str,
    rm_dir: Path | None,
    value_dir: Path | str | None,
    tokenizer: Any,
    total_updates: int,
    reward_stats: RewardStats | None = None,
    reward_functions: list[RewardFunction] | None = None,
):
    """Load, freeze, wrap and prepare the four models (without a value model: ``value_dir`` None; without a reward
    model: ``rm_dir`` None); returns (Setup, scheduler). ``reward_stats``: the value model's outputs are standardised
    with them (it starts from the reward model and scores are normalised)."""
    from transformers import get_scheduler
    from transformers.integrations import is_deepspeed_zero3_enabled

    cfg = recipe.ppo
    prec = precision(recipe.run.precision)
    policy, value, reward, ref = load_models(
        recipe, policy_dir, rm_dir, value_dir, prec, control_token_indices(tokenizer)
    )
    shift, scale = (reward_stats.mean, reward_stats.std) if reward_stats is not None else (0.0, 1.0)
    model = PolicyAndValue(policy, value, shift, max(scale, 1e-8))
    # Fused: one kernel per parameter, no temporaries the size of the largest one (Gemma's 262k-row embedding), and
    # the same arithmetic as the default loop.
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.learning_rate,
        eps=cfg.adam_eps,
        weight_decay=0.0,
        fused=True,
    )
    # The LR decays linearly to 0 over the run, stepped once per rollout batch; not handed to accelerate, which
    # would step it once per process.
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=max(total_updates, 1))
    model, optimizer = accelerator.prepare(model, optimizer)
    zero3 = is_deepspeed_zero3_enabled()
    reward = prepare_frozen(reward, accelerator, zero3) if reward is not None else None
    ref = prepare_frozen(ref, accelerator, zero3) if ref is not None else None
    setup = Setup(
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        ref=ref,
        reward=reward,
        cfg=cfg,
        pad_id=tokenizer.pad_token_id,
        stop_ids=stop_token_ids(tokenizer),
        stage=STAGE,
        zero3=zero3,
        bf16=prec["bf16"],
        reward_functions=list(reward_functions or []),
        tokenizer=tokenizer,
    )
    return setup, scheduler


def weight_dtypes(s: Setup) -> str:
    """``policy fp32, value fp32, reference fp32, reward model fp32``: each model's dtype read from its parameters
    (under ZeRO-3 from the local partitions), not from the recipe."""
    unwrapped = s.unwrapped
    parts = {
        "policy": parameter_dtypes(unwrapped.policy),
        "value": parameter_dtypes(unwrapped.value),
        "reference": parameter_dtypes(s.ref) or ("the policy's base, adapter off" if s.ref is None else None),
        "reward model": parameter_dtypes(s.reward) if s.reward is not None else None,
    }
    return ", ".join(f"{k} {v}" for k, v in parts.items() if v is not None)


def setup(recipe: Recipe, inputs: Inputs) -> PPORun:
    """Accelerator, seeds, tracker, the four models, optimizer, LR schedule, KL controller; registered for
    checkpointing."""
    from accelerate.utils import set_seed

    from pipeline.core.tracking import Tracker

    cfg = recipe.ppo
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sizes = batch_sizes(
        cfg.per_device_train_batch_size,
        cfg.gradient_accumulation_steps,
        world,
        cfg.num_mini_batches,
        cfg.total_episodes,
        cfg.num_ppo_epochs,
    )
    prec = precision(recipe.run.precision)
    topology.check(recipe, topology.from_environment(), "the recipe")  # also when launched by hand
    accelerator = make_accelerator(cfg.per_device_train_batch_size, sizes.micro_per_mini, cfg.max_grad_norm, prec)
    peers.watch()
    local_seed = recipe.run.seed + accelerator.process_index * 100003  # a different sampling stream per process
    set_seed(local_seed)
    summary = {"rm_accuracy": inputs.rm_accuracy} if inputs.rm_accuracy is not None else {}
    tracker = Tracker(recipe, STAGE, accelerator.is_main_process, summary)
    if accelerator.is_main_process:
        scoring = [] if inputs.rm_accuracy is None else [f"reward model accuracy {inputs.rm_accuracy:.3f}"]
        scoring += [f"reward function {f.name} ({f.path}, weight {f.weight:g})" for f in inputs.reward_functions]
        print(
            f"[ppo] {describe_processes(accelerator.state)}; {'bf16' if prec['bf16'] else 'fp32'}; "
            f"{sizes.num_updates} updates of {sizes.batch} rollouts, {sizes.optimizer_steps_per_update} optimizer "
            f"steps each; from {inputs.start.written}; " + "; ".join(scoring),
            flush=True,
        )
    if sizes.local_batch % cfg.num_generations:
        raise ConfigError(
            f"ppo.num_generations {cfg.num_generations} does not divide the {sizes.local_batch} rollouts per process"
        )
    critic = cfg.estimator == "gae"
    value_dir = (inputs.rm if cfg.value_from == "rm" else inputs.start.location) if critic else None
    value_stats = inputs.reward_stats if critic and cfg.value_from == "rm" and cfg.normalize_reward else None
    s, scheduler = build_setup(
        recipe,
        accelerator,
        inputs.start.location,
        inputs.rm,
        value_dir,
        inputs.tokenizer,
        sizes.num_updates,
        value_stats,
        inputs.reward_functions,
    )
    if accelerator.is_main_process:
        policy = s.unwrapped.policy
        print(
            f"[ppo] output head: {vocabulary_size(policy)} ids, {cfg.head_precision} (ppo.head_precision); logits of "
            f"up to {logit_positions(policy, cfg.logits_memory_mb, cfg.head_precision)} response positions at a time "
            f"(ppo.logits_memory_mb {cfg.logits_memory_mb}); rollout log-probs from the {'sampler' if s.sampler_logprobs else 'forward'}; "
            f"weights: {weight_dtypes(s)}"
            + ("; values standardised like the scores" if value_stats else "")
            + (
                ""
                if critic
                else f"; estimator {cfg.estimator}, {cfg.num_generations} samples per prompt, no value model"
            ),
            flush=True,
        )
    if inputs.reward_stats is not None:
        s.reward_mean, s.reward_std = inputs.reward_stats.mean, inputs.reward_stats.std
    kl_ctl = (
        pm.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        if cfg.kl_target
        else pm.FixedKLController(cfg.kl_coef)
    )
    ppo = PPORun(recipe, inputs, s, scheduler, kl_ctl, sizes, RunDir.of(recipe).stage(STAGE), tracker, local_seed)
    for obj in (scheduler, kl_ctl, ppo.progress):
        accelerator.register_for_checkpointing(obj)
    return ppo


def resume(ppo: PPORun) -> None:
    """Model, optimizer, scheduler, KL controller, progress and every RNG state from the newest complete checkpoint;
    the metrics lines the killed run wrote after it are dropped."""
    acc = ppo.accelerator
    ckpt = last_resumable(ppo.stage.checkpoints)
    if ckpt is not None:
        check_same_estimator(ckpt, ppo.recipe.ppo)
        acc.load_state(str(ckpt))
        if acc.is_main_process:
            print(f"[ppo] resuming from {ckpt} (update {ppo.progress.update})", flush=True)
            warn_if_changed(STAGE, ckpt, ppo.recipe, (STAGE, "model", "data"))
    if acc.is_main_process:
        keep_metrics_until(ppo.stage, ppo.progress.update)


def check_same_estimator(ckpt: Path, cfg: PPOConfig) -> None:
    """A checkpoint resumes only under the estimator and samples per prompt it was written with: a value model
    present in one and not the other cannot load, and another group size changes which prompts each update takes."""
    ran = lineage_recipe(ckpt, "ppo")
    then = (ran.get("estimator", "gae"), ran.get("num_generations", 1))
    if then != (cfg.estimator, cfg.num_generations):
        raise ConfigError(
            f"{ckpt} was written with ppo.estimator {then[0]} and ppo.num_generations {then[1]}, the recipe now says "
            f"{cfg.estimator} and {cfg.num_generations}: resume with the same settings, or delete {ckpt.parent} to "
            "start PPO again"
        )


def save_checkpoint(ppo: PPORun) -> None:
    """A resumable checkpoint of the current update (the two newest are kept)."""
    acc, update = ppo.accelerator, ppo.progress.update
    ckpt = ppo.stage.checkpoint(update)
    acc.save_state(str(ckpt))
    acc.wait_for_everyone()
    if acc.is_main_process:
        last = ppo.progress.history[-1] if ppo.progress.history else {}
        mark_intermediate(
            ckpt,
            derivation(
                ppo.recipe, ppo.inputs.start, ppo.inputs.data.manifest.raw, ppo.recipe.ppo.method, update, last
            ),
        )
        for old in checkpoints(ppo.stage.checkpoints)[:-2]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def one_update(ppo: PPORun) -> dict[str, float]:
    """Steps 1-8 for the next rollout batch, then the update's metrics (gathered over processes)."""
    s, acc, update = ppo.s, ppo.accelerator, ppo.progress.update
    t0 = time.perf_counter()
    # 1-7. Rollout.
    index = batch_rows(
        len(ppo.inputs.prompts),
        update,
        ppo.sizes,
        acc.process_index,
        ppo.recipe.run.seed,
        ppo.recipe.ppo.num_generations,
    )
    batch, rows = [ppo.inputs.prompts[i] for i in index], ppo.inputs.rows.take(index)
    s.model.eval()
    with s.autocast():  # bf16 compute for every rollout forward (the reference and reward models' included)
        ro = rollout(s, batch, ppo.kl_ctl.value, update + 1, rows)
    # 8. PPO epochs over minibatches.
    s.model.train()
    disable_dropout(s.unwrapped)
    t1 = time.perf_counter()
    gen = torch.Generator().manual_seed(ppo.local_seed * 7919 + update)
    try:
        train_stats = train_on_rollout(s, ro, ppo.sizes, gen, ppo.counter, update + 1, ppo.kl_ctl.value)
    except NonFiniteLossError as e:
        raise NonFiniteLossError(f"{e}; stopping: {last_good_note(ppo.stage.checkpoints)}") from None
    t_train = time.perf_counter() - t1
    lr = ppo.scheduler.get_last_lr()[0]  # the rate this update's steps used
    ppo.scheduler.step()
    metrics = gather_stats(acc, {**ro.stats, **train_stats}, sums=("val/num_eos_tokens",))
    metrics.update(pooled_means(acc, answer_totals(ro.generation, ppo.inputs.tokenizer, s.turn_end_id)))
    elapsed = time.perf_counter() - t0
    metrics.update(
        {
            "time/train": t_train,
            "time/update": elapsed,
            "lr": lr,
            "episode": ppo.progress.episode + ppo.sizes.batch,
            "objective/kl_coef": ppo.kl_ctl.value,
            "tokens_per_second": metrics.pop("tokens/generated") * acc.num_processes / max(elapsed, 1e-9),
        }
    )
    recent = [h["objective/kl"] for h in ppo.progress.history[-9:]] + [metrics["objective/kl"]]
    metrics["objective/kl_running_mean"] = sum(recent) / len(recent)  # one batch is noisy: a running mean
    return metrics


def record(ppo: PPORun, metrics: dict[str, float]) -> None:
    """Step 9: the KL controller, the counters, W&B, ``metrics.jsonl`` and the console line."""
    ppo.kl_ctl.update(metrics["objective/kl"], ppo.sizes.batch)
    p = ppo.progress
    p.episode = int(metrics["episode"])
    p.update += 1
    p.history.append({k: metrics[k] for k in ("objective/scores", "objective/kl", "objective/raw_scores")})
    ppo.tracker.log({k if k.startswith(f"{STAGE}/") else f"{STAGE}/{k}": v for k, v in metrics.items()}, step=p.update)
    if ppo.accelerator.is_main_process:  # also kept beside the run for reports (a resumed run rewrites its lines)
        append_metrics(ppo.stage, {"update": p.update, **metrics})
        print(
            f"[ppo] update {p.update}/{ppo.sizes.num_updates} score {metrics['objective/scores']:.3f} "
            f"kl {metrics['objective/kl']:.3f} len {metrics['ppo/response_length']:.1f} "
            f"no-stop {metrics['ppo/no_stop_rate']:.2f} pg {metrics['loss/policy_avg']:.4f} "
            + (f"vf {metrics['loss/value_avg']:.4f} " if "loss/value_avg" in metrics else "")
            + f"clip {metrics['policy/clipfrac_avg']:.3f} {metrics['time/update']:.1f}s "
            + eta(
                time.perf_counter() - ppo.started,
                p.update - ppo.first_update,
                ppo.sizes.num_updates - ppo.first_update,
            ),
            flush=True,
        )


def check_safety(ppo: PPORun, metrics: dict[str, float]) -> None:
    """Stop on a runaway KL (``ppo.max_kl``) or non-finite metrics, naming the last good checkpoint."""
    cfg, update = ppo.recipe.ppo, ppo.progress.update
    if cfg.max_kl is not None and metrics["objective/kl_running_mean"] > cfg.max_kl:
        raise PPOStopError(
            f"KL {metrics['objective/kl_running_mean']:.3f} (running mean) passed ppo.max_kl {cfg.max_kl} at update "
            f"{update}; stopping: {last_good_note(ppo.stage.checkpoints)}"
        )
    if not all(math.isfinite(v) for k, v in metrics.items() if not k.startswith("val/explained")):
        raise NonFiniteLossError(
            f"non-finite metrics at update {update}; stopping: {last_good_note(ppo.stage.checkpoints)}"
        )


def show_panel(ppo: PPORun) -> None:
    """The prompt panel: the SFT model's and the current policy's greedy answers, to W&B and the console."""
    ppo.s.model.eval()
    with ppo.s.autocast():
        rows = panel_rows(ppo.s, ppo.inputs.tokenizer, ppo.inputs.panel, ppo.progress.update, ppo.inputs.panel_rows)
    columns = ["update", "prompt", "sft_answer", "sft_score", "answer", "score", "kl"]
    ppo.tracker.table(f"{STAGE}/panel", columns, rows, step=ppo.progress.update)
    if ppo.accelerator.is_main_process:
        for r in rows:
            print(
                f"[ppo] panel: {r[1]!r}: sft {r[2]!r} ({r[3]:.2f}) -> now {r[4]!r} ({r[5]:.2f}, kl {r[6]:.2f})",
                flush=True,
            )


def train(ppo: PPORun) -> None:
    """The loop: one update per rollout batch until ``total_episodes`` are consumed; checks, panel, checkpoints."""
    cfg, total = ppo.recipe.ppo, ppo.sizes.num_updates
    while ppo.progress.update < total:
        metrics = one_update(ppo)
        record(ppo, metrics)
        check_safety(ppo, metrics)
        update = ppo.progress.update
        if cfg.panel_every and (update % cfg.panel_every == 0 or update == total):
            show_panel(ppo)
        if update % cfg.save_steps == 0 and update < total:
            save_checkpoint(ppo)


def _write_weights(ppo: PPORun, state_dict: dict, tmp: Path) -> None:
    """The policy (LoRA merged; the adapter in ``adapter/``) and the value model in ``value/`` (main process)."""
    if not ppo.accelerator.is_main_process:
        return
    unwrapped = ppo.s.unwrapped
    pol = {k[len("policy.") :]: v for k, v in state_dict.items() if k.startswith("policy.")}
    val = {k[len("value.") :]: v for k, v in state_dict.items() if k.startswith("value.")}
    if ppo.recipe.ppo.method == "lora":
        unwrapped.policy.save_pretrained(str(tmp / ADAPTER), state_dict=pol)
        name_adapter_base(tmp / ADAPTER, ppo.inputs.start.location, ppo.recipe.run_dir)
        unwrapped.policy.merge_and_unload().save_pretrained(str(tmp))
    else:
        unwrapped.policy.save_pretrained(str(tmp), state_dict=pol)
    if unwrapped.value is not None:
        unwrapped.value.save_pretrained(str(tmp / VALUE), state_dict=val)


def _write_value_notices(derived: Derivation, tmp: Path) -> None:
    write_notices(tmp / VALUE, derived)  # the value model is loadable on its own: it carries its own notices


def chain_summary(recipe, start: Start, rm_dir: Path | None, metrics: dict) -> str:
    """The PPO model card's account of the stages (SFT or the start model, the reward model or functions, PPO), and
    how to run the model with the right stop token."""
    sft_m = lineage_metrics(start.local) if start.ours and start.local is not None else {}
    rm_m = lineage_metrics(rm_dir) if rm_dir is not None else {}

    def f(v):
        return f"{v:.4g}" if isinstance(v, (int, float)) else "n/a"

    def paths(specs) -> str:
        return ", ".join(f"`{portable(s.path, recipe.run_dir)}`" for s in specs)

    data = recipe.data
    p = recipe.ppo
    ppo = "PPO" if p.estimator == "gae" else f"PPO ({p.estimator}, {p.num_generations} samples per prompt)"
    if start.role == "sft":
        first = (
            f"| SFT | {paths(data.sft.train)} | eval loss {f(sft_m.get('eval/loss'))}, token "
            f"accuracy {f(sft_m.get('eval/mean_token_accuracy'))} |"
        )
    else:
        first = f"| start model (`ppo.init_from`) | `{portable(start.written, recipe.run_dir)}` | as given |"
    scoring = []
    if rm_dir is not None:
        scoring.append(
            f"| reward model | {paths(data.preference.train)} | held-out pairwise accuracy "
            f"{f(rm_m.get('eval/accuracy'))}, margin {f(rm_m.get('eval/margin'))} |"
        )
    for fn in p.reward_functions:
        scoring.append(f"| reward function | `{fn.function}` | weight {fn.weight:g} |")
    return "\n".join(
        [
            "## How this model was made",
            "",
            "| stage | data | result |",
            "|---|---|---|",
            first,
            *scoring,
            f"| {ppo} | {paths(data.prompts.train)} | {metrics['updates']} updates; score "
            f"{f(metrics['score_first'])} -> {f(metrics['score_last'])}; KL to the SFT model "
            f"{f(metrics['kl_last_10'])} nats per response (last 10 updates) |",
            "",
            "`make report` adds the before-and-after evaluation on held-out prompts below.",
            "",
            "## Inference",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'tok = AutoTokenizer.from_pretrained("PATH")',
            'model = AutoModelForCausalLM.from_pretrained("PATH")',
            'ids = tok.apply_chat_template([{"role": "user", "content": "안녕하세요?"}], add_generation_prompt=True,',
            '                              return_tensors="pt", return_dict=True)',
            f'stop = [tok.convert_tokens_to_ids("{END_OF_TURN}"), tok.eos_token_id]  # a model turn ends with {END_OF_TURN}',
            "out = model.generate(**ids, max_new_tokens=256, eos_token_id=stop)",
            'print(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))',
            "```",
        ]
    )


def save(ppo: PPORun, seconds: float) -> Path:
    """The policy as a notice-carrying Gemma derivative (LoRA merged), the value model beside it."""
    cfg, inputs, hist = ppo.recipe.ppo, ppo.inputs, ppo.progress.history
    final_metrics = {
        "updates": ppo.progress.update,
        "episodes": ppo.progress.episode,
        "rm_accuracy": inputs.rm_accuracy,
        "score_first": hist[0]["objective/scores"] if hist else None,
        "score_last": hist[-1]["objective/scores"] if hist else None,
        "kl_last_10": sum(h["objective/kl"] for h in hist[-10:]) / max(len(hist[-10:]), 1),
        "optimizer_steps_this_session": ppo.counter.steps,
        "seconds_this_session": round(seconds, 1),
    }
    manifest = inputs.data.manifest.raw
    d = derivation(
        ppo.recipe, inputs.start, manifest, "lora-merged" if cfg.method == "lora" else "full", None, final_metrics
    )
    d.extra_sections.append(chain_summary(ppo.recipe, inputs.start, inputs.rm, final_metrics))
    state_dict = ppo.accelerator.get_state_dict(ppo.s.model)  # gathered from every ZeRO-3 shard
    value_notices = None
    if ppo.s.critic:
        value_parent = str(inputs.rm) if cfg.value_from == "rm" else None  # None: the policy's start
        value_notices = partial(
            _write_value_notices,
            derivation(ppo.recipe, inputs.start, manifest, "full", None, final_metrics, parent=value_parent),
        )
    return save_final(
        ppo.stage.final,
        partial(_write_weights, ppo, state_dict),
        inputs.tokenizer,
        d,
        main_only=value_notices,
    )


def run(recipe: Recipe) -> Path:
    if (done := finished_or_announce(recipe, STAGE)) is not None:
        return done
    inputs = read_inputs(recipe)
    ppo = setup(recipe, inputs)
    resume(ppo)
    t_start = time.perf_counter()
    ppo.started, ppo.first_update = t_start, ppo.progress.update
    train(ppo)
    seconds = time.perf_counter() - t_start
    final = save(ppo, seconds)
    ppo.tracker.log_lineage(final, {**ppo.inputs.start.lineage(), **({"rm": ppo.inputs.rm} if ppo.inputs.rm else {})})
    ppo.tracker.finish()
    if ppo.accelerator.is_main_process:
        print(f"[ppo] saved {final} ({ppo.progress.update} updates, {seconds:.0f}s)", flush=True)
    return final


def main(argv: list[str] | None = None) -> int:
    return run_cli(STAGE, "PPO against the reward model.", run, argv)


if __name__ == "__main__":
    sys.exit(main())
