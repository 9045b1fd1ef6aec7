"""Supervised fine-tuning: TRL's SFTTrainer on the data stage's Gemma-format dialogues.

    make sft RECIPE=recipes/tiny_ko.yaml [ACCELERATE_CONFIG=configs/accelerate/zero2.yaml NUM_PROCESSES=2]
    accelerate launch --config_file configs/accelerate/single.yaml -m pipeline.sft --recipe recipes/tiny_ko.yaml

Loss is on model turns only (the data stage's masks, each model turn's ``<end_of_turn>`` included). bf16 on a
GPU, fp32 on CPU. Full fine-tuning or LoRA (merged into a plain full checkpoint on export). Resumable checkpoints
every ``sft.save_steps``; running the same command again after an interruption continues from the last complete
one, and a finished stage is skipped. The finished model is ``runs/<run>/sft/final/``.
"""

from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from data_prep.gemma_format import END_OF_TURN, GemmaEncoder, stop_token_ids
from pipeline.core.checkpoint import finished_or_announce, stop_at_end_of_turn
from pipeline.core.cli import run_cli
from pipeline.core.config import ConfigError, Recipe
from pipeline.core.loading import load_causal_lm
from pipeline.core.sampling import generate, left_pad
from pipeline.core.trainer_stage import loss_metrics, open_run, read_inputs, with_lora

STAGE = "sft"
SHOWN = ("loss", "mean_token_accuracy", "learning_rate", "grad_norm", "tokens_per_second")  # on the console line
EVAL_KEPT = ("loss", "mean_token_accuracy", "entropy")  # the evaluation metrics in the final checkpoint's notices


def answer_panel(recipe: Recipe, tracker: Any, tokenizer: Any, panel: list, args, state, model) -> None:
    """Greedy answers to the recipe's fixed prompts (``sft.prompt_panel``), after every evaluation."""
    if not panel:
        return
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    rows = []
    for prompt, ids in panel:  # one prompt at a time: no padding
        g = generate(
            model,
            left_pad([ids], tokenizer.pad_token_id, model.device),
            pad_id=tokenizer.pad_token_id,
            stop_ids=stop_token_ids(tokenizer),
            max_new_tokens=recipe.sft.panel_max_new_tokens,
        )
        rows.append([state.global_step, prompt, g.texts(tokenizer)[0], g.ended_on(eot)[0]])
    tracker.table(f"{STAGE}/panel", ["step", "prompt", "answer", "stopped"], rows, step=state.global_step)
    if state.is_world_process_zero:
        for _, prompt, answer, stopped in rows:
            print(f"[sft] panel: {prompt!r} -> {answer!r}{'' if stopped else f' (no {END_OF_TURN})'}", flush=True)


def run(recipe: Recipe) -> Path:
    import datasets
    from trl import SFTConfig, SFTTrainer

    started = time.perf_counter()
    # 1. Outputs; skip a finished stage.
    if (done_final := finished_or_announce(recipe, STAGE)) is not None:
        return done_final

    # 2. Data and tokenizer from the data stage.
    data, tokenizer = read_inputs(recipe, parent=None)
    columns = ["input_ids", "assistant_masks"]
    train_path, eval_path = data.split(STAGE, "train"), data.split(STAGE, "eval")
    if train_path is None:
        raise ConfigError("the recipe has no SFT data (data.sft.train)")
    train_ds = datasets.Dataset.from_parquet(str(train_path)).select_columns(columns)
    eval_ds = datasets.Dataset.from_parquet(str(eval_path)).select_columns(columns) if eval_path else None

    # 3. Training arguments, processes, tracker, resume point (pipeline.core.trainer_stage).
    s = recipe.sft
    run = open_run(
        recipe,
        STAGE,
        data,
        data_section="sft",
        tokenizer=tokenizer,
        parent=None,  # the recipe's base model
        arguments=SFTConfig,
        evaluate=eval_ds is not None,
        started=started,
        packing=s.packing,
    )

    # 4. Model (and LoRA), from the base model or, for a finished run, its last checkpoint.
    full_done = run.done and s.method == "full"
    model = load_causal_lm(recipe.model, str(run.resume) if full_done else None, dtype=run.prec["dtype"])
    stop_at_end_of_turn(model.generation_config, tokenizer)  # every checkpoint it writes stops where turns end
    model, peft_config = with_lora(model, s.method, s.lora, "CAUSAL_LM", run.resume, run.done, tokenizer=tokenizer)
    enc = GemmaEncoder(tokenizer)
    panel = [
        (p, enc.encode([{"role": "user", "content": p}], add_generation_prompt=True).input_ids) for p in s.prompt_panel
    ]
    trainer = SFTTrainer(
        model=model,
        args=run.args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[run.callback(SHOWN, on_evaluate=partial(answer_panel, recipe, run.tracker, tokenizer, panel))],
    )

    # 5. Train (from the last complete checkpoint, if any); the held-out loss at the last step.
    run.train(trainer)
    metrics: dict[str, Any] = loss_metrics(trainer)
    if eval_ds is not None:
        last_eval = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
        if last_eval is None or last_eval.get("step") != trainer.state.global_step:
            last_eval = trainer.evaluate()
        metrics.update(
            {f"eval/{k[5:]}": v for k, v in last_eval.items() if k.startswith("eval_") and k[5:] in EVAL_KEPT}
        )

    # 6. Save: one notice-carrying, atomic checkpoint (LoRA merged into a full one; the adapter kept beside).
    return run.finish(trainer, metrics, load_base=partial(load_causal_lm, recipe.model, dtype=run.prec["dtype"]))


def main(argv: list[str] | None = None) -> int:
    return run_cli(STAGE, "Supervised fine-tuning on the data stage's dialogues.", run, argv)


if __name__ == "__main__":
    sys.exit(main())
