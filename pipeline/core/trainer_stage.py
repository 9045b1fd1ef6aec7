"""What the Trainer-driven stages (SFT, RM and DPO) share: one run object, ``TrainerRun``, opened by ``open_run``
(training arguments from the recipe section, the process group, the peer watch, the tracker, the resume point) and
closed by ``TrainerRun.finish`` (the notice-carrying final checkpoint, LoRA merged into it and the adapter kept
beside it, the final metrics, the lineage); and the pieces between: the callback (W&B and console logging under
``stage/group/name`` keys with tokens/s, a stop on a non-finite loss, grad norm or weights, the notices and
completion marker on every resumable checkpoint the Trainer saves), LoRA, and training or restoring a finished run.

The stages keep what is their own: their data, their model class, their trainer, their metrics (the SFT prompt
panel; the reward model's held-out pairs and statistics; DPO's implicit-reward accuracy). PPO, our own loop, has its
own run object (``pipeline.ppo.PPORun``).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from data_prep.gemma_format import END_OF_TURN, START_OF_TURN
from pipeline.core import peers
from pipeline.core.checkpoint import (
    last_good_note,
    last_resumable,
    mark_intermediate,
    save_final,
    training_done,
    warn_if_changed,
)
from pipeline.core.config import ConfigError, LoraSettings, Recipe, TrainerSettings
from pipeline.core.consistency import check_inputs
from pipeline.core.devices import describe_processes, precision
from pipeline.core.faults import NonFiniteLossError, nonfinite_ranks, poison_if_asked
from pipeline.core.locations import is_hub_id, looks_local, portable_path
from pipeline.core.progress import eta
from pipeline.core.provenance import Derivation, stage_derivation
from pipeline.core.rundir import (
    ADAPTER,
    CARD_FILE,
    TRAINER_STATE,
    DataOutput,
    RunDir,
    StageDir,
    checkpoint_dir,
    data_output,
)

# What a saved LoRA adapter folder keeps of the tokenizer: nothing (the tokenizer sits once, beside the weights).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
TRAINER_PICKLE = "training_args.bin"  # the Trainer's pickled settings: no use to recipients


# --------------------------------------------------------------------------------------------------------------
# The run: opened before the model is built, finished by the final save
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TrainerRun:
    """One run of a Trainer-driven stage: its recipe section, inputs, training arguments, processes and tracker."""

    recipe: Recipe
    name: str
    """The stage: ``sft``, ``rm`` or ``dpo``."""
    stage: StageDir
    data: DataOutput
    """The data stage's output the stage reads."""
    data_section: str
    """The recipe's data section the stage trains on (``sft`` or ``preference``; its notices name those datasets)."""
    tokenizer: Any
    """The data stage's tokenizer (every stage's checkpoint carries the same one)."""
    parent: Path | str | None
    """The checkpoint the model starts from (None: the recipe's base model; a hub id for a start model on the Hub)."""
    args: Any
    """The trainer's TrainingArguments (TRL's SFTConfig, RewardConfig or DPOConfig)."""
    prec: dict
    """``pipeline.core.devices.precision``: bf16 or fp32, the dtype to load in, CPU or not."""
    main: bool
    """This is the job's main process (it prints, writes notices and finishes the save)."""
    tracker: Any
    resume: Path | None
    """The newest complete resumable checkpoint, if any."""
    done: bool
    """That checkpoint already holds the run's last step: restore it instead of training."""
    started: float
    """``time.perf_counter()`` when the stage started (for ``seconds_this_session``)."""
    pipeline_tag: str = "text-generation"
    base_model: str | None = None
    """The ``base_model`` its card names when it is not the recipe's (a stage started from ``init_from``)."""

    @property
    def settings(self) -> TrainerSettings:
        return getattr(self.recipe, self.name)

    def derivation(self, method: str, step: int | None, metrics: dict) -> Derivation:
        """What a checkpoint of this stage is derived from (its notices and lineage); ``method`` as exported."""
        return stage_derivation(
            self.recipe,
            self.name,
            method,
            self.parent if self.parent is not None else self.recipe.model.name_or_path,
            [s.path for s in getattr(self.recipe.data, self.data_section).train],
            self.data.manifest.raw,
            metrics,
            step,
            pipeline_tag=self.pipeline_tag,
            base_model=self.base_model,
        )

    def callback(self, shown: tuple[str, ...], on_evaluate: Callable[..., None] | None = None):
        """The stage's TrainerCallback (``stage_callback``): intermediate checkpoints carry ``settings.method``."""
        return stage_callback(
            self.name, self.tracker, partial(self.derivation, self.settings.method), shown, on_evaluate
        )

    def train(self, trainer: Any) -> None:
        """Train from the start or the resume point, or restore a finished run's state; one console line per log."""
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # the stage callback prints one line per log
        head_bias_visible(trainer.model)
        train_or_restore(trainer, self.name, self.recipe, self.resume, self.done, self.main)

    def finish(
        self,
        trainer: Any,
        metrics: dict[str, Any],
        load_base: Callable[[], Any],
        extra: Callable[[Path], None] | None = None,
        lineage: dict[str, Path] | None = None,
        summary: str | None = None,
    ) -> Path:
        """Save the notice-carrying final checkpoint (``save_trainer_final``; LoRA merged into ``load_base()``,
        ``extra(tmp)`` adds the stage's files), log the final metrics and the lineage (``lineage``: the checkpoints
        it was made from, by artifact name), and print ``summary`` (default: the metrics)."""
        metrics["steps"] = trainer.state.global_step
        metrics["seconds_this_session"] = round(time.perf_counter() - self.started, 1)
        lora = self.settings.method == "lora"
        final = save_trainer_final(
            self.stage,
            trainer,
            self.tokenizer,
            self.derivation("lora-merged" if lora else "full", None, metrics),
            lora=lora,
            load_base=load_base,
            extra=extra,
        )
        log_final(self.tracker, self.name, metrics, trainer.state.global_step)
        self.tracker.log_lineage(final, lineage)
        self.tracker.finish()
        if self.main:
            if summary is None:
                numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
                summary = ", ".join(f"{k} {v:.4g}" for k, v in numbers.items())
            print(f"[{self.name}] saved {final} ({summary})", flush=True)
        return final


def read_inputs(
    recipe: Recipe, parent: Path | str | None, what: str = "the SFT checkpoint", foreign: bool = False
) -> tuple[DataOutput, Any]:
    """The data stage's output and its tokenizer (the same tokenizer and chat template for every stage), checked
    against the checkpoint the stage starts from when there is one (``pipeline.core.consistency``; ``what`` names it,
    ``foreign``: a model this pipeline did not write)."""
    import datasets
    from transformers import AutoTokenizer

    data = data_output(RunDir.of(recipe))
    if parent is not None:
        check_inputs(data.path, {what: parent}, foreign=(what,) if foreign else ())
    tokenizer = AutoTokenizer.from_pretrained(data.tokenizer)
    datasets.disable_progress_bars()
    return data, tokenizer


def open_run(
    recipe: Recipe,
    name: str,
    data: DataOutput,
    data_section: str,
    tokenizer: Any,
    parent: Path | str | None,
    arguments: type,
    evaluate: bool,
    started: float,
    pipeline_tag: str = "text-generation",
    base_model: str | None = None,
    **stage_arguments: Any,
) -> TrainerRun:
    """The common opening of a Trainer stage, after its inputs are read and before its model is built: the training
    arguments (``arguments``, TRL's config class, with the recipe section's shared settings and ``stage_arguments``),
    the process group they set up (gloo on a CPU), the peer watch, the tracker, the process line, the pad check and
    the resume point. Built before the model: under ZeRO-3 the arguments make ``from_pretrained`` load each
    process's shard directly instead of a full copy per process."""
    from accelerate import PartialState

    from pipeline.core.tracking import Tracker

    stage = RunDir.of(recipe).stage(name)
    prec = precision(recipe.run.precision)
    args = arguments(**trainer_arguments(getattr(recipe, name), recipe, stage, prec, evaluate), **stage_arguments)
    _ = args.device  # sets up the process group now (gloo on CPU), before anything else asks for it
    peers.watch()  # a process that fails stops the others at once (pipeline.core.peers)
    state = PartialState()
    tracker = Tracker(recipe, name, state.is_main_process)
    if state.is_main_process:
        source = f"; from {parent}" if parent is not None else ""
        print(f"[{name}] {describe_processes(state)}; {'bf16' if prec['bf16'] else 'fp32'}{source}", flush=True)
    check_pad(tokenizer)
    resume, done = resume_point(stage)
    return TrainerRun(
        recipe=recipe,
        name=name,
        stage=stage,
        data=data,
        data_section=data_section,
        tokenizer=tokenizer,
        parent=parent,
        args=args,
        prec=prec,
        main=state.is_main_process,
        tracker=tracker,
        resume=resume,
        done=done,
        started=started,
        pipeline_tag=pipeline_tag,
        base_model=base_model,
    )


# --------------------------------------------------------------------------------------------------------------
# The pieces
# --------------------------------------------------------------------------------------------------------------


def trainer_arguments(section: Any, recipe: Recipe, stage: StageDir, prec: dict, evaluate: bool) -> dict:
    """The TrainingArguments of an SFT, RM or DPO run from its recipe section (``recipe.sft``, ``.rm``, ``.dpo``): batch
    sizes, schedule, logging, evaluation, resumable checkpoints, seed and precision (bf16 on a GPU; ``use_cpu`` on a
    CPU-only machine, which also makes a GPU-style accelerate config run its processes with gloo)."""
    return dict(
        output_dir=str(stage.checkpoints),
        max_length=recipe.data.max_length,
        per_device_train_batch_size=section.per_device_train_batch_size,
        per_device_eval_batch_size=section.per_device_eval_batch_size,
        gradient_accumulation_steps=section.gradient_accumulation_steps,
        learning_rate=section.learning_rate,
        num_train_epochs=section.num_train_epochs,
        max_steps=section.max_steps,
        lr_scheduler_type=section.lr_scheduler_type,
        warmup_steps=section.warmup_ratio,  # a float below 1 is a fraction of the training steps
        weight_decay=section.weight_decay,
        max_grad_norm=section.max_grad_norm,
        gradient_checkpointing=section.gradient_checkpointing,
        logging_steps=section.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN must show (and stop the run), not be averaged away
        eval_strategy="steps" if evaluate else "no",
        eval_steps=section.eval_steps,
        save_strategy="steps",
        save_steps=section.save_steps,
        save_total_limit=section.save_total_limit,
        seed=recipe.run.seed,
        bf16=prec["bf16"],
        use_cpu=prec["use_cpu"],
        report_to="none",
        disable_tqdm=not sys.stderr.isatty(),
    )


def check_pad(tokenizer: Any) -> None:
    """Both stages pad their batches with the tokenizer's pad, which must differ from eos: otherwise every sequence's
    end looks like padding (the SFT loss never sees the stop; the reward model reads its score at the wrong place)."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad is None or pad == eos:
        raise ConfigError(f"the tokenizer needs a pad token distinct from eos ({eos}) to mark where sequences end")


def resume_point(stage: StageDir) -> tuple[Path | None, bool]:
    """The newest complete resumable checkpoint (incomplete ones are removed) and whether it already holds the run's
    last step (the stage was killed while saving its final checkpoint: the weights then come from it)."""
    resume = last_resumable(stage.checkpoints)
    return resume, training_done(resume)


def with_lora(
    model: Any,
    method: str,
    lora: LoraSettings,
    task_type: str,
    resume: Path | None,
    done: bool,
    tokenizer: Any = None,
    **extra: Any,
):
    """``(model, peft_config)`` for the Trainer: a full model as it is; LoRA as a config for the Trainer to apply,
    or, when training was done, the adapter of the last checkpoint on the model (its trained token rows included).

    With ``lora.train_control_tokens`` the config also trains the embedding rows of ``<start_of_turn>`` and
    ``<end_of_turn>`` (``control_token_indices``; ``tokenizer`` gives their ids, and without one the rows stay
    frozen)."""
    if method != "lora":
        return model, None
    if done:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(resume), is_trainable=True), None
    from peft import LoraConfig

    if lora.train_control_tokens and tokenizer is not None:
        if _zero3_without_cuda():
            print(
                "warning: lora.train_control_tokens is ignored under DeepSpeed ZeRO-3 without CUDA (PEFT gathers the "
                "token rows on a CUDA device only): the control-token rows stay frozen",
                file=sys.stderr,
                flush=True,
            )
        else:
            extra["trainable_token_indices"] = control_token_indices(tokenizer)
    return model, LoraConfig(
        task_type=task_type,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        **extra,
    )


def control_token_indices(tokenizer: Any) -> list[int]:
    """The ids of ``<start_of_turn>`` and ``<end_of_turn>``, for PEFT's ``trainable_token_indices``.

    A base Gemma never saw these ids in use, and with the embedding frozen the adapters alone barely learn to emit
    ``<end_of_turn>`` (Gemma 3 270M, sampled held-out answers ending their turn: 0.74 without the rows, 1.0 with
    them; each step about a third slower on a CPU: the head's gradient is now computed). PEFT (0.21) trains a copy of
    just these rows of the input embedding (Gemma's scaled embedding included) and, the head being tied to it, uses
    the same rows as the head's output rows; the base rows stay as they were, so ``disable_adapter()`` (the DPO and
    PPO reference under LoRA) gives the base's rows back, and ``merge_and_unload`` writes the trained rows into the
    one tied matrix. The adapter file keeps the two rows, not the 262k-row matrix (``modules_to_save`` would)."""
    ids = [tokenizer.convert_tokens_to_ids(token) for token in (START_OF_TURN, END_OF_TURN)]
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise ConfigError(f"the tokenizer has no single ids for {START_OF_TURN} and {END_OF_TURN} (got {ids})")
    return ids


def _zero3_without_cuda() -> bool:
    """ZeRO-3 partitions the embedding, and PEFT 0.21 collects the trainable token rows from it on a CUDA device
    only (``TrainableTokensLayer._collect_token_weights``): on CPU processes (gloo) it fails before training."""
    import torch
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled() and not torch.cuda.is_available()


def head_bias_visible(model: Any) -> None:
    """Let TRL's fused LM head read the bias of a head whose token rows are trained (``control_token_indices``).

    TRL's SFT and DPO trainers compute log-probs from ``lm_head.weight`` and ``lm_head.bias`` directly. PEFT's
    wrapper of the tied head answers ``weight`` (the base matrix with the trained rows, or the base alone while the
    adapter is disabled) but not ``bias``, and the first step fails with an AttributeError. The bias is the wrapped
    head's own (None for Gemma): no adapter changes it."""
    from peft.utils.other import TrainableTokensWrapper

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, TrainableTokensWrapper) and "bias" not in vars(head):
        object.__setattr__(head, "bias", head.original_module.bias)  # a plain attribute: no second registration


def train_or_restore(trainer: Any, stage: str, recipe: Recipe, resume: Path | None, done: bool, main: bool) -> None:
    """Train from the start or from ``resume``; when ``done``, restore the finished run's state instead (the Trainer
    would count one more step without training)."""
    from transformers import TrainerState

    if resume is not None and main:
        print(f"[{stage}] resuming from {resume}" + (" (training was finished)" if done else ""), flush=True)
        warn_if_changed(stage, resume, recipe, (stage, "model", "data"))
    if done:
        trainer.state = TrainerState.load_from_json(str(resume / TRAINER_STATE))
    else:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)


def loss_metrics(trainer: Any) -> dict:
    """The first and the last logged training loss ({} before any log)."""
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"train/loss_first": losses[0], "train/loss_last": losses[-1]} if losses else {}


def log_final(tracker: Any, stage: str, metrics: dict, step: int) -> None:
    """The stage's final metrics to W&B under ``<stage>/final/...`` (numbers only)."""
    tracker.log({f"{stage}/final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)


def _save_weights(trainer: Any, lora: bool, tmp: Path) -> None:
    trainer.save_model(str(tmp / ADAPTER if lora else tmp))


@contextmanager
def _zero3_init_off() -> Iterator[None]:
    """Build models whole in this process: under ZeRO-3, transformers builds every model inside
    ``deepspeed.zero.Init``, which partitions it collectively, and the main process alone would wait there for
    the others forever."""
    from transformers.integrations import deepspeed as hf_deepspeed

    held = hf_deepspeed._hf_deepspeed_config_weak_ref  # noqa: SLF001 - transformers keeps no public getter of it
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = held  # noqa: SLF001


def adapter_card(card: str, hub_base: str | None) -> str:
    """PEFT's adapter card with its front matter naming ``hub_base`` as the base model (``base_model`` and the
    ``base_model:adapter:<id>`` tag), or no base model at all when ``hub_base`` is None; the rest unchanged."""
    import yaml

    if not card.startswith("---\n") or "\n---\n" not in card[3:]:
        return card
    front_text, _, body = card[4:].partition("\n---\n")
    front = yaml.safe_load(front_text) or {}
    front.pop("base_model", None)
    tags = [t for t in front.get("tags") or [] if not str(t).startswith("base_model:adapter:")]
    if hub_base is not None:
        front = {"base_model": hub_base, **front}
        tags = sorted([*tags, f"base_model:adapter:{hub_base}"])
    if tags:
        front["tags"] = tags
    else:
        front.pop("tags", None)
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n" + body


def name_adapter_base(adapter: Path, base: str, run_root: Path | None) -> None:
    """Make a saved LoRA adapter name its base model ``base`` without a local folder. PEFT writes the folder it
    loaded the base from into ``adapter_config.json`` (``base_model_name_or_path``) and into its card
    (``base_model`` and the tag ``base_model:adapter:<folder>``). The config now names a hub base by its id and any
    other by its portable form (``sft/final``, relative to the run directory; ``embedded:<name>``); the card names
    a hub base only (to the Hub, ``sft/final`` would be a repository). Nothing in the pipeline reads the name: every
    adapter is loaded onto a base model the stage builds itself (``PeftModel.from_pretrained(base, folder)``)."""
    from peft.utils import CONFIG_NAME

    hub_base = base if is_hub_id(base) and not looks_local(base) else None
    config_path = adapter / CONFIG_NAME
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = hub_base or portable_path(base, run_root)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    card = adapter / CARD_FILE
    if card.is_file():
        card.write_text(adapter_card(card.read_text(encoding="utf-8"), hub_base), encoding="utf-8")


def _finish_files(
    lora: bool,
    load_base: Callable[[], Any],
    extra: Callable[[Path], None] | None,
    derivation: Derivation,
    tmp: Path,
) -> None:
    if lora:  # merge the adapter into a plain full checkpoint; keep the adapter beside it (main process only)
        from peft import PeftModel

        with _zero3_init_off():
            base = load_base()
        PeftModel.from_pretrained(base, str(tmp / ADAPTER)).merge_and_unload().save_pretrained(str(tmp))
        for name in TOKENIZER_FILES:
            (tmp / ADAPTER / name).unlink(missing_ok=True)
        name_adapter_base(tmp / ADAPTER, derivation.parent, derivation.run_root)
    for junk in tmp.rglob(TRAINER_PICKLE):
        junk.unlink()
    if extra is not None:
        extra(tmp)


def save_trainer_final(
    stage: StageDir,
    trainer: Any,
    tokenizer: Any,
    derivation: Derivation,
    lora: bool,
    load_base: Callable[[], Any],
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """The stage's notice-carrying final checkpoint, atomically (call on every process: ZeRO-3 gathers). With LoRA
    the adapter is merged into ``load_base()`` and kept in ``adapter/``, naming its base (the derivation's parent) by
    no local folder (``name_adapter_base``); ``extra(tmp)`` adds stage files before the notices and marker."""
    final = save_final(
        stage.final,
        partial(_save_weights, trainer, lora),
        tokenizer,
        derivation,
        main_only=partial(_finish_files, lora, load_base, extra, derivation),
    )
    if trainer.is_world_process_zero():  # TRL writes a card without the Gemma notices next to the checkpoints
        (stage.checkpoints / CARD_FILE).unlink(missing_ok=True)
    return final


def stage_callback(
    stage: str,
    tracker: Any,
    derive: Callable[[int, dict], Derivation],
    shown: tuple[str, ...],
    on_evaluate: Callable[..., None] | None = None,
):
    """A TrainerCallback for ``stage``.

    ``derive(step, metrics)`` is the Derivation a saved checkpoint's notices describe (main process); ``shown``
    names the metrics printed on the console line; ``on_evaluate(args, state, model)`` runs after each evaluation
    (e.g. the SFT prompt panel).
    """
    from transformers import TrainerCallback

    class StageCallback(TrainerCallback):
        def __init__(self) -> None:
            self.last: tuple[float, float] | None = None  # (time, num_tokens) at the previous log
            self.start: tuple[float, int] | None = None  # (time, step) when this process began training

        def on_train_begin(self, args, state, control, **kw):
            self.start = (time.perf_counter(), state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            logs = dict(logs or {})
            for key in ("loss", "grad_norm", "eval_loss"):
                value = logs.get(key)
                if value is not None and not math.isfinite(value):
                    raise NonFiniteLossError(
                        f"non-finite {key} ({value}) at step {state.global_step}; stopping: "
                        f"{last_good_note(args.output_dir)}"
                    )
            now = time.perf_counter()
            if "num_tokens" in logs:
                if self.last is not None and now > self.last[0]:
                    logs["tokens_per_second"] = (logs["num_tokens"] - self.last[1]) / (now - self.last[0])
                self.last = (now, logs["num_tokens"])
            metrics = {}
            for k, v in logs.items():
                if isinstance(v, (int, float)):
                    group, name = ("eval", k[5:]) if k.startswith("eval_") else ("train", k)
                    metrics[f"{stage}/{group}/{name}"] = v
            tracker.log(metrics, step=state.global_step)
            if state.is_world_process_zero:
                line = " ".join(
                    f"{k.split('/', 2)[-1]} {v:.4g}" for k, v in metrics.items() if k.rsplit("/", 1)[-1] in shown
                )
                t0, s0 = self.start or (now, state.global_step)
                left = eta(now - t0, state.global_step - s0, state.max_steps - s0)
                print(
                    f"[{stage}] step {state.global_step}/{state.max_steps} {line}" + (f" {left}" if left else ""),
                    flush=True,
                )

        def on_step_begin(self, args, state, control, model=None, **kw):
            if model is not None:
                poison_if_asked(stage, state.global_step + 1, model)

        def on_save(self, args, state, control, model=None, **kw):
            ckpt = checkpoint_dir(args.output_dir, state.global_step)
            # Never mark a checkpoint whose weights went non-finite between two logs: every process checks what it
            # holds (its partition under ZeRO-3) and all stop together.
            bad = nonfinite_ranks(model.parameters()) if model is not None else []
            if bad:
                if state.is_world_process_zero:
                    shutil.rmtree(ckpt, ignore_errors=True)
                raise NonFiniteLossError(
                    f"non-finite weights at step {state.global_step} (held by process {', '.join(map(str, bad))}); "
                    f"stopping: {last_good_note(args.output_dir)}"
                )
            if not state.is_world_process_zero:
                return
            last = next((h for h in reversed(state.log_history) if "loss" in h), {})
            mark_intermediate(ckpt, derive(state.global_step, {"train/loss": last.get("loss")}))

        def on_evaluate(self, args, state, control, model=None, **kw):
            if on_evaluate is not None and model is not None:
                on_evaluate(args, state, model)

    return StageCallback()
