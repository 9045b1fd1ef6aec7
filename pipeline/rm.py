"""Reward model: a Bradley-Terry scorer trained from the SFT checkpoint with TRL's RewardTrainer.

    make rm RECIPE=recipes/tiny_ko.yaml [ACCELERATE_CONFIG=configs/accelerate/zero2.yaml NUM_PROCESSES=2]
    accelerate launch --config_file configs/accelerate/single.yaml -m pipeline.rm --recipe recipes/tiny_ko.yaml

The model is ``AutoModelForSequenceClassification(num_labels=1)`` initialised from ``runs/<run>/sft/final`` (or
``rm.init_from``, or else ``ppo.init_from``: the model PPO starts from). Each pair is ``prompt + response`` where the response ends with ``<end_of_turn>``, the token PPO
rollouts stop on; batches are right-padded with a pad distinct from eos, so the classifier reads the score at that
final ``<end_of_turn>`` (never at the newline that follows it in rendered text). Loss: Bradley-Terry, optionally
with the per-pair ``margin`` column and a reward-centering term. After training the held-out pairs are scored:
accuracy, margin, reward statistics and the Spearman correlation of reward with length go to W&B, the model
card, ``lineage.json`` and ``reward_stats.json`` (whose mean and std PPO uses to normalise scores). PPO refuses a
reward model below ``rm.min_accuracy`` (``pipeline.core.reward_stats.check_gate``).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from data_prep.gemma_format import END_OF_TURN
from pipeline.core.checkpoint import finished_or_announce
from pipeline.core.cli import run_cli
from pipeline.core.config import ConfigError, Recipe
from pipeline.core.loading import load_sequence_classifier
from pipeline.core.reward_stats import RewardStats, pair_metrics
from pipeline.core.rundir import MODEL_CONFIG
from pipeline.core.starts import rm_start
from pipeline.core.trainer_stage import loss_metrics, open_run, read_inputs, with_lora

STAGE = "rm"
SHOWN = ("loss", "accuracy", "margin", "learning_rate", "grad_norm")  # on the console line


def pairs_dataset(path: Path, use_margin: bool):
    """Preference parquet -> RewardTrainer's pre-tokenized columns (full prompt+response ids per side)."""
    import datasets

    ds = datasets.Dataset.from_parquet(str(path))
    margins = list(ds["margin"]) if use_margin else None
    if use_margin and any(m is None for m in margins):
        raise ConfigError(f"rm.use_margin is set but {path} has pairs without a margin column value")
    cols = {
        "chosen_ids": [p + c for p, c in zip(ds["prompt_ids"], ds["chosen_ids"])],
        "rejected_ids": [p + r for p, r in zip(ds["prompt_ids"], ds["rejected_ids"])],
    }
    if use_margin:
        cols["margin"] = [float(m) for m in margins]
    return datasets.Dataset.from_dict(cols), [len(c) for c in ds["chosen_ids"]], [len(r) for r in ds["rejected_ids"]]


def init_score_head(model: Any, seed: int) -> None:
    """Reward head ~ N(0, 1/sqrt(d_model + 1)), as in the reference RLHF implementations (N+ detail 11), drawn from
    the recipe's seed so the same recipe gives the same reward model."""
    import torch
    from transformers.integrations import is_deepspeed_zero3_enabled

    head = model.score.weight
    std = 1.0 / math.sqrt(model.config.hidden_size + 1)
    gathered = contextlib.nullcontext()
    if is_deepspeed_zero3_enabled():
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters([head], modifier_rank=0)
    with gathered, torch.no_grad():
        gen = torch.Generator(device=head.device).manual_seed(seed)
        head.copy_(torch.randn(head.shape, generator=gen, device=head.device, dtype=torch.float32) * std)


def score_sequences(model: Any, sequences: list[list[int]], pad_id: int, batch_size: int, accelerator: Any) -> list:
    """Reward of every sequence (read by the classifier at its last non-pad token), spread over the processes.

    Every process runs the same number of forward passes (padding the split), as ZeRO-3 requires.
    """
    import torch

    indexed = list(enumerate(sequences))
    results = []
    with accelerator.split_between_processes(indexed, apply_padding=True) as mine:
        for i in range(0, len(mine), batch_size):
            chunk = mine[i : i + batch_size]
            width = max(len(s) for _, s in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            for row, (_, s) in enumerate(chunk):
                ids[row, : len(s)] = torch.tensor(s)
            ids = ids.to(accelerator.device)
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=(ids != pad_id).long()).logits[:, 0].float().tolist()
            results.extend((idx, r) for (idx, _), r in zip(chunk, out))
    from accelerate.utils import gather_object

    merged = dict(gather_object(results))
    return [merged[i] for i in range(len(sequences))]


def write_reward_stats(stats: RewardStats, tmp: Path) -> None:
    """The statistics beside the weights, and the normalisation in ``config.json`` for anyone loading the model."""
    stats.write(tmp)
    cfg_path = tmp / MODEL_CONFIG
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["reward_normalization"] = {"mean": stats.mean, "std": stats.std}
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def run(recipe: Recipe) -> Path:
    from trl import RewardConfig, RewardTrainer

    started = time.perf_counter()
    # 1. Outputs; skip a finished stage.
    if (done_final := finished_or_announce(recipe, STAGE)) is not None:
        return done_final

    # 2. Inputs: the start (rm.init_from, ppo.init_from or the SFT checkpoint), the data stage's pairs and tokenizer.
    start = rm_start(recipe)
    parent = start.location
    data, tokenizer = read_inputs(recipe, parent, start.what, start.foreign)
    r = recipe.rm
    train_path, eval_path = data.split("preference", "train"), data.split("preference", "eval")
    if train_path is None:
        raise ConfigError("the recipe has no preference data (data.preference.train)")
    if eval_path is None:
        raise ConfigError("the reward model needs held-out pairs: set data.preference.eval or eval_fraction")
    train_ds, _, _ = pairs_dataset(train_path, r.use_margin)
    eval_ds, eval_chosen_len, eval_rejected_len = pairs_dataset(eval_path, r.use_margin)

    # 3. Training arguments, processes, tracker, resume point (pipeline.core.trainer_stage).
    run = open_run(
        recipe,
        STAGE,
        data,
        data_section="preference",
        tokenizer=tokenizer,
        parent=parent,
        base_model=start.card_base(recipe),
        arguments=RewardConfig,
        evaluate=True,
        started=started,
        pipeline_tag="text-classification",
        center_rewards_coefficient=r.center_rewards_coefficient,
        disable_dropout=True,
    )

    # 4. Model: a one-output sequence classifier from the SFT checkpoint, fresh reward head.
    from_ckpt = run.done and r.method == "full"
    model = load_sequence_classifier(recipe.model, str(run.resume if from_ckpt else parent), dtype=run.prec["dtype"])
    if model.config.pad_token_id is None or model.config.pad_token_id == tokenizer.eos_token_id:
        raise ConfigError("the reward model needs a pad token distinct from eos to find the scoring position")
    if not run.done:
        init_score_head(model, recipe.run.seed)
    model, peft_config = with_lora(
        model, r.method, r.lora, "SEQ_CLS", run.resume, run.done, tokenizer=tokenizer, modules_to_save=["score"]
    )
    trainer = RewardTrainer(
        model=model,
        args=run.args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[run.callback(SHOWN)],
    )

    # 5. Train (from the last complete checkpoint, if any).
    run.train(trainer)

    # 6. Judge the reward model on the held-out pairs, scored at the final <end_of_turn> of each response.
    scorer = trainer.accelerator.unwrap_model(trainer.model_wrapped) if trainer.is_deepspeed_enabled else trainer.model
    scorer.eval()
    rewards = score_sequences(
        scorer,
        list(eval_ds["chosen_ids"]) + list(eval_ds["rejected_ids"]),
        tokenizer.pad_token_id,
        r.per_device_eval_batch_size,
        trainer.accelerator,
    )
    n = len(eval_ds)
    stats = pair_metrics(rewards[:n], rewards[n:], eval_chosen_len, eval_rejected_len)
    metrics: dict[str, Any] = {f"eval/{k}": v for k, v in stats.items()}
    metrics.update(loss_metrics(trainer))
    if run.main:
        print("[rm] held-out: " + ", ".join(f"{k} {v:.4g}" for k, v in stats.items()), flush=True)
        if abs(stats["length_spearman"]) > 0.5:
            print(
                f"[rm] warning: reward correlates with response length (Spearman {stats['length_spearman']:.2f}): "
                "PPO may learn to game length",
                file=sys.stderr,
                flush=True,
            )

    # 7. Save: one notice-carrying, atomic checkpoint with the normalisation statistics beside the weights.
    reward_stats = RewardStats(
        mean=stats["reward_mean"], std=stats["reward_std"], accuracy=stats["accuracy"], pairs=n, scored_at=END_OF_TURN
    )
    return run.finish(
        trainer,
        metrics,
        load_base=partial(load_sequence_classifier, recipe.model, str(parent), dtype=run.prec["dtype"]),
        extra=partial(write_reward_stats, reward_stats),
        lineage={("sft" if start.role == "sft" else "rm-init"): p for p in start.lineage().values()},
        summary=f"held-out accuracy {stats['accuracy']:.3f}",
    )


def main(argv: list[str] | None = None) -> int:
    return run_cli(STAGE, "Train the reward model on the data stage's preference pairs.", run, argv)


if __name__ == "__main__":
    sys.exit(main())
