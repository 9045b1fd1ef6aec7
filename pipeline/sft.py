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
from pipeline.core import peers
from pipeline.core.checkpoint import finished_or_announce, stop_at_end_of_turn
from pipeline.core.cli import run_cli
from pipeline.core.config import ConfigError, Recipe
from pipeline.core.faults import NonFiniteLossError
from pipeline.core.loading import LoadError, describe_processes, load_causal_lm, precision
from pipeline.core.notices import Derivation, stage_derivation
from pipeline.core.rundir import IncompleteError, RunDir, data_output
from pipeline.core.sampling import generate, left_pad
from pipeline.core.trainer_stage import (
    check_pad,
    log_final,
    loss_metrics,
    resume_point,
    save_trainer_final,
    stage_callback,
    train_or_restore,
    trainer_arguments,
    with_lora,
)

STAGE = "sft"


def derivation(recipe: Recipe, data_manifest: dict, method: str, step: int | None, metrics: dict) -> Derivation:
    return stage_derivation(
        recipe,
        STAGE,
        method,
        recipe.model.name_or_path,
        [s.path for s in recipe.data.sft.train],
        data_manifest,
        metrics,
        step,
    )


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
    from accelerate import PartialState
    from transformers import AutoTokenizer, PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from pipeline.core.tracking import Tracker

    t_start = time.perf_counter()
    # 1. Outputs; skip a finished stage. (The distributed state is set up by the training arguments below, which
    #    pick gloo on a CPU-only machine.)
    if (done_final := finished_or_announce(recipe, STAGE)) is not None:
        return done_final
    stage = RunDir.of(recipe).stage(STAGE)

    # 2. Data and tokenizer from the data stage (the same tokenizer and chat template for every stage).
    data = data_output(RunDir.of(recipe))
    tokenizer = AutoTokenizer.from_pretrained(data.tokenizer)
    datasets.disable_progress_bars()
    columns = ["input_ids", "assistant_masks"]
    train_path, eval_path = data.split(STAGE, "train"), data.split(STAGE, "eval")
    if train_path is None:
        raise ConfigError("the recipe has no SFT data (data.sft.train)")
    train_ds = datasets.Dataset.from_parquet(str(train_path)).select_columns(columns)
    eval_ds = datasets.Dataset.from_parquet(str(eval_path)).select_columns(columns) if eval_path else None

    # 3. Training arguments; precision by device (bf16 on GPU, fp32 on CPU).
    prec = precision(recipe.run.precision)
    s = recipe.sft
    args = SFTConfig(
        **trainer_arguments(s, recipe, stage, prec, evaluate=eval_ds is not None),
        packing=s.packing,
    )
    _ = args.device  # sets up the process group now (gloo on CPU), before anything else asks for it
    peers.watch()  # a process that fails stops the others at once (pipeline.core.peers)
    state = PartialState()
    tracker = Tracker(recipe, STAGE, state.is_main_process)
    if state.is_main_process:
        print(f"[sft] {describe_processes(state)}; {'bf16' if prec['bf16'] else 'fp32'}", flush=True)

    # 4. Model (and LoRA). Built after the training arguments: under ZeRO-3 those make from_pretrained
    #    load each rank's shard directly instead of a full copy per process.
    resume, done = resume_point(stage)
    model = load_causal_lm(recipe.model, str(resume) if done and s.method == "full" else None, dtype=prec["dtype"])
    check_pad(tokenizer)
    stop_at_end_of_turn(model.generation_config, tokenizer)  # every checkpoint it writes stops where turns end
    model, peft_config = with_lora(model, s.method, s.lora, "CAUSAL_LM", resume, done)
    enc = GemmaEncoder(tokenizer)
    panel = [
        (p, enc.encode([{"role": "user", "content": p}], add_generation_prompt=True).input_ids) for p in s.prompt_panel
    ]
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[
            stage_callback(
                STAGE,
                tracker,
                partial(derivation, recipe, data.manifest.raw, s.method),
                ("loss", "mean_token_accuracy", "learning_rate", "grad_norm", "tokens_per_second"),
                on_evaluate=partial(answer_panel, recipe, tracker, tokenizer, panel),
            )
        ],
    )
    trainer.remove_callback(PrinterCallback)  # our callback prints one line per log

    # 5. Resume from the last complete checkpoint, train.
    train_or_restore(trainer, STAGE, recipe, resume, done, state.is_main_process)
    metrics: dict[str, Any] = loss_metrics(trainer)
    if eval_ds is not None:
        last_eval = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
        if last_eval is None or last_eval.get("step") != trainer.state.global_step:
            last_eval = trainer.evaluate()
        metrics.update(
            {
                f"eval/{k[5:]}": v
                for k, v in last_eval.items()
                if k.startswith("eval_") and k[5:] in ("loss", "mean_token_accuracy", "entropy")
            }
        )
    metrics["steps"] = trainer.state.global_step
    metrics["seconds_this_session"] = round(time.perf_counter() - t_start, 1)

    # 6. Save: one notice-carrying, atomic checkpoint (LoRA merged into a full one; the adapter kept beside).
    method = "lora-merged" if s.method == "lora" else "full"
    final = save_trainer_final(
        stage,
        trainer,
        tokenizer,
        derivation(recipe, data.manifest.raw, method, None, metrics),
        lora=s.method == "lora",
        load_base=partial(load_causal_lm, recipe.model, dtype=prec["dtype"]),
    )
    log_final(tracker, STAGE, metrics, trainer.state.global_step)
    tracker.log_lineage(final)
    tracker.finish()
    if state.is_main_process:
        print(f"[sft] saved {final} ({', '.join(f'{k} {v:.4g}' for k, v in metrics.items())})", flush=True)
    return final


def main(argv: list[str] | None = None) -> int:
    return run_cli(
        STAGE,
        "Supervised fine-tuning on the data stage's dialogues.",
        run,
        argv,
        input_errors=(IncompleteError, LoadError),
        run_errors=(NonFiniteLossError,),
    )


if __name__ == "__main__":
    sys.exit(main())
