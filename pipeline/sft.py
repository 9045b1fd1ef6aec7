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
from pathlib import Path
from typing import Any

from pipeline.atomic import IncompleteError, require_complete
from pipeline.config import ConfigError, Recipe, run_cli
from pipeline.loading import LoadError, describe_processes, load_causal_lm, precision
from pipeline.notices import Derivation, stage_derivation
from pipeline.stage_callback import NonFiniteLossError, stage_callback

STAGE = "sft"


def derivation(recipe: Recipe, data_manifest: dict, metrics: dict, step: int | None, method: str) -> Derivation:
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


def make_callback(recipe: Recipe, tracker: Any, tokenizer: Any, data_manifest: dict):
    """The shared stage callback plus the prompt panel: greedy answers to fixed prompts at every evaluation."""
    import torch

    from data_prep.gemma_format import GemmaEncoder
    from pipeline.checkpoint import mark_intermediate

    enc = GemmaEncoder(tokenizer)
    panel = [
        (p, enc.encode([{"role": "user", "content": p}], add_generation_prompt=True).input_ids)
        for p in recipe.sft.prompt_panel
    ]
    method = "lora" if recipe.sft.method == "lora" else "full"

    def mark(ckpt: Path, step: int, metrics: dict) -> None:
        mark_intermediate(ckpt, derivation(recipe, data_manifest, metrics, step, method))

    def answer_panel(args, state, model) -> None:
        if not panel:
            return
        from transformers.integrations import is_deepspeed_zero3_enabled

        rows = []
        was_training = model.training
        model.eval()
        for prompt, ids in panel:
            x = torch.tensor([ids], device=model.device)
            with torch.no_grad():
                out = model.generate(
                    x,
                    attention_mask=torch.ones_like(x),
                    max_new_tokens=recipe.sft.panel_max_new_tokens,
                    do_sample=False,
                    eos_token_id=[enc.eot_id, enc.eos_id],
                    pad_token_id=enc.pad_id,
                    synced_gpus=is_deepspeed_zero3_enabled(),  # every rank steps together under ZeRO-3
                )
            new = out[0, len(ids) :].tolist()
            stopped = enc.eot_id in new
            answer = tokenizer.decode(new[: new.index(enc.eot_id)] if stopped else new, skip_special_tokens=True)
            rows.append([state.global_step, prompt, answer, stopped])
        if was_training:
            model.train()
        tracker.table(f"{STAGE}/panel", ["step", "prompt", "answer", "stopped"], rows, step=state.global_step)
        if state.is_world_process_zero:
            for _, prompt, answer, stopped in rows:
                print(f"[sft] panel: {prompt!r} -> {answer!r}{'' if stopped else ' (no <end_of_turn>)'}", flush=True)

    shown = ("loss", "mean_token_accuracy", "learning_rate", "grad_norm", "tokens_per_second")
    return stage_callback(STAGE, tracker, mark, shown, on_evaluate=answer_panel)


def run(recipe: Recipe) -> Path:
    import datasets
    from accelerate import PartialState
    from transformers import AutoTokenizer, PrinterCallback, TrainerState
    from trl import SFTConfig, SFTTrainer

    from pipeline.checkpoint import (
        finished_or_announce,
        last_resumable,
        save_final,
        training_done,
        warn_if_changed,
    )
    from pipeline.tracking import Tracker

    t_start = time.perf_counter()
    # 1. Outputs; skip a finished stage. (The distributed state is set up by the training arguments below, which
    #    pick gloo on a CPU-only machine.)
    if (done_final := finished_or_announce(recipe, STAGE)) is not None:
        return done_final
    stage_dir = recipe.run_dir / STAGE
    final = stage_dir / "final"

    # 2. Data and tokenizer from the data stage (the same tokenizer and chat template for every stage).
    import json

    data_dir = require_complete(recipe.run_dir / "data", "the data stage output (run `make data` first)")
    data_manifest = json.loads((data_dir / "manifest.json").read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(data_dir / "tokenizer")
    datasets.disable_progress_bars()
    columns = ["input_ids", "assistant_masks"]
    train_path = data_dir / STAGE / "train.parquet"
    if not train_path.is_file():
        raise ConfigError("the recipe has no SFT data (data.sft.train)")
    train_ds = datasets.Dataset.from_parquet(str(train_path)).select_columns(columns)
    eval_path = data_dir / STAGE / "eval.parquet"
    eval_ds = datasets.Dataset.from_parquet(str(eval_path)).select_columns(columns) if eval_path.is_file() else None

    # 3. Training arguments; precision by device (bf16 on GPU, fp32 on CPU). use_cpu on a CPU-only machine also
    #    makes a GPU-style accelerate config (MULTI_GPU or DEEPSPEED) run its processes with gloo.
    prec = precision()
    s = recipe.sft
    args = SFTConfig(
        output_dir=str(stage_dir / "checkpoints"),
        max_length=recipe.data.max_length,
        packing=s.packing,
        per_device_train_batch_size=s.per_device_train_batch_size,
        per_device_eval_batch_size=s.per_device_eval_batch_size,
        gradient_accumulation_steps=s.gradient_accumulation_steps,
        learning_rate=s.learning_rate,
        num_train_epochs=s.num_train_epochs,
        max_steps=s.max_steps,
        lr_scheduler_type=s.lr_scheduler_type,
        warmup_steps=s.warmup_ratio,  # a float below 1 is a fraction of the training steps
        weight_decay=s.weight_decay,
        max_grad_norm=s.max_grad_norm,
        gradient_checkpointing=s.gradient_checkpointing,
        logging_steps=s.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if eval_ds is not None else "no",
        eval_steps=s.eval_steps,
        save_strategy="steps",
        save_steps=s.save_steps,
        save_total_limit=s.save_total_limit,
        seed=recipe.run.seed,
        bf16=prec["bf16"],
        use_cpu=prec["use_cpu"],
        report_to="none",
        logging_nan_inf_filter=False,  # a NaN must show (and stop the run), not be averaged away
        disable_tqdm=not sys.stderr.isatty(),
    )
    _ = args.device  # sets up the process group now (gloo on CPU), before anything else asks for it
    state = PartialState()
    tracker = Tracker(recipe, STAGE, state.is_main_process)
    if state.is_main_process:
        print(f"[sft] {describe_processes(state)}; {'bf16' if prec['bf16'] else 'fp32'}", flush=True)

    # 4. Model (and LoRA). Built after the training arguments: under ZeRO-3 those make from_pretrained
    #    load each rank's shard directly instead of a full copy per process.
    resume = last_resumable(stage_dir / "checkpoints")
    done = training_done(resume)  # killed after the last step: the weights come from that checkpoint
    model = load_causal_lm(recipe.model, str(resume) if done and s.method == "full" else None, dtype=prec["dtype"])
    peft_config = None
    if done and s.method == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(resume), is_trainable=True)
    elif s.method == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(
            task_type="CAUSAL_LM",
            r=s.lora.r,
            lora_alpha=s.lora.alpha,
            lora_dropout=s.lora.dropout,
            target_modules=list(s.lora.target_modules),
        )

    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[make_callback(recipe, tracker, tokenizer, data_manifest)],
    )

    trainer.remove_callback(PrinterCallback)  # our callback prints one line per log

    # 5. Resume from the last complete checkpoint, train.
    if resume is not None and state.is_main_process:
        print(f"[sft] resuming from {resume}" + (" (training was finished)" if done else ""), flush=True)
        warn_if_changed("sft", resume, recipe, ("sft", "model", "data"))
    if done:
        trainer.state = TrainerState.load_from_json(str(resume / "trainer_state.json"))
    else:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    metrics: dict[str, Any] = {}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if losses:
        metrics["train/loss_first"], metrics["train/loss_last"] = losses[0], losses[-1]
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
    d = derivation(recipe, data_manifest, metrics, None, method)

    def write_weights(tmp: Path) -> None:
        trainer.save_model(str(tmp / "adapter" if s.method == "lora" else tmp))

    def finish_files(tmp: Path) -> None:
        if s.method == "lora":  # merge the adapter into a plain full checkpoint; keep the adapter beside it
            from peft import PeftModel

            base = load_causal_lm(recipe.model, dtype=prec["dtype"])
            merged = PeftModel.from_pretrained(base, str(tmp / "adapter")).merge_and_unload()
            merged.save_pretrained(str(tmp))
        for junk in tmp.rglob("training_args.bin"):  # a pickle of trainer settings: no use to recipients
            junk.unlink()
        for extra in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
            (tmp / "adapter" / extra).unlink(missing_ok=True)

    save_final(final, write_weights, tokenizer, d, main_only=finish_files)
    if state.is_main_process:  # TRL writes a card without the Gemma notices next to the checkpoints: not ours
        (stage_dir / "checkpoints" / "README.md").unlink(missing_ok=True)
    tracker.log(
        {f"{STAGE}/final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))},
        step=trainer.state.global_step,
    )
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
