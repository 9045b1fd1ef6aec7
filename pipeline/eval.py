"""Benchmarks: every final model of the run, and its base, on EleutherAI's lm-evaluation-harness.

    make eval RECIPE=recipes/tiny_ko.yaml [STAGES="base sft ppo dpo"] [TASKS="kobest_boolq,haerae"]
    python -m pipeline.eval --recipe RECIPE [--stages base sft ...] [--tasks a,b] [key.sub=value ...]

The tasks are the recipe's ``eval.tasks``: names of the harness's own tasks and groups (``kobest_boolq``, ``haerae``,
``kmmlu_direct_korean_history``) or task YAML files in the project, in the harness's format (the shipped Korean
benchmark ``data_prep/ko_bench/``). Every task is checked before any model is loaded: a task that is not known, or
whose dataset cannot be loaded (offline, or a dataset of the Hub that is gated or gone), stops the stage in one line
per task naming the task and the dataset.

Each model is loaded the way every stage loads it (the recipe's base through its loader, a final checkpoint from its
folder), in the precision the run trains in, with the tokenizer carrying Gemma's chat template. Generative tasks are
prompted with that template (a chat model is asked as it was trained); log-likelihood tasks (multiple choice) read
the plain prompt, as the harness scores them for every model (``eval.chat_template`` changes this). The numbers
are the harness's own: the same as running ``lm_eval`` by hand on that checkpoint with the same settings.

Results: ``runs/<run>/eval/<stage>.json`` (written whole, then renamed), a table printed at the end, one W&B run
(``<run>-eval``, in the run's group) whose summary holds ``eval/<stage>/<task>/<metric>``, and the report's
benchmark table and chart (``make report``; results of a checkpoint trained again since are left out, and said).

Why this module calls the harness from Python rather than its command line: the base model may be a GGUF or an
embedded model that only this pipeline's loader reads, the tokenizer must carry the Gemma template, and two calls
(with and without the chat template) share one loaded model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.benchmarks import LABELS, STAGES, checkpoint_identity, rows, table_markdown
from pipeline.core.checkpoint import require_checkpoint
from pipeline.core.cli import add_recipe_arguments, guarded, recipe_from
from pipeline.core.config import ConfigError, Recipe
from pipeline.core.errors import RunError
from pipeline.core.locations import REPO_ROOT, resolve_path
from pipeline.core.rundir import RunDir

TASK_FILE_SUFFIX = ".yaml"  # what the harness indexes in a folder
GENERATIVE = "generate_until"


class EvalError(RunError, RuntimeError):
    """A benchmark cannot run: an unknown task, a dataset that cannot be loaded, a model that is not there."""


# --------------------------------------------------------------------------------------------------------------
# Tasks: names of the harness or task files of the project
# --------------------------------------------------------------------------------------------------------------


class _TaskFileLoader(yaml.SafeLoader):
    """Reads a harness task file: its ``!function`` tags are kept as text (only the name is needed here)."""


_TaskFileLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def is_task_file(spec: str) -> bool:
    return spec.endswith(TASK_FILE_SUFFIX)


def task_file_name(path: Path) -> str:
    """The task (or group) a harness task file defines; ConfigError when it defines neither."""
    try:
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskFileLoader)
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: not a readable task file: {' '.join(str(e).split())}") from None
    name = cfg.get("task") if isinstance(cfg, dict) else None
    name = name if isinstance(name, str) else (cfg.get("group") if isinstance(cfg, dict) else None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{path}: a harness task file names its task (`task: name`) or group (`group: name`)")
    return name


@dataclass(frozen=True)
class TaskSpec:
    """One entry of ``eval.tasks``: the name results are reported under, and what the harness is given."""

    name: str  # the harness's name, or the task (or group) a task file defines
    file: Path | None = None


def task_specs(tasks: list[str]) -> list[TaskSpec]:
    out = []
    for entry in tasks:
        if is_task_file(entry):
            path = resolve_path(entry)
            if not path.is_file():
                raise ConfigError(f"eval.tasks: task file {entry!r} does not exist")
            out.append(TaskSpec(task_file_name(path), path))
        else:
            out.append(TaskSpec(entry))
    return out


def task_manager(specs: list[TaskSpec]) -> Any:
    """The harness's task index: its own tasks only when a name of the harness is asked for (indexing them all
    takes a while), plus the folders of the project's task files; a task file's task or group is then loaded by its
    name (a group file finds its tasks beside it)."""
    from lm_eval.tasks import TaskManager

    folders = sorted({str(s.file.parent) for s in specs if s.file is not None})
    return TaskManager(include_path=folders or None, include_defaults=any(s.file is None for s in specs))


def dataset_ids(tm: Any, name: str, seen: set[str] | None = None) -> list[str]:
    """The Hub datasets a task or group of the index reads (``path`` or ``path (name)``)."""
    seen = seen if seen is not None else set()
    entry = tm.task_index.get(name)
    if entry is None or name in seen:
        return []
    seen.add(name)
    cfg = entry.cfg or {}
    if cfg.get("dataset_path"):
        return [cfg["dataset_path"] + (f" ({cfg['dataset_name']})" if cfg.get("dataset_name") else "")]
    children = cfg.get("task") if isinstance(cfg.get("task"), list) else []
    ids = []
    for child in children:
        child_name = child if isinstance(child, str) else (child or {}).get("task")
        if isinstance(child_name, str):
            ids += [i for i in dataset_ids(tm, child_name, seen) if i not in ids]
    return ids


def load_tasks(tm: Any, specs: list[TaskSpec]) -> dict[str, dict[str, Any]]:
    """Every task built, its dataset loaded: ``{spec name: {leaf task name: Task}}``. EvalError, one line per task
    that cannot be built, naming its datasets."""
    import datasets

    datasets.disable_progress_bars()
    built, problems = {}, []
    for s in specs:
        if s.name not in tm.task_index:
            where = f"task file {s.file}" if s.file else "lm-evaluation-harness"
            problems.append(f"eval.tasks: {s.name!r} is not a task or group of {where}")
            continue
        try:
            built[s.name] = tm.load([s.name])["tasks"]
        except Exception as e:  # noqa: BLE001 - one line per task instead of the datasets/hub traceback
            ids = dataset_ids(tm, s.name) or ["(its dataset)"]
            problems.append(f"eval task {s.name}: dataset {', '.join(ids)} cannot be loaded: {_first_line(e)}")
            continue
        if not built[s.name]:
            problems.append(f"eval task {s.name}: it names no task")
    if not problems:
        try:  # together: the harness refuses a task asked for twice (``kobest`` and ``kobest_boolq``)
            tm.load([s.name for s in specs])
        except Exception as e:  # noqa: BLE001
            problems.append(f"eval.tasks: {_first_line(e)}")
    if problems:
        raise EvalError("\n".join(problems))
    return built


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def chat_template_for(output_type: str, policy: str) -> bool:
    """Whether a task of ``output_type`` is prompted with the chat template under ``eval.chat_template``."""
    return policy == "always" or (policy == "generative" and output_type == GENERATIVE)


# --------------------------------------------------------------------------------------------------------------
# Models: the base and each final checkpoint
# --------------------------------------------------------------------------------------------------------------


def stage_models(recipe: Recipe, asked: list[str] | None) -> dict[str, str]:
    """``{stage: location}`` of the models to evaluate, in STAGES order: the ones asked for (each must exist), or
    by default the base and every final checkpoint of the run that exists."""
    from pipeline.core.loading import model_location

    run = RunDir.of(recipe)
    wanted = asked or list(recipe.eval.stages)
    for name in wanted:
        if name not in STAGES:
            raise ConfigError(f"--stages: {name!r} is not one of {', '.join(STAGES)}")
    models = {}
    for name in STAGES:
        if name not in wanted:
            continue
        if name == "base":
            models[name] = model_location(recipe.model)
        elif run.stage(name).final.exists() or asked:
            models[name] = str(require_checkpoint(run.stage(name).final, f"the {name} checkpoint"))
    if not models:
        raise EvalError(f"no model to evaluate: none of {', '.join(wanted)} is in {run.root}")
    return models


def eval_dtype(recipe: Recipe) -> Any:
    """The precision the run trains in: bf16 on a GPU when ``run.precision`` asks for it or allows it."""
    import torch

    from pipeline.core.devices import precision

    return torch.bfloat16 if precision(recipe.run.precision)["bf16"] else torch.float32


def load_lm(recipe: Recipe, location: str | None, batch_size: int) -> Any:
    """The harness's HF model wrapper around a model loaded by this pipeline's loader (``location`` None: the
    recipe's base, with its revision and ``model.tokenizer``)."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from pipeline.core.loading import load_causal_lm, load_tokenizer

    dtype = eval_dtype(recipe)
    model = load_causal_lm(recipe.model, location, dtype=dtype, dropout_off=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    tokenizer = load_tokenizer(recipe.model, location)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)


# --------------------------------------------------------------------------------------------------------------
# Running and reading the harness
# --------------------------------------------------------------------------------------------------------------


def metrics_of(row: dict[str, Any]) -> dict[str, float]:
    """``{metric: value, metric_stderr: value}`` from a harness result row (keys ``acc,none``)."""
    out = {}
    for key, value in row.items():
        if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metric, filt = key.split(",", 1)
        out[metric if filt == "none" else f"{metric}[{filt}]"] = float(value)
    return out


def evaluate_model(recipe: Recipe, lm: Any, tm: Any, built: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every task on one model: ``{task: {metrics, n, num_fewshot, chat_template, output_type}}``. The harness is
    called once per chat-template setting, on the same loaded model. A group whose tasks all take the same setting
    is asked for by name (the harness aggregates it); one that mixes them (generative and multiple choice) is run
    task by task, each in its setting, and reported as the mean of its tasks' metrics."""
    from lm_eval import simple_evaluate

    cfg = recipe.eval
    template_of = {
        leaf: chat_template_for(task.OUTPUT_TYPE, cfg.chat_template)
        for leaves in built.values()
        for leaf, task in leaves.items()
    }
    calls: dict[bool, list[str]] = {True: [], False: []}
    for name, leaves in built.items():
        settings = {template_of[leaf] for leaf in leaves}
        asked = [name] if len(settings) == 1 else list(leaves)
        for spec in asked:
            setting = template_of[spec] if spec in template_of else next(iter(settings))
            calls[setting] += [spec] if spec not in calls[setting] else []
    found: dict[str, dict] = {}
    samples: dict[str, dict] = {}
    shots: dict[str, Any] = {}
    for template, specs in calls.items():
        if not specs:
            continue
        out = simple_evaluate(
            model=lm,
            tasks=specs,
            num_fewshot=cfg.num_fewshot,
            limit=cfg.limit,
            task_manager=tm,
            apply_chat_template=template,
            fewshot_as_multiturn=template,
            log_samples=False,
            # the stderr of a metric that is not a mean (KoBEST's f1) is bootstrapped: 1,000 resamples instead of
            # the harness's 100,000 (minutes per task on a CPU); the metrics themselves are the harness's
            bootstrap_iters=1000,
            # the harness's own default seeds (few-shot examples, sampling), so a hand run gives the same numbers
        )
        found.update(out["results"])
        samples.update(out.get("n-samples", {}))
        shots.update(out.get("n-shot", {}))
    results = {}
    for name, leaves in built.items():
        row = found.get(name) or (found.get(next(iter(leaves))) if len(leaves) == 1 else None)
        if not metrics_of(row or {}):  # a group the harness did not aggregate: its tasks' mean of each metric
            row = _mean_rows([found[leaf] for leaf in leaves if leaf in found])
        kinds = {task.OUTPUT_TYPE for task in leaves.values()}
        settings = sorted({template_of[leaf] for leaf in leaves})
        results[name] = {
            "metrics": metrics_of(row),
            "n": sum(int(samples.get(leaf, {}).get("effective", 0)) for leaf in leaves),
            "num_fewshot": {leaf: shots.get(leaf) for leaf in leaves},
            "chat_template": settings[0] if len(settings) == 1 else "per task",
            "output_type": GENERATIVE if GENERATIVE in kinds else sorted(kinds)[0],
        }
    return results


def _mean_rows(found: list[dict[str, Any]]) -> dict[str, Any]:
    """The unweighted mean of each metric over a group's tasks (no stderr: a mean of stderrs is not one)."""

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    keys = {k for r in found for k, v in r.items() if "," in k and "_stderr" not in k and number(v)}
    return {k: sum(r[k] for r in found if number(r.get(k))) / sum(number(r.get(k)) for r in found) for k in keys}


def earlier_tasks(path: Path, result: dict[str, Any]) -> dict[str, Any]:
    """The tasks of an earlier result file of the same checkpoint and settings (``make eval TASKS=...`` adds to it
    rather than dropping the other tasks); nothing when it is of another checkpoint or other settings."""
    if not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    same = old.get("checkpoint") == result["checkpoint"] and old.get("settings") == result["settings"]
    return dict(old.get("tasks", {})) if same else {}


def write_result(path: Path, result: dict[str, Any]) -> None:
    """``path`` written whole: a reader sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pending = path.with_name(f".{path.name}.tmp")
    pending.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(pending, path)


def run(recipe: Recipe, stages: list[str] | None = None, tasks: list[str] | None = None) -> dict[str, Any]:
    """Evaluate each model; returns ``{stage: result}`` (each also written to ``runs/<run>/eval/<stage>.json``)."""
    import dataclasses
    import logging

    import lm_eval

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task notices; the results are printed below
    if tasks:
        recipe = dataclasses.replace(recipe, eval=dataclasses.replace(recipe.eval, tasks=list(tasks)))
    if not recipe.eval.tasks:
        raise ConfigError("eval.tasks is empty: name the benchmarks in the recipe (or TASKS=...)")
    specs = task_specs(recipe.eval.tasks)
    models = stage_models(recipe, stages)
    _say(f"checking {len(specs)} task(s): {', '.join(s.name for s in specs)}")
    tm = task_manager(specs)
    built = load_tasks(tm, specs)
    run_dir = RunDir.of(recipe)
    results = {}
    for stage, location in models.items():
        _say(f"{LABELS[stage]}: {_shown(location)}")
        started = time.monotonic()
        lm = load_lm(recipe, None if stage == "base" else location, recipe.eval.batch_size)
        scores = evaluate_model(recipe, lm, tm, built)
        del lm
        _release_memory()
        result = {
            "stage": stage,
            "model": _shown(location),
            "checkpoint": checkpoint_identity(location),
            "tasks": scores,
            "settings": {
                "num_fewshot": recipe.eval.num_fewshot,
                "limit": recipe.eval.limit,
                "batch_size": recipe.eval.batch_size,
                "chat_template": recipe.eval.chat_template,
                "dtype": str(eval_dtype(recipe)).removeprefix("torch."),
            },
            "lm_eval_version": lm_eval.__version__,
            "seconds": round(time.monotonic() - started, 1),
        }
        result["tasks"] = {**earlier_tasks(run_dir.eval_result(stage), result), **scores}
        write_result(run_dir.eval_result(stage), result)
        results[stage] = result
    print(table_markdown(results), flush=True)
    track(recipe, results)
    return results


def _release_memory() -> None:
    """Free the evaluated model before the next one loads."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _shown(location: str) -> str:
    """A location as the user wrote it: relative to the repository when it is inside it."""
    try:
        return str(Path(location).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return location


def _say(line: str) -> None:
    print(f"[eval] {line}", flush=True)


# --------------------------------------------------------------------------------------------------------------
# Showing results: the table, the chart, W&B
# --------------------------------------------------------------------------------------------------------------


def track(recipe: Recipe, results: dict[str, dict[str, Any]]) -> None:
    """One W&B run for the benchmarks, in the run's group: ``eval/<stage>/<task>/<metric>`` in its summary and
    the table."""
    from pipeline.core.tracking import Tracker

    tracker = Tracker(recipe, "eval", is_main=True, extra_config={"eval_tasks": list(recipe.eval.tasks)})
    if not tracker.active:
        return
    for stage, result in results.items():
        for task, scores in result["tasks"].items():
            for metric, value in scores["metrics"].items():
                tracker.run.summary[f"eval/{stage}/{task}/{metric}"] = value
    table = rows(results)
    tracker.table(
        "eval/benchmarks",
        ["task", "metric", *results],
        [[t, m, *[v[s] for s in results]] for t, m, v in table],
        step=0,
    )
    tracker.finish()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Evaluate the run's models on lm-evaluation-harness tasks.")
    add_recipe_arguments(ap)
    ap.add_argument(
        "--stages", help=f"models to evaluate, space-separated, among {', '.join(STAGES)} (default: eval.stages)"
    )
    ap.add_argument("--tasks", help="comma-separated tasks instead of eval.tasks")
    args = ap.parse_intermixed_args(argv)
    stages = (args.stages or "").replace(",", " ").split() or None
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    return guarded("eval", lambda: run(recipe_from(args), stages, tasks))


if __name__ == "__main__":
    sys.exit(main())
