"""Benchmark results of ``make eval`` (``runs/<run>/eval/<stage>.json``) as the report and the console show them:
which results belong to the current checkpoints, each task's headline metric, the table and the chart."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pipeline.core.rundir import RunDir, is_complete, read_marker

STAGES = ("base", "sft", "ppo", "dpo")
LABELS = {"base": "base", "sft": "SFT", "ppo": "PPO", "dpo": "DPO"}


def checkpoint_identity(location: str) -> str:
    """What names a checkpoint's version: its completion time (a retrained stage has a new one), or its location
    for a model this pipeline did not write."""
    return str(read_marker(location).get("finished_at")) if is_complete(location) else location


def headline(task: dict[str, Any]) -> tuple[str, float] | None:
    """The metric a task is compared by: ``acc`` for multiple choice (``acc_norm``, per byte, stays in the result
    files), ``exact_match`` for short answers, else the first one reported."""
    metrics = {k: v for k, v in task["metrics"].items() if not k.endswith("_stderr") and "_stderr[" not in k}
    for key in ("acc", "acc_norm", "exact_match"):
        if key in metrics:
            return key, metrics[key]
    first = next(iter(sorted(metrics)), None)
    return (first, metrics[first]) if first else None


def rows(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, dict[str, float | None]]]:
    """(task, metric, {stage: value}) for every task any result has, in the order results list them."""
    tasks: list[str] = []
    for r in results.values():
        tasks += [t for t in r["tasks"] if t not in tasks]
    out = []
    for task in tasks:
        metric = next(
            (h[0] for r in results.values() if task in r["tasks"] if (h := headline(r["tasks"][task]))), None
        )
        if metric is None:
            continue
        values = {s: r["tasks"].get(task, {}).get("metrics", {}).get(metric) for s, r in results.items()}
        out.append((task, metric, values))
    return out


def table_markdown(results: dict[str, dict[str, Any]]) -> str:
    stages = list(results)
    head = "| task | metric | " + " | ".join(LABELS.get(s, s) for s in stages) + " |"
    lines = [head, "|" + "---|" * (len(stages) + 2)]
    for task, metric, values in rows(results):
        cells = " | ".join("–" if values[s] is None else f"{values[s]:.3f}" for s in stages)
        lines.append(f"| {task} | {metric} | {cells} |")
    return "\n".join(lines)


def read_results(recipe: Any, say: Any = print) -> dict[str, dict[str, Any]]:
    """The results under ``runs/<run>/eval/`` whose checkpoint is still the stage's current one (in STAGES
    order); one of a checkpoint trained again since is left out, and said."""
    from pipeline.core.loading import model_location

    run = RunDir.of(recipe)
    out = {}
    for stage in STAGES:
        path = run.eval_result(stage)
        if not path.is_file():
            continue
        result = json.loads(path.read_text(encoding="utf-8"))
        location = model_location(recipe.model) if stage == "base" else str(run.stage(stage).final)
        now = checkpoint_identity(location) if stage == "base" or is_complete(location) else None
        if now != result.get("checkpoint"):
            say(f"{path} is of an earlier {LABELS[stage]} checkpoint; left out (run `make eval` again)")
            continue
        out[stage] = result
    return out


def summary(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{stage: {task: {metric: value}}}``: what report.json keeps of the results."""
    return {s: {t: dict(v["metrics"]) for t, v in r["tasks"].items()} for s, r in results.items()}


def report_section(results: dict[str, dict[str, Any]], run: RunDir, chart: str | None) -> str:
    """The report's benchmark section: the table and the chart, or a line saying how to get them."""
    lines = ["", "## Benchmarks (lm-evaluation-harness, `make eval`)", ""]
    if not results:
        return "\n".join([*lines, "No results of these checkpoints yet: run `make eval`.", ""])
    described = {stage: how_run(r) for stage, r in results.items()}
    if len(set(described.values())) == 1:
        lines += [next(iter(described.values())), ""]
    else:  # not run alike: each column says how it was run
        lines += [f"- {LABELS.get(s, s)}: {d}" for s, d in described.items()] + [""]
    lines += [table_markdown(results), ""]
    if chart:
        lines += [f"![benchmarks]({run.report_images.relative_to(run.root).as_posix()}/{chart})", ""]
    return "\n".join(lines)


def how_run(result: dict[str, Any]) -> str:
    """One sentence on how a result was made: items per task, limit, few-shot, chat template, harness version."""
    settings = result["settings"]
    limit = f", the first {settings['limit']} items of each task" if settings.get("limit") else ""
    n = ", ".join(f"{t} {v['n']}" for t, v in result["tasks"].items())
    shots = settings.get("num_fewshot")
    shots = "each task's default" if shots is None else shots
    return (
        f"Items: {n}{limit}; few-shot: {shots}; chat template for {settings.get('chat_template')} tasks; "
        f"{settings.get('dtype')}; lm-eval {result.get('lm_eval_version')}."
    )


def plot(results: dict[str, dict[str, Any]], out: Path) -> str | None:
    """A bar chart of each task's headline metric per model; the file name, or None with nothing to show."""
    table = rows(results)
    if not table:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(results)
    width = 0.8 / len(stages)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(table)), 3.4))
    for i, stage in enumerate(stages):
        xs = [k + i * width for k in range(len(table))]
        ys = [math.nan if v[stage] is None else v[stage] for _, _, v in table]  # a missing value draws no bar
        ax.bar(xs, ys, width, label=LABELS.get(stage, stage))
    ax.set_xticks([k + width * (len(stages) - 1) / 2 for k in range(len(table))])
    ax.set_xticklabels([f"{t}\n{m}" for t, m, _ in table], fontsize=8)
    top = max((x for _, _, v in table for x in v.values() if x is not None), default=1.0)
    ax.set_ylim(0, max(1.0, top * 1.05))
    ax.set_title("Benchmarks (lm-evaluation-harness)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "benchmarks.png", dpi=100)
    plt.close(fig)
    return "benchmarks.png"
