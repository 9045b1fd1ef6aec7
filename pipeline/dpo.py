"""DPO: the SFT checkpoint trained directly on the preference pairs with TRL's DPOTrainer (no reward model, no PPO).

    make dpo RECIPE=recipes/tiny_ko.yaml
    accelerate launch ... -m pipeline.dpo --recipe recipes/tiny_ko.yaml [key.sub=value ...]

Reads the data stage's preference pairs (prompt ids ending with the generation prompt; each response ending with
``<end_of_turn>``) and the SFT checkpoint; trains the policy against a frozen reference (the SFT model: a second copy
for full fine-tuning, the adapter-disabled model under LoRA); evaluates on the held-out pairs (TRL's reward accuracy
and margin: the implicit reward ``beta * log(pi / ref)`` of the chosen answer above the rejected one); writes the
notice-carrying ``runs/<run>/dpo/final``. Resumes from its last complete checkpoint like SFT and the reward model.
"""

from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from pipeline.core import peers
from pipeline.core.checkpoint import finished_or_announce, require_checkpoint
from pipeline.core.cli import run_cli
from pipeline.core.config import ConfigError, Recipe
from pipeline.core.consistency import ConsistencyError, check_inputs
from pipeline.core.faults import NonFiniteLossError
from pipeline.core.loading import LoadError, describe_processes, load_causal_lm, precision
from pipeline.core.notices import Derivation, stage_derivation
from pipeline.core.rundir import IncompleteError, RunDir, data_output
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

STAGE = "dpo"
SHOWN = ("loss", "rewards/accuracies", "rewards/margins", "learning_rate", "grad_norm")


def derivation(
    recipe: Recipe, parent: Path, manifest: dict, method: str, step: int | None, metrics: dict
) -> Derivation:
    return stage_derivation(
        recipe, STAGE, method, parent, [s.path for s in recipe.data.preference.train], manifest, metrics, step
    )


def pairs_dataset(path: Path):
    """Preference parquet -> the columns TRL's DPO collator reads as they are (prompt, chosen and rejected ids)."""
    import datasets

    return datasets.Dataset.from_parquet(str(path)).select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])


def pretokenized_trainer():
    """TRL's DPOTrainer, taking the data stage's ids as they are. Its own preparation renders each pair's strings
    and tokenises them again, which is how Gemma gets a second ``<bos>`` and how a prompt and its completion stop
    splitting on a token boundary; the data stage already built the ids per turn and dropped over-long rows."""
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return PretokenizedDPOTrainer


def run(recipe: Recipe) -> Path:
    import datasets
    from accelerate import PartialState
    from transformers import AutoTokenizer, PrinterCallback
    from trl import DPOConfig

    from pipeline.core.tracking import Tracker

    t_start = time.perf_counter()
    # 1. Outputs; skip a finished stage.
    if (done_final := finished_or_announce(recipe, STAGE)) is not None:
        return done_final
    stage = RunDir.of(recipe).stage(STAGE)

    # 2. Inputs: the SFT checkpoint, the data stage's pairs and tokenizer.
    parent = require_checkpoint(RunDir.of(recipe).stage("sft").final, "the SFT checkpoint (run `make sft` first)")
    data = data_output(RunDir.of(recipe))
    check_inputs(data.path, {"the SFT checkpoint": parent})
    tokenizer = AutoTokenizer.from_pretrained(data.tokenizer)
    datasets.disable_progress_bars()
    train_path, eval_path = data.split("preference", "train"), data.split("preference", "eval")
    if train_path is None:
        raise ConfigError("the recipe has no preference data (data.preference.train)")
    train_ds = pairs_dataset(train_path)
    eval_ds = pairs_dataset(eval_path) if eval_path is not None else None

    # 3. Training arguments (before the model: ZeRO-3 then loads shards; use_cpu gives gloo on a CPU machine).
    prec = precision(recipe.run.precision)
    d = recipe.dpo
    args = DPOConfig(
        **trainer_arguments(d, recipe, stage, prec, evaluate=eval_ds is not None),
        beta=d.beta,
        loss_type=[d.loss_type],
        label_smoothing=d.label_smoothing,
    )
    _ = args.device  # sets up the process group now (gloo on CPU)
    peers.watch()  # a process that fails stops the others at once (pipeline.core.peers)
    state = PartialState()
    tracker = Tracker(recipe, STAGE, state.is_main_process)
    if state.is_main_process:
        print(f"[dpo] {describe_processes(state)}; {'bf16' if prec['bf16'] else 'fp32'}; from {parent}", flush=True)

    # 4. Models. The reference is the SFT checkpoint itself: under full fine-tuning a frozen copy loaded from it
    #    (never from the policy's own path, which for a finished run restored below is the trained checkpoint),
    #    under LoRA the policy with its adapter disabled, no second copy. TRL always gets a fresh adapter to apply:
    #    handed a model that carries one, it copies it into a "ref" adapter and uses that as the reference, which for
    #    a finished run's adapter is the trained policy again; that adapter is loaded into the fresh one after.
    #    Every dropout is off before the models are built (TRL's disable_dropout misses Gemma's attention dropout).
    resume, done = resume_point(stage)
    load = partial(load_causal_lm, recipe.model, dtype=prec["dtype"], dropout_off=True)
    model = load(str(resume if done and d.method == "full" else parent))
    ref_model = load(str(parent)) if d.method == "full" else None
    check_pad(tokenizer)
    model, peft_config = with_lora(model, d.method, d.lora, "CAUSAL_LM", None, False)
    trainer = pretokenized_trainer()(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[
            stage_callback(STAGE, tracker, partial(derivation, recipe, parent, data.manifest.raw, d.method), SHOWN)
        ],
    )
    if done and d.method == "lora":
        trainer.model.load_adapter(str(resume), adapter_name="default", is_trainable=True)
    trainer.remove_callback(PrinterCallback)

    # 5. Resume from the last complete checkpoint, train.
    train_or_restore(trainer, STAGE, recipe, resume, done, state.is_main_process)
    metrics: dict[str, Any] = loss_metrics(trainer)
    if eval_ds is not None:
        last = trainer.evaluate()
        kept = (
            "eval_loss",
            "eval_rewards/accuracies",
            "eval_rewards/margins",
            "eval_rewards/chosen",
            "eval_rewards/rejected",
        )
        metrics.update({f"eval/{k[5:]}": v for k, v in last.items() if k in kept})
    metrics["steps"] = trainer.state.global_step
    metrics["seconds_this_session"] = round(time.perf_counter() - t_start, 1)

    # 6. Save: one notice-carrying, atomic checkpoint (LoRA merged; the adapter kept beside).
    method = "lora-merged" if d.method == "lora" else "full"
    final = save_trainer_final(
        stage,
        trainer,
        tokenizer,
        derivation(recipe, parent, data.manifest.raw, method, None, metrics),
        lora=d.method == "lora",
        load_base=partial(load_causal_lm, recipe.model, str(parent), dtype=prec["dtype"]),
    )
    log_final(tracker, STAGE, metrics, trainer.state.global_step)
    tracker.log_lineage(final, {"sft": parent})
    tracker.finish()
    if state.is_main_process:
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        print(f"[dpo] saved {final} ({', '.join(f'{k} {v:.4g}' for k, v in shown.items())})", flush=True)
    return final


def main(argv: list[str] | None = None) -> int:
    return run_cli(
        STAGE,
        "DPO on the data stage's preference pairs, from the SFT checkpoint.",
        run,
        argv,
        input_errors=(IncompleteError, LoadError, ConsistencyError),
        run_errors=(NonFiniteLossError,),
    )


if __name__ == "__main__":
    sys.exit(main())
