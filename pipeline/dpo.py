"""DPO: the SFT checkpoint trained directly on the preference pairs with TRL's DPOTrainer (no reward model, no PPO).

    make dpo RECIPE=recipes/tiny_ko.yaml
    accelerate launch ... -m pipeline.dpo --recipe recipes/tiny_ko.yaml [key.sub=value ...]

Reads the data stage's preference pairs (prompt ids ending with the generation prompt; each response ending with
``<end_of_turn>``) and the SFT checkpoint (or ``dpo.init_from``: a hub id or a local folder, and then no SFT runs); trains the policy against a frozen reference (the SFT model: a second copy
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

from pipeline.core.checkpoint import finished_or_announce
from pipeline.core.cli import run_cli
from pipeline.core.config import ConfigError, Recipe
from pipeline.core.loading import load_causal_lm
from pipeline.core.starts import policy_start
from pipeline.core.trainer_stage import loss_metrics, open_run, read_inputs, with_lora

STAGE = "dpo"
SHOWN = ("loss", "rewards/accuracies", "rewards/margins", "learning_rate", "grad_norm")  # on the console line
EVAL_KEPT = (  # TRL's held-out metrics kept in the final checkpoint's notices
    "eval_loss",
    "eval_rewards/accuracies",
    "eval_rewards/margins",
    "eval_rewards/chosen",
    "eval_rewards/rejected",
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
    from trl import DPOConfig

    started = time.perf_counter()
    # 1. Outputs; skip a finished stage.
    if (done_final := finished_or_announce(recipe, STAGE)) is not None:
        return done_final

    # 2. Inputs: the start (the SFT checkpoint, or dpo.init_from), the data stage's pairs and tokenizer.
    start = policy_start(recipe, STAGE)
    parent = start.location
    data, tokenizer = read_inputs(recipe, parent, start.what, start.foreign)
    train_path, eval_path = data.split("preference", "train"), data.split("preference", "eval")
    if train_path is None:
        raise ConfigError("the recipe has no preference data (data.preference.train)")
    train_ds = pairs_dataset(train_path)
    eval_ds = pairs_dataset(eval_path) if eval_path is not None else None

    # 3. Training arguments, processes, tracker, resume point (pipeline.core.trainer_stage).
    d = recipe.dpo
    run = open_run(
        recipe,
        STAGE,
        data,
        data_section="preference",
        tokenizer=tokenizer,
        parent=parent,
        base_model=start.card_base(recipe),
        arguments=DPOConfig,
        evaluate=eval_ds is not None,
        started=started,
        beta=d.beta,
        loss_type=[d.loss_type],
        label_smoothing=d.label_smoothing,
    )

    # 4. Models. The reference is the SFT checkpoint itself: under full fine-tuning a frozen copy loaded from it
    #    (never from the policy's own path, which for a finished run restored below is the trained checkpoint),
    #    under LoRA the policy with its adapter disabled, no second copy. TRL always gets a fresh adapter to apply:
    #    handed a model that carries one, it copies it into a "ref" adapter and uses that as the reference, which for
    #    a finished run's adapter is the trained policy again; that adapter is loaded into the fresh one after.
    #    Every dropout is off before the models are built (TRL's disable_dropout misses Gemma's attention dropout).
    load = partial(load_causal_lm, recipe.model, dtype=run.prec["dtype"], dropout_off=True)
    model = load(str(run.resume if run.done and d.method == "full" else parent))
    ref_model = load(str(parent)) if d.method == "full" else None
    model, peft_config = with_lora(model, d.method, d.lora, "CAUSAL_LM", None, False, tokenizer=tokenizer)
    trainer = pretokenized_trainer()(
        model=model,
        ref_model=ref_model,
        args=run.args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[run.callback(SHOWN)],
    )
    if run.done and d.method == "lora":
        trainer.model.load_adapter(str(run.resume), adapter_name="default", is_trainable=True)

    # 5. Train (from the last complete checkpoint, if any); the held-out pairs at the end.
    run.train(trainer)
    metrics: dict[str, Any] = loss_metrics(trainer)
    if eval_ds is not None:
        metrics.update({f"eval/{k[5:]}": v for k, v in trainer.evaluate().items() if k in EVAL_KEPT})

    # 6. Save: one notice-carrying, atomic checkpoint (LoRA merged; the adapter kept beside).
    return run.finish(
        trainer,
        metrics,
        load_base=partial(load_causal_lm, recipe.model, str(parent), dtype=run.prec["dtype"]),
        lineage=start.lineage(),
    )


def main(argv: list[str] | None = None) -> int:
    return run_cli(STAGE, "DPO on the data stage's preference pairs, from the SFT checkpoint.", run, argv)


if __name__ == "__main__":
    sys.exit(main())
