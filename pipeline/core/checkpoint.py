"""The one save path: every checkpoint a stage hands on is a complete, notice-carrying Gemma derivative.

``save_final`` is called on every process (under ZeRO-3 the weights are gathered from all ranks); the main process
then saves the tokenizer, makes a causal LM's generation config stop at ``<end_of_turn>``, writes the notices and the
lineage, writes the completion marker and renames the staging directory into place. ``mark_intermediate`` does the same for a Trainer's resumable ``checkpoint-N``
directory once it is fully written. ``require_checkpoint`` is what the next stage calls: it refuses a directory
without its marker or its notices.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data_prep.gemma_format import stop_token_ids
from pipeline.core.atomic import commit_dir, staging_dir
from pipeline.core.config import to_dict, to_yaml
from pipeline.core.locations import portable
from pipeline.core.notices import missing_notices, write_notices
from pipeline.core.provenance import Derivation, flatten, path_digests
from pipeline.core.rundir import (
    GENERATION_CONFIG,
    MARKER,
    IncompleteError,
    RunDir,
    checkpoints,
    is_complete,
    read_lineage,
    require_complete,
    trainer_state,
    write_marker,
)


def _barrier() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def _is_main() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def stop_at_end_of_turn(generation_config: Any, tokenizer: Any) -> None:
    """Make a generation config stop where a fine-tuned model ends its turn: ``<end_of_turn>`` (what training
    teaches) and ``<eos>``, with the pad id set. A base model's own config lists ``<eos>`` only (Gemma 3 270M's:
    id 1), so a derivative saved with it would never stop under ``generate``, ``pipeline``, vLLM or TGI."""
    generation_config.eos_token_id = stop_token_ids(tokenizer)
    generation_config.pad_token_id = tokenizer.pad_token_id


def _stop_saved_model_at_end_of_turn(folder: Path, tokenizer: Any) -> None:
    """The same for a saved causal LM's ``generation_config.json`` (reward and value models have none)."""
    if not (folder / GENERATION_CONFIG).is_file():
        return
    from transformers import GenerationConfig

    generation_config = GenerationConfig.from_pretrained(folder)
    stop_at_end_of_turn(generation_config, tokenizer)
    generation_config.save_pretrained(folder)


def save_final(
    final: str | Path,
    write_weights: Callable[[Path], None],
    tokenizer: Any,
    derivation: Derivation,
    main_only: Callable[[Path], None] | None = None,
) -> Path:
    """Save a stage's finished checkpoint atomically with its notices. Call on every process.

    ``write_weights(tmp)`` runs on every process (e.g. ``trainer.save_model``, which gathers ZeRO-3 shards);
    ``main_only(tmp)``, if given, runs on the main process afterwards (e.g. merging a LoRA adapter).
    """
    final = Path(final)
    tmp = staging_dir(final, tag="save")
    main = _is_main()
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    try:
        write_weights(tmp)
        _barrier()
        if main:
            if main_only is not None:
                main_only(tmp)
            tokenizer.save_pretrained(tmp)
            _stop_saved_model_at_end_of_turn(tmp, tokenizer)
            write_notices(tmp, derivation)
            problems = missing_notices(tmp)
            if problems:
                raise RuntimeError(f"checkpoint notices incomplete: {', '.join(problems)}")
            commit_dir(tmp, final, {"stage": derivation.stage, "kind": "final"})
    except BaseException:
        if main:  # a failed save (disk full, a crash) never leaves a half-written directory behind
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()
    return final


def mark_intermediate(ckpt: str | Path, derivation: Derivation) -> None:
    """Give a fully written resumable checkpoint its notices, then its marker (main process only)."""
    ckpt = Path(ckpt)
    write_notices(ckpt, derivation)
    write_marker(ckpt, {"stage": derivation.stage, "kind": "intermediate", "step": derivation.step})


def last_resumable(folder: str | Path) -> Path | None:
    """The newest complete ``checkpoint-N`` in ``folder``; incomplete ones (killed mid-save) are removed."""
    found = []
    for p in checkpoints(folder):
        if is_complete(p):
            found.append(p)
        elif _is_main():
            print(f"[resume] removing incomplete checkpoint {p} (no {MARKER} marker)", flush=True)
            shutil.rmtree(p, ignore_errors=True)
    if Path(folder).is_dir():
        _barrier()
    return found[-1] if found else None


def last_good_note(folder: str | Path) -> str:
    """What a stopped stage leaves to resume from: its newest complete ``checkpoint-N``, or that there is none."""
    done = [p for p in checkpoints(folder) if is_complete(p)]
    if not done:
        return f"no checkpoint was saved yet in {folder} (a re-run starts the stage from its beginning)"
    return f"the last good checkpoint, {done[-1]}, is kept (a re-run resumes from it)"


def changed_since(ckpt: str | Path, recipe: Any, sections: tuple[str, ...]) -> list[str]:
    """``key: old -> new`` for the recipe keys under ``sections`` whose value differs from the recipe the checkpoint
    was written with (its lineage), e.g. a learning rate lowered after a NaN."""
    lineage = read_lineage(ckpt)
    if lineage is None:
        return []
    old = flatten(lineage.get("recipe") or {})
    raw = to_dict(recipe)
    new = flatten(portable(raw, recipe.run_dir))  # the lineage holds the recipe with portable paths
    # a path written by its name alone compares equal when only its folder changed: its digest tells
    old_digests, new_digests = lineage.get("recipe_path_digests") or {}, path_digests(raw, recipe.run_dir)
    return [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}" + (" (another folder)" if old.get(k) == new.get(k) else "")
        for k in sorted(set(old) | set(new))
        if k.split(".", 1)[0] in sections
        and (old.get(k) != new.get(k) or (k in old_digests and old_digests[k] != new_digests.get(k)))
    ]


def warn_if_changed(stage: str, ckpt: Path, recipe: Any, sections: tuple[str, ...]) -> None:
    """Resuming continues the saved optimizer, learning-rate schedule and data order, so a changed setting among
    those silently does nothing; say which settings changed and how to start over instead."""
    changes = changed_since(ckpt, recipe, sections)
    if changes and _is_main():
        print(
            f"[{stage}] warning: resuming from {ckpt}, which was written with other settings: {'; '.join(changes)}. "
            "The optimizer, learning-rate schedule and data order continue from the checkpoint, so changes to "
            f"them do not take effect; delete {ckpt.parent} to train the stage again with the new settings.",
            flush=True,
        )


def finished_or_announce(recipe: Any, stage: str) -> Path | None:
    """A stage's first step: its ``final/`` when already complete (the stage is skipped), else None after printing
    the resolved recipe. Runs before the distributed state exists, so the launcher's RANK picks the printer."""
    rank0 = os.environ.get("RANK", "0") == "0"
    final = RunDir.of(recipe).stage(stage).final
    if is_complete(final):
        if rank0:
            print(f"[{stage}] already finished: {final} (delete it to train again)", flush=True)
        return final
    if rank0:
        print(f"[{stage}] resolved recipe:\n{to_yaml(recipe)}", flush=True)
    return None


def training_done(ckpt: Path | None) -> bool:
    """True when a resumable checkpoint already holds the run's last training step (the stage was killed after it,
    e.g. while writing its final checkpoint). transformers' Trainer, resumed from such a checkpoint, counts one more
    step without training; the stages then load the weights from the checkpoint and skip ``train()``."""
    if ckpt is None:
        return False
    state = trainer_state(ckpt)
    return state.get("max_steps", 0) > 0 and state["global_step"] >= state["max_steps"]


def require_checkpoint(path: str | Path, what: str) -> Path:
    """A finished checkpoint with every notice, or a clear error."""
    path = require_complete(path, what)
    problems = missing_notices(path)
    if problems:
        raise IncompleteError(f"{what} at {path} lacks its Gemma derivative notices: {', '.join(problems)}")
    return path
