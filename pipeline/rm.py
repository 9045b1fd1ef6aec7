"""Reward model: a Bradley-Terry scorer trained from the SFT checkpoint with TRL's RewardTrainer.

    make rm RECIPE=recipes/tiny_ko.yaml [ACCELERATE_CONFIG=configs/accelerate/zero2.yaml NUM_PROCESSES=2]
    accelerate launch --config_file configs/accelerate/single.yaml -m pipeline.rm --recipe recipes/tiny_ko.yaml

The model is ``AutoModelForSequenceClassification(num_labels=1)`` initialised from ``runs/<run>/sft/final`` (or
``rm.init_from``). Each pair is ``prompt + response`` where the response ends with ``<end_of_turn>``, the token PPO
rollouts stop on; batches are right-padded with a pad distinct from eos, so the classifier reads the score at that
final ``<end_of_turn>`` (never at the newline that follows it in rendered text). Loss: Bradley-Terry, optionally
with the per-pair ``margin`` column and a reward-centering term. After training the held-out pairs are scored:
accuracy, margin, reward statistics and the Spearman correlation of reward with length go to W&B, the model
card, ``lineage.json`` and ``reward_stats.json`` (whose mean and std PPO uses to normalise scores). PPO refuses a
reward model below ``rm.min_accuracy`` (``check_gate``).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.atomic import IncompleteError, require_complete
from pipeline.config import ConfigError, Recipe, run_cli
from pipeline.consistency import ConsistencyError
from pipeline.loading import LoadError, describe_processes, load_sequence_classifier, precision
from pipeline.notices import stage_derivation
from pipeline.stage_callback import NonFiniteLossError, stage_callback

STAGE = "rm"
STATS_FILE = "reward_stats.json"


class RewardModelGateError(RuntimeError):
    """The reward model is not good enough to optimise against."""


def init_checkpoint(recipe: Recipe) -> Path:
    from pipeline.checkpoint import require_checkpoint

    if recipe.rm.init_from:
        from pipeline.config import resolve_path

        return require_checkpoint(resolve_path(recipe.rm.init_from), "the reward model's rm.init_from checkpoint")
    return require_checkpoint(recipe.run_dir / "sft" / "final", "the SFT checkpoint (run `make sft` first)")


def derivation(recipe: Recipe, parent: Path, manifest: dict, metrics: dict, step: int | None, method: str):
    return stage_derivation(
        recipe,
        STAGE,
        method,
        parent,
        [s.path for s in recipe.data.preference.train],
        manifest,
        metrics,
        step,
        pipeline_tag="text-classification",
    )


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


def check_gate(rm_dir: str | Path, min_accuracy: float, override: bool) -> float:
    """The reward model's held-out accuracy; raises RewardModelGateError below ``min_accuracy`` unless overridden."""
    stats_path = Path(rm_dir) / STATS_FILE
    if not stats_path.is_file():
        raise RewardModelGateError(f"{rm_dir} has no {STATS_FILE}: it was not written by the reward-model stage")
    acc = json.loads(stats_path.read_text(encoding="utf-8"))["accuracy"]
    if acc < min_accuracy:
        msg = (
            f"the reward model at {rm_dir} has held-out pairwise accuracy {acc:.3f}, below rm.min_accuracy "
            f"{min_accuracy}: PPO against it would optimise noise. Improve the reward model (data, epochs), lower "
            "rm.min_accuracy, or set ppo.ignore_rm_gate=true to start anyway"
        )
        if not override:
            raise RewardModelGateError(msg)
        print(f"[ppo] warning (ppo.ignore_rm_gate): {msg}", file=sys.stderr, flush=True)
    return acc


def run(recipe: Recipe) -> Path:
    import datasets
    from accelerate import PartialState
    from transformers import AutoTokenizer, PrinterCallback, TrainerState
    from trl import RewardConfig, RewardTrainer

    from pipeline.checkpoint import (
        finished_or_announce,
        last_resumable,
        mark_intermediate,
        save_final,
        training_done,
        warn_if_changed,
    )
    from pipeline.consistency import check_inputs
    from pipeline.reward_stats import pair_metrics
    from pipeline.tracking import Tracker

    t_start = time.perf_counter()
    # 1. Outputs; skip a finished stage.
    if (done_final := finished_or_announce(recipe, STAGE)) is not None:
        return done_final
    stage_dir = recipe.run_dir / STAGE
    final = stage_dir / "final"

    # 2. Inputs: the SFT checkpoint, the data stage's pairs and tokenizer.
    parent = init_checkpoint(recipe)
    data_dir = require_complete(recipe.run_dir / "data", "the data stage output (run `make data` first)")
    manifest = json.loads((data_dir / "manifest.json").read_text(encoding="utf-8"))
    check_inputs(data_dir, {"the SFT checkpoint": parent})
    tokenizer = AutoTokenizer.from_pretrained(data_dir / "tokenizer")
    datasets.disable_progress_bars()
    r = recipe.rm
    train_path, eval_path = data_dir / "preference" / "train.parquet", data_dir / "preference" / "eval.parquet"
    if not train_path.is_file():
        raise ConfigError("the recipe has no preference data (data.preference.train)")
    if not eval_path.is_file():
        raise ConfigError("the reward model needs held-out pairs: set data.preference.eval or eval_fraction")
    train_ds, _, _ = pairs_dataset(train_path, r.use_margin)
    eval_ds, eval_chosen_len, eval_rejected_len = pairs_dataset(eval_path, r.use_margin)

    # 3. Training arguments (before the model: ZeRO-3 then loads shards; use_cpu gives gloo on a CPU machine).
    prec = precision()
    args = RewardConfig(
        output_dir=str(stage_dir / "checkpoints"),
        max_length=recipe.data.max_length,
        center_rewards_coefficient=r.center_rewards_coefficient,
        disable_dropout=True,
        per_device_train_batch_size=r.per_device_train_batch_size,
        per_device_eval_batch_size=r.per_device_eval_batch_size,
        gradient_accumulation_steps=r.gradient_accumulation_steps,
        learning_rate=r.learning_rate,
        num_train_epochs=r.num_train_epochs,
        max_steps=r.max_steps,
        lr_scheduler_type=r.lr_scheduler_type,
        warmup_steps=r.warmup_ratio,  # a float below 1 is a fraction of the training steps
        weight_decay=r.weight_decay,
        max_grad_norm=r.max_grad_norm,
        gradient_checkpointing=r.gradient_checkpointing,
        logging_steps=r.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,
        eval_strategy="steps",
        eval_steps=r.eval_steps,
        save_strategy="steps",
        save_steps=r.save_steps,
        save_total_limit=r.save_total_limit,
        seed=recipe.run.seed,
        bf16=prec["bf16"],
        use_cpu=prec["use_cpu"],
        report_to="none",
        disable_tqdm=not sys.stderr.isatty(),
    )
    _ = args.device  # sets up the process group now (gloo on CPU)
    state = PartialState()
    tracker = Tracker(recipe, STAGE, state.is_main_process)
    if state.is_main_process:
        print(f"[rm] {describe_processes(state)}; {'bf16' if prec['bf16'] else 'fp32'}; from {parent}", flush=True)

    # 4. Model: a one-output sequence classifier from the SFT checkpoint, fresh reward head.
    resume = last_resumable(stage_dir / "checkpoints")
    done = training_done(resume)  # killed after the last step: the weights come from that checkpoint
    from_ckpt = done and r.method == "full"
    model = load_sequence_classifier(recipe.model, str(resume if from_ckpt else parent), dtype=prec["dtype"])
    if model.config.pad_token_id is None or model.config.pad_token_id == tokenizer.eos_token_id:
        raise ConfigError("the reward model needs a pad token distinct from eos to find the scoring position")
    if not done:
        init_score_head(model, recipe.run.seed)
    peft_config = None
    if done and r.method == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(resume), is_trainable=True)
    elif r.method == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(
            task_type="SEQ_CLS",
            r=r.lora.r,
            lora_alpha=r.lora.alpha,
            lora_dropout=r.lora.dropout,
            target_modules=list(r.lora.target_modules),
            modules_to_save=["score"],
        )
    method = "lora" if r.method == "lora" else "full"

    def mark(ckpt: Path, step: int, metrics: dict) -> None:
        mark_intermediate(ckpt, derivation(recipe, parent, manifest, metrics, step, method))

    shown = ("loss", "accuracy", "margin", "learning_rate", "grad_norm")
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[stage_callback(STAGE, tracker, mark, shown)],
    )
    trainer.remove_callback(PrinterCallback)

    # 5. Resume from the last complete checkpoint, train.
    if resume is not None and state.is_main_process:
        print(f"[rm] resuming from {resume}" + (" (training was finished)" if done else ""), flush=True)
        warn_if_changed("rm", resume, recipe, ("rm", "model", "data"))
    if done:
        trainer.state = TrainerState.load_from_json(str(resume / "trainer_state.json"))
    else:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)

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
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if losses:
        metrics["train/loss_first"], metrics["train/loss_last"] = losses[0], losses[-1]
    metrics["steps"] = trainer.state.global_step
    metrics["seconds_this_session"] = round(time.perf_counter() - t_start, 1)
    tracker.log({f"{STAGE}/final/{k}": v for k, v in metrics.items()}, step=trainer.state.global_step)
    if state.is_main_process:
        print("[rm] held-out: " + ", ".join(f"{k} {v:.4g}" for k, v in stats.items()), flush=True)
        if abs(stats["length_spearman"]) > 0.5:
            print(
                f"[rm] warning: reward correlates with response length (Spearman {stats['length_spearman']:.2f}): "
                "PPO may learn to game length",
                file=sys.stderr,
                flush=True,
            )

    # 7. Save: one notice-carrying, atomic checkpoint with the normalisation statistics beside the weights.
    d = derivation(recipe, parent, manifest, metrics, None, "lora-merged" if r.method == "lora" else "full")
    reward_stats = {
        "mean": stats["reward_mean"],
        "std": stats["reward_std"],
        "accuracy": stats["accuracy"],
        "pairs": n,
        "scored_at": "<end_of_turn>",
    }

    def write_weights(tmp: Path) -> None:
        trainer.save_model(str(tmp / "adapter" if r.method == "lora" else tmp))

    def finish_files(tmp: Path) -> None:
        if r.method == "lora":
            from peft import PeftModel

            base = load_sequence_classifier(recipe.model, str(parent), dtype=prec["dtype"])
            PeftModel.from_pretrained(base, str(tmp / "adapter")).merge_and_unload().save_pretrained(str(tmp))
            for extra in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
                (tmp / "adapter" / extra).unlink(missing_ok=True)
        for junk in tmp.rglob("training_args.bin"):
            junk.unlink()
        (tmp / STATS_FILE).write_text(json.dumps(reward_stats, indent=2) + "\n", encoding="utf-8")
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["reward_normalization"] = {"mean": reward_stats["mean"], "std": reward_stats["std"]}
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    save_final(final, write_weights, tokenizer, d, main_only=finish_files)
    tracker.finish()
    if state.is_main_process:
        (stage_dir / "checkpoints" / "README.md").unlink(missing_ok=True)
        print(f"[rm] saved {final} (held-out accuracy {stats['accuracy']:.3f})", flush=True)
    return final


def main(argv: list[str] | None = None) -> int:
    return run_cli(
        STAGE,
        "Train the reward model on the data stage's preference pairs.",
        run,
        argv,
        input_errors=(IncompleteError, LoadError, ConsistencyError),
        run_errors=(NonFiniteLossError,),
    )


if __name__ == "__main__":
    sys.exit(main())
