"""Typed recipe: one YAML per experiment drives every stage.

Precedence: dataclass defaults < recipe YAML < command-line ``key.sub=value`` overrides. Loading is strict: an
unknown key or a value of the wrong type is an error naming the key and the file. PyYAML reads ``1e-5`` as a
string, so numbers are coerced from the field's declared type.

The command line that reads a recipe (``--recipe FILE [key.sub=value ...]``) is ``pipeline.core.cli``; where a
recipe's paths point is ``pipeline.core.locations``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from data_prep.formats import FORMATS
from pipeline.core.embedded import EMBEDDED_MODELS
from pipeline.core.errors import ConfigError
from pipeline.core.locations import (
    EMBEDDED_PREFIX,
    REPO_ROOT,
    dataset_is_local,
    dataset_local_path,
    is_hub_id,
    looks_local,
    missing_dataset,
    resolve_path,
)
from pipeline.core.typed import build, field_type

Err = typing.Callable[[str, str], typing.NoReturn]
"""``err(key, why)``: refuse the recipe naming the key (``validate`` raises ConfigError with the file's name)."""


def in_range(err: Err, key: str, value: float | None, ok: bool, rule: str) -> None:
    """Refuse ``key`` unless its value is None or ``ok``; the message shows the value and the rule."""
    if value is not None and not ok:
        err(key, f"{value!r} {rule}")


def at_least_one(err: Err, key: str, value: int | None) -> None:
    in_range(err, key, value, value is None or value >= 1, "must be at least 1")


def check_location(err: Err, key: str, p: str, kind: str) -> None:
    """An embedded model's name, an existing local path, or a well-formed hub id (nothing is downloaded)."""
    if kind == "dataset":
        if dataset_is_local(p):
            if not resolve_path(p).exists():
                err(key, missing_dataset(p))
        elif not is_hub_id(p):
            err(key, f"{p!r} is neither an existing local path nor a valid hub dataset id (owner/name)")
        return
    if p.startswith(EMBEDDED_PREFIX):
        if p[len(EMBEDDED_PREFIX) :] not in EMBEDDED_MODELS:
            err(key, f"unknown embedded model {p!r} (known: {', '.join(EMBEDDED_MODELS)})")
        return
    if looks_local(p):
        if not resolve_path(p).exists():
            err(key, f"local {kind} {p!r} does not exist (resolved to {resolve_path(p)})")
    elif not is_hub_id(p):
        err(key, f"{p!r} is neither an existing local path nor a valid hub id (owner/name)")


# --------------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    name: str
    """Run name: everything the run writes lives under ``<output_dir>/<name>/``."""
    output_dir: str = "runs"
    """Parent folder of all runs (relative paths are taken from the repository root)."""
    seed: int = 42
    """Seed for data splits, shuffling and training."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Training precision of every stage. ``auto``: bf16 on a GPU that supports it, fp32 otherwise. ``bf16``: bf16
    compute (autocast) over fp32 master weights, also on a CPU. ``fp32``: fp32 throughout. Trained weights are
    always held in fp32 outside DeepSpeed (DeepSpeed keeps its own fp32 master copy)."""

    def check(self, err: Err) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", self.name):
            err("run.name", f"{self.name!r} must be a plain folder name (letters, digits, _ . -)")


@dataclass
class ModelConfig:
    name_or_path: str
    """Base model: a hub id (``google/gemma-2b``), a local directory in hub layout, or ``embedded:tiny-gemma-ko``."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the base model; recorded in every checkpoint's lineage."""
    tokenizer: str | None = None
    """Tokenizer location when it differs from ``name_or_path``."""
    trust_remote_code: bool = False
    """Allow code shipped with a hub model to run. Off unless the recipe opts in."""
    allow_pickle: bool = False
    """Allow pickle (``.bin``) weights. Off: only safetensors are loaded."""
    terms_of_use: str | None = None
    """Path to a local copy of the Gemma Terms of Use, copied into every checkpoint."""

    def check(self, err: Err) -> None:
        check_location(err, "model.name_or_path", self.name_or_path, "model directory")
        if self.tokenizer:
            check_location(err, "model.tokenizer", self.tokenizer, "tokenizer directory")
        if self.terms_of_use and not resolve_path(self.terms_of_use).is_file():
            err("model.terms_of_use", f"file {self.terms_of_use!r} does not exist")


@dataclass
class DatasetSpec:
    path: str
    """A local .jsonl/.json/.parquet/.csv file (or a folder of them) or a hub dataset id (``owner/name``)."""
    format: Literal[
        "auto",
        "messages",
        "sharegpt",
        "alpaca",
        "prompt_completion",
        "pairs",
        "pairs_messages",
        "hh_rlhf",
        "prompt",
        "prompt_messages",
    ] = "auto"
    """Row format; ``auto`` detects it from the columns (see docs/data.md)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Column mapping ``{canonical name: column in this dataset}``, e.g. ``{instruction: question}``. Two more keys
    name the fields inside each message of a turn list: ``role`` and ``content``, e.g.
    ``{messages: conversations, role: from, content: value}``."""
    roles: dict[str, str] = field(default_factory=dict)
    """Role names of this dataset's turns mapped to ``system``, ``user`` or ``assistant``, e.g.
    ``{bot: assistant, 사용자: user}`` (every format with turn lists)."""
    split: str = "train"
    """Hub dataset split."""
    name: str | None = None
    """Hub dataset configuration (subset) name."""
    revision: str | None = None
    """Hub dataset revision."""
    data_files: list[str] = field(default_factory=list)
    """Hub dataset: only these files of the repository (glob patterns allowed), e.g. ``[data/train-00000-*.parquet]``."""
    data_dir: str | None = None
    """Hub dataset: only the files under this folder of the repository."""
    streaming: bool = False
    """Read the dataset row by row and tokenize it in chunks, in memory that does not grow with its size (hub
    datasets through ``datasets``' streaming mode, local files line by line)."""
    max_rows: int | None = None
    """Take at most this many valid rows: a seeded random sample (``select: random``) or the first ones (``head``)."""
    select: Literal["random", "head"] = "random"
    """How ``max_rows`` (and a section total, ``data.<section>.max_rows``) choose rows: a sample seeded by
    ``run.seed`` (every row is read), or the first rows in file order (reading stops there)."""
    weight: float | None = None
    """Share of this dataset in its section's training rows when the section has a total (``data.<section>.max_rows``):
    rows are taken in the ratio of the weights."""


@dataclass
class StageData:
    train: list[DatasetSpec] = field(default_factory=list)
    """Training datasets, concatenated in order."""
    eval: list[DatasetSpec] = field(default_factory=list)
    """Held-out datasets. When empty, ``eval_fraction`` of ``train`` is held out instead."""
    eval_fraction: float = 0.0
    """Fraction of the training rows held out for evaluation when ``eval`` is empty (seeded split)."""
    max_rows: int | None = None
    """Total training rows of this section, taken from its ``train`` datasets in the ratio of their ``weight`` (in
    proportion to their sizes when no weight is given)."""


@dataclass
class DataConfig:
    sft: StageData = field(default_factory=StageData)
    """Supervised dialogues for SFT."""
    preference: StageData = field(default_factory=StageData)
    """Preference pairs for the reward model."""
    prompts: StageData = field(default_factory=StageData)
    """Prompts for PPO rollouts; ``eval`` holds the held-out prompts used for evaluation."""
    max_length: int = 1024
    """Longest tokenized SFT dialogue or preference prompt+response."""
    max_prompt_length: int = 512
    """Longest tokenized PPO prompt (including the generation prompt)."""
    overlong: Literal["drop", "truncate", "error"] = "drop"
    """Rows longer than the limits above: ``drop`` (counted in the manifest), ``truncate`` (SFT dialogues and
    preference responses are cut at the limit, the prompt kept whole; counted; PPO prompts are still dropped) or
    ``error``."""
    on_invalid: Literal["error", "skip"] = "error"
    """Malformed rows: stop with file, row and reason, or ``skip`` them into ``data/rejects.jsonl`` (counted)."""
    control_tokens: Literal["reject", "as_text"] = "reject"
    """Control-token text (``<end_of_turn>``...) inside content: reject the row, or tokenize it as plain text."""
    num_proc: int = 1
    """Worker processes that tokenize (used when there is more than one chunk of 5000 rows; set it to the cores)."""

    def check(self, err: Err) -> None:
        for stage in ("sft", "preference", "prompts"):
            sd: StageData = getattr(self, stage)
            if not 0.0 <= sd.eval_fraction < 1.0:
                err(f"data.{stage}.eval_fraction", f"{sd.eval_fraction} is not in [0, 1)")
            if sd.max_rows is not None and sd.max_rows <= 0:
                err(f"data.{stage}.max_rows", "must be positive")
            weighted = [s.weight is not None for s in sd.train]
            if any(weighted) and sd.max_rows is None:
                err(f"data.{stage}.max_rows", "a dataset has a weight: give the section's total rows to mix")
            if any(weighted) and not all(weighted):
                err(f"data.{stage}.train", "give every dataset a weight, or none (sizes then set the ratio)")
            for split in ("train", "eval"):
                for i, spec in enumerate(getattr(sd, split)):
                    key = f"data.{stage}.{split}.{i}"
                    check_location(err, f"{key}.path", spec.path, "dataset")
                    if spec.max_rows is not None and spec.max_rows <= 0:
                        err(f"{key}.max_rows", "must be positive")
                    if spec.weight is not None and (split == "eval" or not spec.weight > 0):
                        err(f"{key}.weight", "must be positive, and only on training datasets")
                    for k in ("role", "content"):
                        if k in spec.columns and not spec.columns[k]:
                            err(f"{key}.columns.{k}", "must name a field of the messages")
                    for name, role in spec.roles.items():
                        if role not in ("system", "user", "assistant"):
                            err(f"{key}.roles.{name}", f"{role!r} is not one of system, user, assistant")
                    if dataset_local_path(spec.path) is not None and (spec.data_files or spec.data_dir):
                        err(
                            f"{key}.data_files",
                            "data_files and data_dir choose files of a hub dataset; a local "
                            "path names its files itself",
                        )
                    allowed = FORMATS[stage]
                    if spec.format != "auto" and spec.format not in allowed:
                        err(
                            f"{key}.format",
                            f"{spec.format!r} is not a {stage} format (use one of {', '.join(allowed)})",
                        )
        if self.max_length < 8:
            err("data.max_length", "must be at least 8 tokens")
        if self.max_prompt_length < 4:
            err("data.max_prompt_length", "must be at least 4 tokens")
        if self.num_proc < 1:
            err("data.num_proc", "must be at least 1")


@dataclass
class LoraSettings:
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """LoRA dropout (SFT and RM; PPO refuses anything but 0: rollout and training log-probs must be one function)."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Gemma modules that get adapters (attention and MLP projections)."""
    train_control_tokens: bool = True
    """Also train the embedding rows of ``<start_of_turn>`` and ``<end_of_turn>`` (and, through the tied head, their
    output rows) with PEFT's ``trainable_token_indices``: a base model never saw these ids in use, and adapters alone
    barely learn to emit ``<end_of_turn>``. Two rows, not the whole 262k-row matrix (``modules_to_save`` would)."""

    def check(self, section: str, err: Err, with_dropout: bool) -> None:
        """Its numbers in range when the section trains with LoRA (``with_dropout``: a stage that allows dropout)."""
        at_least_one(err, f"{section}.r", self.r)
        in_range(err, f"{section}.alpha", self.alpha, self.alpha > 0, "must be positive")
        if with_dropout:
            in_range(err, f"{section}.dropout", self.dropout, 0 <= self.dropout < 1, "must be in [0, 1)")
        if not self.target_modules:
            err(f"{section}.target_modules", "is empty: LoRA would train nothing")


@dataclass
class TrainerSettings:
    """The settings every Trainer-driven stage (SFT, RM, DPO) passes to its transformers/TRL trainer, under the same
    keys in each recipe section (``sft.learning_rate``, ``rm.learning_rate``, ``dpo.learning_rate``...). Each stage
    section below adds its own fields and sets its own defaults."""

    method: Literal["full", "lora"] = "full"
    """Full fine-tuning or LoRA (the adapter is merged into a plain full checkpoint on export, and kept beside it)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA settings when ``method: lora``."""
    learning_rate: float = 2e-5
    """Peak learning rate."""
    num_train_epochs: float = 1.0
    """Passes over the stage's training data."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run num_train_epochs)."""
    per_device_train_batch_size: int = 4
    """Examples (dialogues or pairs) per process per micro-batch."""
    per_device_eval_batch_size: int = 8
    """Examples per process per evaluation batch."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    lr_scheduler_type: str = "cosine"
    """transformers scheduler name."""
    warmup_ratio: float = 0.03
    """Fraction of the training steps spent warming up the learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    logging_steps: int = 10
    """Optimizer steps between log lines."""
    eval_steps: int = 200
    """Optimizer steps between evaluations on the held-out data."""
    save_steps: int = 200
    """Optimizer steps between resumable checkpoints."""
    save_total_limit: int = 2
    """Resumable checkpoints kept (the oldest are deleted)."""

    def check(self, section: str, err: Err) -> None:
        """Every shared number in its range: a batch of 0, negative epochs or a zero save interval would otherwise
        be accepted here and fail (or train nothing) hours later, after the stages before it."""
        for name in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "eval_steps",
            "save_steps",
        ):
            at_least_one(err, f"{section}.{name}", getattr(self, name))
        in_range(
            err,
            f"{section}.max_steps",
            self.max_steps,
            self.max_steps == -1 or self.max_steps >= 1,
            "must be -1 (epochs) or >= 1",
        )
        in_range(
            err,
            f"{section}.num_train_epochs",
            self.num_train_epochs,
            self.max_steps >= 1 or self.num_train_epochs > 0,
            "must be positive (or set max_steps)",
        )
        in_range(err, f"{section}.warmup_ratio", self.warmup_ratio, 0 <= self.warmup_ratio < 1, "must be in [0, 1)")
        in_range(err, f"{section}.weight_decay", self.weight_decay, self.weight_decay >= 0, "must not be negative")
        in_range(
            err,
            f"{section}.max_grad_norm",
            self.max_grad_norm,
            self.max_grad_norm >= 0,
            "must not be negative (0: no clipping)",
        )
        if self.method == "lora":
            self.lora.check(f"{section}.lora", err, with_dropout=True)
        if self.learning_rate < 0:
            err(f"{section}.learning_rate", "must not be negative")
        if self.save_total_limit < 2:
            # The Trainer deletes older checkpoints before the stage marks the newest one complete: with a limit of
            # 1, a save that fails (disk full, a kill) would leave nothing to resume from.
            err(f"{section}.save_total_limit", "must be at least 2 so a failed save keeps the previous checkpoint")


@dataclass
class SFTConfig(TrainerSettings):
    """Supervised fine-tuning (``make sft``)."""

    packing: bool = False
    """Pack several dialogues per sequence (masks preserved)."""
    prompt_panel: list[str] = field(default_factory=list)
    """Fixed prompts answered at every evaluation (logged as a table)."""
    panel_max_new_tokens: int = 48
    """Longest prompt-panel answer (greedy)."""

    def check(self, section: str, err: Err) -> None:
        super().check(section, err)
        at_least_one(err, f"{section}.panel_max_new_tokens", self.panel_max_new_tokens)


@dataclass
class RMConfig(TrainerSettings):
    """The reward model (``make rm``): a sequence classifier (LoRA: the sequence-classification task type)."""

    learning_rate: float = 5e-6
    """Peak learning rate."""
    init_from: str | None = None
    """Checkpoint the reward model starts from; default: the run's SFT checkpoint."""
    use_margin: bool = False
    """Use the per-pair ``margin`` column in the Bradley-Terry loss."""
    center_rewards_coefficient: float | None = None
    """Coefficient of the reward-centering term (None: off)."""
    min_accuracy: float = 0.6
    """Quality gate: PPO refuses a reward model whose held-out accuracy is below this."""

    def check(self, section: str, err: Err) -> None:
        super().check(section, err)
        c = self.center_rewards_coefficient
        in_range(err, f"{section}.center_rewards_coefficient", c, c is None or c >= 0, "must not be negative")
        if not 0 <= self.min_accuracy <= 1:
            err(f"{section}.min_accuracy", "must be in [0, 1]")


@dataclass
class DPOConfig(TrainerSettings):
    """DPO (``make dpo``). Under LoRA the reference is the adapter-disabled SFT model, no second copy."""

    learning_rate: float = 1e-6
    """Peak learning rate."""
    init_from: str | None = None
    """Causal LM that DPO starts from (policy and reference): a hub id or a local folder in hub layout (an instruct
    model, a copy of an SFT checkpoint). Default: the run's SFT checkpoint; with it, ``make dpo`` runs no SFT."""
    warmup_ratio: float = 0.1
    """Fraction of the training steps spent warming up the learning rate."""
    beta: float = 0.1
    """Strength of the implicit KL to the reference (TRL ``beta``): higher stays closer to the SFT model."""
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust"] = "sigmoid"
    """TRL's DPO loss: ``sigmoid`` (the DPO paper), ``hinge`` (SLiC), ``ipo``, ``robust`` (with label smoothing)."""
    label_smoothing: float = 0.0
    """Assumed probability that a preference label is flipped; only the ``robust`` loss reads it (TRL's ``sigmoid``
    does not: conservative DPO is not in the TRL this pipeline runs)."""

    def check(self, section: str, err: Err) -> None:
        super().check(section, err)
        if self.beta <= 0:
            err(f"{section}.beta", "must be positive")
        if not 0.0 <= self.label_smoothing < 0.5:
            err(f"{section}.label_smoothing", f"{self.label_smoothing} is not in [0, 0.5)")
        if self.label_smoothing and self.loss_type != "robust":
            err(
                f"{section}.label_smoothing",
                f"only loss_type robust reads it; {self.loss_type} would ignore it silently",
            )
        if self.lora.dropout != 0:
            err(
                f"{section}.lora.dropout",
                "must be 0: DPO runs every dropout off, so policy and reference log-probs compare",
            )


@dataclass
class RewardFunctionSpec:
    """A Python reward function (``pipeline.core.rewards`` says what it receives and returns)."""

    function: str
    """Import path: ``package.module:function``, or ``path/to/file.py:function`` (relative to the repository)."""
    weight: float = 1.0
    """Its weight in the score's sum."""
    name: str | None = None
    """Its metric name (``reward/<name>``); default: the function's name."""


@dataclass
class PPOConfig:
    """Names follow TRL's PPOConfig where the concept is the same."""

    init_from: str | None = None
    """Causal LM the policy and the reference start from: a hub id or a local folder in hub layout (an instruct
    model, a copy of an SFT checkpoint). Default: the run's SFT checkpoint; with it, ``make ppo`` runs no SFT (and a
    reward model without ``rm.init_from`` starts from it too)."""
    reward_model: Literal["rm", "none"] = "rm"
    """``rm``: score with the run's reward model (``make rm``). ``none``: only ``reward_functions`` score; no reward
    model is needed, trained or loaded (a value model then starts from the policy's start)."""
    reward_model_weight: float = 1.0
    """Weight of the reward model's (standardised) score in the sum with ``reward_functions``."""
    reward_functions: list[RewardFunctionSpec] = field(default_factory=list)
    """Python functions whose weighted scores are added to the reward model's, or replace it (``reward_model:
    none``); each function's mean is logged as ``reward/<name>``."""

    method: Literal["full", "lora"] = "full"
    """Policy training: full or LoRA (the reference is then the adapter-disabled base)."""
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(train_control_tokens=False))
    """LoRA settings when ``method: lora``. ``train_control_tokens`` is off by default here: the start (SFT) has
    learnt the control tokens, and their rows' full-head gradient costs each step about a third more time."""
    ignore_rm_gate: bool = False
    """Start even when the reward model's held-out accuracy is below rm.min_accuracy (a warning instead)."""
    estimator: Literal["gae", "rloo", "grpo"] = "gae"
    """Advantage estimator. ``gae``: PPO with a value model trained beside the policy. ``rloo`` (REINFORCE leave-one-
    out) and ``grpo`` (group-normalised): critic-free, from ``num_generations`` samples per prompt; no value model is
    built, trained or saved (OpenRLHF's ``--advantage_estimator``; TRL's RLOOTrainer and GRPOTrainer)."""
    num_generations: int = 1
    """Samples per prompt in a rollout batch (at least 2 for rloo and grpo). ``total_episodes`` and the batch sizes
    count samples: a rollout batch of 32 with 4 generations is 8 prompts x 4."""
    scale_rewards: bool = True
    """grpo: divide each prompt's centred scores by their standard deviation (GRPO); false keeps the centring only
    (Dr. GRPO). TRL's name."""
    kl_penalty: Literal["reward", "loss"] = "reward"
    """Where the KL to the reference acts: ``reward``, a per-token penalty ``-kl_coef * kl`` in the rewards (PPO's
    and RLOO's way); ``loss``, ``kl_coef`` times the mean per-token KL of the current policy added to the policy
    loss (GRPO's way; OpenRLHF's ``--use_kl_loss``), importance-weighted so that its gradient is that of KL(pi || ref)
    at every minibatch (docs/ppo.md)."""
    value_init: Literal["rm", "sft"] = "rm"
    """Initialise the value model from the reward model (default) or from the SFT checkpoint (gae only). Without a
    reward model (``reward_model: none``) it starts from the policy's start."""
    learning_rate: float = 3e-6
    """Adam learning rate for policy and value."""
    adam_eps: float = 1e-5
    """Adam epsilon (1e-5 as in the N+ implementation details)."""
    total_episodes: int = 10000
    """Prompts consumed in total (rollouts = total_episodes / batch size)."""
    per_device_train_batch_size: int = 8
    """Rollout sequences per device per micro-batch."""
    gradient_accumulation_steps: int = 4
    """Micro-batches per device per rollout batch."""
    num_ppo_epochs: int = 4
    """Passes over each rollout batch."""
    num_mini_batches: int = 1
    """Optimizer steps per PPO epoch."""
    response_length: int = 53
    """Maximum generated tokens per response."""
    temperature: float = 0.7
    """Sampling temperature (top_k 0, top_p 1)."""
    kl_coef: float = 0.05
    """KL penalty coefficient beta (initial value when adaptive)."""
    kl_estimator: Literal["auto", "k1", "k2", "k3"] = "auto"
    """Per-token KL(pi || ref) estimator. ``auto``: k1 in the reward, k3 as a loss. As a loss only k2 and k3 (both
    importance-weighted, with the same gradient; k3's value is the unbiased one)."""
    kl_target: float | None = None
    """Adaptive KL controller target (None: fixed coefficient)."""
    kl_horizon: int = 10000
    """Adaptive KL controller horizon."""
    cliprange: float = 0.2
    """Policy ratio clip range."""
    cliprange_value: float = 0.2
    """Value clip range."""
    vf_coef: float = 0.1
    """Value loss coefficient."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_rewards: bool = False
    """Whiten per-token rewards before GAE."""
    reward_position: Literal["eos", "after_eos"] = "eos"
    """Where the score lands: on the stop token (default) or one slot after it (TRL's placement)."""
    local_rollout_forward_batch_size: int = 64
    """Rows per no-grad forward or generate call during rollouts (bounds rollout memory)."""
    rollout_logprobs: Literal["auto", "sampler", "forward"] = "auto"
    """The rollout's (old) log-probs: the sampler's own, computed while sampling (no extra policy forward), or a
    second forward of the policy over the sampled responses, the same function as the training forward. ``auto``:
    the sampler's in fp32 (they equal the forward's within 4e-5), the forward's under bf16 (the cached bf16 sampler
    differs by 0.02 per token on average and the first ratio would not be 1). docs/ppo.md has the measurements."""
    frozen_precision: Literal["fp32", "bf16"] = "fp32"
    """Weights of the frozen models (the reference of a full-parameter policy, and the reward model): bf16 halves
    their memory and, on hardware with bf16 matrix units, their time; their outputs change within the tolerance
    docs/ppo.md states."""
    head_precision: Literal["fp32", "auto"] = "fp32"
    """The language-model head (the policy's, the reference's and the sampler's) under bf16 autocast: ``fp32``
    computes it in fp32 from the bf16 backbone's hidden states; ``auto`` as the context computes. On the real Gemma 3
    270M a bf16 head moves log-probs by 0.025 per token on average (0.10 at most) and the fp32 head cost no
    measurable time on a CPU with bf16 matrix units; on a GPU it trades the head's bf16 speed for that accuracy.
    Without autocast both are fp32. The value and reward models' one-output heads are always fp32."""
    logits_memory_mb: int = 256
    """Memory the output head's (positions x vocabulary) tensors of one micro-batch may hold at their peak, forward
    and backward (``pipeline.core.heads.LOGIT_BYTES`` per logit). Within it the response tokens' logits are kept for
    the backward pass; past it they are computed in pieces of that size and recomputed in the backward pass."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of responses that never produce the stop token."""
    normalize_reward: bool = False
    """Normalise scores with the reward model's stored mean and std."""
    reward_clip: float | None = None
    """Clip scores to [-reward_clip, reward_clip] (None: no clipping)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm, applied to the policy and to the value model each on its own (outside DeepSpeed)."""
    gradient_checkpointing: bool = False
    """Recompute the policy's and the value model's activations in the backward pass (memory for compute; a 2B
    policy with long responses needs it on a GPU)."""
    max_kl: float | None = None
    """Stop the run when the mean KL per response exceeds this (None: no limit)."""
    save_steps: int = 20
    """Rollout batches between resumable checkpoints."""
    panel_every: int = 10
    """Rollout batches between prompt-panel tables."""

    @property
    def uses_reward_model(self) -> bool:
        return self.reward_model == "rm"

    @property
    def value_from(self) -> str:
        """Where a value model starts: ``rm``, or ``start`` (the policy's start: SFT or ``init_from``)."""
        return "rm" if self.value_init == "rm" and self.uses_reward_model else "start"

    @property
    def kl_estimator_used(self) -> str:
        """The KL estimator the run uses (``auto`` resolved by ``kl_penalty``)."""
        if self.kl_estimator != "auto":
            return self.kl_estimator
        return "k3" if self.kl_penalty == "loss" else "k1"

    def check(self, err: Err) -> None:
        for name in (
            "total_episodes",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "num_ppo_epochs",
            "num_mini_batches",
            "response_length",
            "local_rollout_forward_batch_size",
            "kl_horizon",
            "save_steps",
        ):
            at_least_one(err, f"ppo.{name}", getattr(self, name))
        in_range(err, "ppo.panel_every", self.panel_every, self.panel_every >= 0, "must not be negative (0: no panel)")
        if self.learning_rate < 0:
            err("ppo.learning_rate", "must not be negative")
        if self.logits_memory_mb < 1:
            err("ppo.logits_memory_mb", "must be at least 1")
        if self.num_generations < 1:
            err("ppo.num_generations", "must be at least 1")
        for name in ("kl_coef", "vf_coef"):
            in_range(err, f"ppo.{name}", getattr(self, name), getattr(self, name) >= 0, "must not be negative")
        for name in ("cliprange", "cliprange_value", "adam_eps", "max_grad_norm"):
            in_range(err, f"ppo.{name}", getattr(self, name), getattr(self, name) > 0, "must be positive")
        for name in ("kl_target", "max_kl", "reward_clip"):
            value = getattr(self, name)
            in_range(err, f"ppo.{name}", value, value is None or value > 0, "must be positive (or null: off)")
        if self.temperature <= 0:
            err("ppo.temperature", "must be positive (sampling is required for PPO)")
        if self.lora.dropout != 0:
            err(
                "ppo.lora.dropout",
                "must be 0: PPO runs every dropout off, so rollout and training log-probs are one function",
            )
        if self.method == "lora":
            self.lora.check("ppo.lora", err, with_dropout=False)
        if not 0 <= self.lam <= 1 or not 0 <= self.gamma <= 1:
            err("ppo.gamma/ppo.lam", "must be in [0, 1]")
        self.check_estimator(err)
        self.check_rewards(err)

    def check_rewards(self, err: Err) -> None:
        """The score's sources: a reward model, functions, or both (each function imported now, nothing run)."""
        from pipeline.core.rewards import default_name, load_function

        names = []
        for i, spec in enumerate(self.reward_functions):
            key = f"ppo.reward_functions.{i}"
            try:
                load_function(spec.function, REPO_ROOT)
            except ValueError as e:
                err(f"{key}.function", str(e))
            if not math.isfinite(spec.weight) or spec.weight == 0:
                err(f"{key}.weight", f"{spec.weight!r} must be a finite, non-zero number")
            name = spec.name or default_name(spec.function)
            if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
                err(f"{key}.name", f"{name!r} is not a metric name (letters, digits, _ . -)")
            if name in names:
                err(f"{key}.name", f"{name!r} names two reward functions: give each its own name")
            names.append(name)
        if self.reward_model == "none":
            if not self.reward_functions:
                err("ppo.reward_model", "none leaves nothing to score with: add ppo.reward_functions")
            for key, value, default in (
                ("normalize_reward", self.normalize_reward, False),
                ("ignore_rm_gate", self.ignore_rm_gate, False),
                ("reward_model_weight", self.reward_model_weight, 1.0),
            ):
                if value != default:
                    err(f"ppo.{key}", "is a setting of the reward model's score; ppo.reward_model is none: remove it")
        else:
            if not math.isfinite(self.reward_model_weight) or self.reward_model_weight == 0:
                err("ppo.reward_model_weight", f"{self.reward_model_weight!r} must be a finite, non-zero number")
            if self.reward_functions and not self.normalize_reward:
                # A reward model's raw scores sit anywhere (the real demo's near -45): summed unstandardised with a
                # 0/1 rule, the rule would be noise. Standardised with its held-out mean and std they are comparable.
                err(
                    "ppo.normalize_reward",
                    "must be true when reward_functions are added to the reward model's score (its raw scale is "
                    "arbitrary; standardised, it is comparable with the functions')",
                )

    def check_estimator(self, err: Err) -> None:
        """The estimator's own rules, and the group layout the critic-free estimators need."""
        if self.estimator != "gae" and self.num_generations < 2:
            # One sample per prompt makes every group advantage 0: training would be a silent no-op (OpenRLHF #1250).
            err(
                "ppo.num_generations",
                f"must be at least 2 for estimator {self.estimator} (each sample's baseline is its group)",
            )
        if self.kl_penalty == "loss" and self.kl_estimator == "k1":
            # The gradient of mean(log pi - log pi_ref) over tokens sampled from pi is 0 in expectation: no pull.
            err(
                "ppo.kl_estimator",
                "k1 as a loss has zero expected gradient (it never pulls to the reference): use k3 or k2",
            )
        if self.estimator != "gae":
            # The group estimators' returns are undiscounted sums from the stop token, never whitened (OpenRLHF
            # forces the same), and there is no value model: settings of the GAE path would be silently ignored.
            for key, value, default in (
                ("gamma", self.gamma, 1.0),
                ("whiten_rewards", self.whiten_rewards, False),
                ("reward_position", self.reward_position, "eos"),
            ):
                if value != default:
                    err(f"ppo.{key}", f"{value!r} is not used by estimator {self.estimator} (only {default!r} is)")
            for key, default in (("lam", 0.95), ("vf_coef", 0.1), ("cliprange_value", 0.2), ("value_init", "rm")):
                if getattr(self, key) != default:
                    err(
                        f"ppo.{key}",
                        f"is a setting of estimator gae's value model and GAE; {self.estimator} has neither: remove it",
                    )
            if self.estimator == "rloo" and not self.scale_rewards:
                err("ppo.scale_rewards", "only estimator grpo reads it (rloo never divides by the group's std)")
        local = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if local % self.num_generations:
            # A prompt's samples stay on one process: its group baseline needs all of them.
            err(
                "ppo.num_generations",
                f"{self.num_generations} does not divide the rollouts per process "
                f"(per_device_train_batch_size x gradient_accumulation_steps = {local})",
            )


@dataclass
class TrackingConfig:
    project: str = "gemma-rlhf"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user)."""
    run_name: str | None = None
    """W&B run name; default: the recipe's run name and the stage."""
    tags: list[str] = field(default_factory=list)
    """W&B tags."""
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """``auto``: online when an API key is configured, otherwise offline."""
    system_metrics: bool = True
    """Log W&B's system charts (CPU, GPU, memory) for every stage."""
    console_logs: bool = True
    """Send each stage's console output to W&B's Logs tab."""
    log_artifacts: bool = True
    """Log the data folder and every final checkpoint as W&B artifacts by reference (lineage data -> SFT -> RM ->
    PPO); no file is uploaded unless ``upload_weights`` is set."""
    upload_weights: bool = False
    """Upload the final checkpoints' files into their W&B artifacts instead of referencing them."""


@dataclass
class ReportConfig:
    ground_truth: Literal["none", "polite_korean", "polite_on_topic"] = "none"
    """Rule that checks answers to held-out prompts, independently of the reward model (data_prep/tiny_ko/rules.py):
    ``polite_korean`` (the style of the answer), ``polite_on_topic`` (polite Korean and naming the question's
    subject; both parts are reported too)."""
    samples_per_prompt: int = 8
    """Sampled answers per held-out prompt for the ground-truth rate (temperature ppo.temperature)."""
    examples: int = 5
    """Held-out prompts shown with their answers before and after PPO."""
    compare: dict[str, str] = field(default_factory=dict)
    """Other checkpoints sampled and judged beside this run's models, by column name (``{rm_ppo:
    runs/other/ppo/final}``): the same prompts, settings and seed. One that does not exist is left out, and said."""

    def check(self, err: Err) -> None:
        at_least_one(err, "report.samples_per_prompt", self.samples_per_prompt)
        for label in self.compare:
            if not re.fullmatch(r"[a-z][a-z0-9_]*", label) or label in ("sft", "ppo", "dpo", "rm"):
                err(
                    f"report.compare.{label}",
                    "a column name is lowercase letters, digits and _, and not sft, ppo, dpo or rm (this run's)",
                )
        in_range(err, "report.examples", self.examples, self.examples >= 0, "must not be negative")


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=list)
    """Benchmarks of ``make eval`` (lm-evaluation-harness): a task or group name of the harness (``kobest_boolq``,
    ``haerae``, ``kmmlu_direct_korean_history``; their datasets come from the Hub) or a task file of the project in
    the harness's format (``data_prep/ko_bench/ko_bench_mc.yaml``, over local files)."""
    stages: list[Literal["base", "sft", "ppo", "dpo"]] = field(default_factory=lambda: ["base", "sft", "ppo", "dpo"])
    """Models evaluated by default: the base, and each of these stages whose final checkpoint exists."""
    num_fewshot: int | None = None
    """Examples shown before each question (None: each task's own default, usually 0)."""
    batch_size: int = 8
    """Requests per forward pass."""
    limit: int | None = None
    """Only the first N items of each task (a quick look; the results record it)."""
    chat_template: Literal["generative", "always", "never"] = "generative"
    """Which tasks are prompted with the Gemma chat template: the generative ones (a chat model is asked as it was
    trained; multiple choice is scored on the plain prompt, as for any model), all, or none."""

    def check(self, err: Err) -> None:
        for i, task in enumerate(self.tasks):
            if task.endswith(".yaml"):
                if not resolve_path(task).is_file():
                    err(f"eval.tasks.{i}", f"task file {task!r} does not exist")
            elif task.endswith(".yml") or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", task):
                err(f"eval.tasks.{i}", f"{task!r} is neither a task name of lm-evaluation-harness nor a .yaml file")
        at_least_one(err, "eval.batch_size", self.batch_size)
        at_least_one(err, "eval.limit", self.limit)
        if self.num_fewshot is not None:
            in_range(err, "eval.num_fewshot", self.num_fewshot, self.num_fewshot >= 0, "must not be negative")


@dataclass
class PublishConfig:
    language: list[str] = field(default_factory=list)
    """Languages of the model (ISO 639-1 codes, e.g. ``[ko]``): the model card's ``language`` front matter."""
    repo_id: str | None = None
    """Hub repository ``make publish`` uploads to when ``REPO_ID`` is not given."""
    private: bool = False
    """Create the Hub repository as private."""

    def check(self, err: Err) -> None:
        for i, code in enumerate(self.language):
            if not re.fullmatch(r"[a-z]{2,3}", code):
                err(
                    f"publish.language.{i}",
                    f"{code!r} is not an ISO 639 language code (two or three lowercase letters)",
                )
        if self.repo_id is not None and not is_hub_id(self.repo_id):
            err("publish.repo_id", f"{self.repo_id!r} is not a hub repository id (owner/name)")


@dataclass
class LaunchConfig:
    accelerate_config: str = "configs/accelerate/single.yaml"
    """accelerate config file used by ``make sft/rm/ppo`` (overridable with ACCELERATE_CONFIG=...)."""
    num_processes: int | None = None
    """Processes to launch in total, over every machine (None: the accelerate config's own count)."""
    wait_minutes: float = 60.0
    """How long a process waits for a shared output that another process or machine is writing (the data stage's
    folder, the report) before it stops with a line naming what it waited for."""

    def check(self, err: Err) -> None:
        n = self.num_processes
        in_range(err, "launch.num_processes", n, (n or 1) >= 1, "must be at least 1")
        in_range(err, "launch.wait_minutes", self.wait_minutes, self.wait_minutes > 0, "must be positive")
        if not resolve_path(self.accelerate_config).is_file():
            err("launch.accelerate_config", f"file {self.accelerate_config!r} does not exist")


@dataclass
class Recipe:
    run: RunConfig
    """Run name, output folder and seed."""
    model: ModelConfig
    """Base model and loading policy."""
    data: DataConfig = field(default_factory=DataConfig)
    """Datasets for every stage and the formatting policy."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Supervised fine-tuning."""
    rm: RMConfig = field(default_factory=RMConfig)
    """Reward model."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """PPO."""
    dpo: DPOConfig = field(default_factory=DPOConfig)
    """DPO (``make dpo``): the SFT model trained directly on the preference pairs."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Weights & Biases."""
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    """Accelerate launch settings."""
    report: ReportConfig = field(default_factory=ReportConfig)
    """The run report written after PPO."""
    publish: PublishConfig = field(default_factory=PublishConfig)
    """The model card's language and the Hub repository of ``make publish``."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Benchmarks (``make eval``): lm-evaluation-harness tasks run on the base and every final model."""

    @property
    def run_dir(self) -> Path:
        out = Path(self.run.output_dir)
        return (out if out.is_absolute() else REPO_ROOT / out) / self.run.name

    @property
    def start_model(self) -> str | None:
        """The model a preference stage starts from instead of the run's SFT checkpoint (``ppo.init_from`` or
        ``dpo.init_from``; ``validate`` allows one distinct value unless ``model.tokenizer`` is set)."""
        return self.ppo.init_from or self.dpo.init_from

    def tokenizer_model(self) -> ModelConfig:
        """Where the data stage's tokenizer comes from: ``model.tokenizer`` when set, else the start model when a
        stage starts from one (its ids are the ones it was trained on), else the base model."""
        if self.model.tokenizer or not self.start_model:
            return self.model
        return dataclasses.replace(self.model, name_or_path=self.start_model, revision=None, tokenizer=None)


# --------------------------------------------------------------------------------------------------------------
# Reading a recipe: strict (typed building in pipeline.core.typed), then command-line overrides
# --------------------------------------------------------------------------------------------------------------


def apply_override(raw: dict, override: str) -> None:
    """Apply one ``key.sub=value`` override to the raw recipe mapping (value parsed as YAML)."""
    source = f"command-line override '{override}'"
    if "=" not in override:
        raise ConfigError(f"{source}: expected key.sub=value")
    dotted, text = override.split("=", 1)
    path = [p for p in dotted.strip().split(".")]
    if not all(path):
        raise ConfigError(f"{source}: empty key")
    field_type(Recipe, path, source)
    value = yaml.safe_load(text) if text.strip() else ""
    node: Any = raw
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            idx = int(part)
            if idx >= len(node):
                raise ConfigError(f"{source}: index {idx} out of range for '{'.'.join(path[: i + 1])}'")
            node = node[idx]
        else:
            if not isinstance(node.get(part, {}), (dict, list)):
                node[part] = {}
            node = node.setdefault(part, {})
    last = path[-1]
    if isinstance(node, list):
        idx = int(last)
        if idx >= len(node):
            raise ConfigError(f"{source}: index {idx} out of range")
        node[idx] = value
    else:
        node[last] = value


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe strictly, apply overrides, return the typed Recipe."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections (run, model, data, ...)")
    for ov in overrides:
        apply_override(raw, ov)
    source = str(path) if not overrides else f"{path} (with overrides {' '.join(overrides)})"
    return build(Recipe, raw, "", source)


def to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False, allow_unicode=True)


def recipe_hash(recipe: Recipe) -> str:
    """sha256 of the resolved recipe (canonical JSON), recorded in every manifest and model card."""
    blob = json.dumps(to_dict(recipe), sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Validation beyond types: paths exist, hub ids are well formed, numbers are in range. Nothing is downloaded.
# --------------------------------------------------------------------------------------------------------------


def _under(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def validate(recipe: Recipe, source: str = "recipe") -> None:
    """Check what can be checked before anything runs: each section its own fields. Raises ConfigError naming the
    key. (The rules that depend on the launch, world size and DeepSpeed, are ``pipeline.core.topology.check``.)"""

    def err(key: str, why: str) -> typing.NoReturn:
        raise ConfigError(f"{source}: key '{key}': {why}")

    recipe.run.check(err)
    recipe.publish.check(err)
    recipe.model.check(err)
    if recipe.rm.init_from:
        check_location(err, "rm.init_from", recipe.rm.init_from, "checkpoint")
    for key in ("ppo.init_from", "dpo.init_from"):
        start = getattr(recipe, key.split(".")[0]).init_from
        if start and not (looks_local(start) and _under(resolve_path(start), recipe.run_dir.parent)):
            check_location(err, key, start, "model folder")
        # A folder under the runs' root is another run's output, made by then (`make demo-rlvr` trains it first):
        # the stage checks it when it starts.
    starts = {x for x in (recipe.ppo.init_from, recipe.dpo.init_from) if x}
    if len(starts) > 1 and not recipe.model.tokenizer:
        err(
            "dpo.init_from",
            f"{recipe.dpo.init_from!r} differs from ppo.init_from {recipe.ppo.init_from!r}: the data stage tokenizes "
            "with one tokenizer (the start model's); set model.tokenizer to say which, or run them as two recipes",
        )
    recipe.data.check(err)
    for section in ("sft", "rm", "dpo"):
        getattr(recipe, section).check(section, err)
    recipe.ppo.check(err)
    recipe.report.check(err)
    recipe.eval.check(err)
    recipe.launch.check(err)
