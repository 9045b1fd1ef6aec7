"""The run report: evidence that RLHF made the model better, by a measure the reward model cannot fake.

    make report RECIPE=recipes/tiny_ko.yaml
    python -m pipeline.report --recipe recipes/tiny_ko.yaml

Samples ``report.samples_per_prompt`` answers per held-out prompt (``data.prompts.eval``) from the SFT model and from
the PPO model with the same settings (temperature ``ppo.temperature``, top_k 0, top_p 1, at most
``ppo.response_length`` tokens, stopping at ``<end_of_turn>``), checks them with the recipe's ground-truth rule
(``report.ground_truth``) and scores the sampled ids with the reward model at their stop token, as PPO does; plots
the SFT and RM losses and PPO's score, KL and response length; and writes ``runs/<run>/report.md``,
``runs/<run>/report.json`` and the PNGs in ``runs/<run>/report/``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from data_prep.gemma_format import END_OF_TURN, stop_token_ids
from pipeline.core.checkpoint import require_checkpoint
from pipeline.core.cli import run_cli
from pipeline.core.config import ConfigError, Recipe
from pipeline.core.notices import replace_card_section
from pipeline.core.rundir import (
    IncompleteError,
    RewardStats,
    RunDir,
    data_output,
    lineage_metrics,
    read_metrics,
    trainer_history,
)
from pipeline.core.sampling import Generation, generate, left_pad, score

CARD_SECTION = "Evaluation on held-out prompts"


def ground_truth_check(kind: str):
    """The rule for ``report.ground_truth``: (prompt, response, stopped) -> {measure: ok, or None where the measure
    does not apply to the prompt}. ``accuracy`` is the rule itself; ``polite_on_topic`` also reports its two parts
    (``polite_accuracy``, ``on_topic_accuracy``); arithmetic prompts are measured apart (``arithmetic_accuracy``)."""
    if kind == "none":
        return None
    from data_prep.tiny_ko.rules import arithmetic_answer, is_arithmetic_correct, is_on_topic, is_polite_korean

    def check(prompt: str, response: str, stopped: bool) -> dict[str, bool | None]:
        if arithmetic_answer(prompt) is not None:
            return {"accuracy": None, "arithmetic_accuracy": is_arithmetic_correct(prompt, response, stopped)}
        polite = is_polite_korean(response, stopped)
        if kind == "polite_korean":
            return {"accuracy": polite}
        on_topic = is_on_topic(prompt, response, stopped)
        return {"accuracy": polite and on_topic, "polite_accuracy": polite, "on_topic_accuracy": on_topic}

    return check


def sample_answers(model_dir: Path, tok: Any, prompts: list[list[int]], recipe: Recipe, seed: int) -> list[Generation]:
    """``samples_per_prompt`` sampled answers per prompt, one Generation per prompt (the sampled ids kept). The
    samples of all prompts are drawn together, ``ppo.local_rollout_forward_batch_size`` rows per ``generate`` call."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    n = recipe.report.samples_per_prompt
    torch.manual_seed(seed)
    g = generate(
        model,
        left_pad([ids for ids in prompts for _ in range(n)], tok.pad_token_id, model.device),
        pad_id=tok.pad_token_id,
        stop_ids=stop_token_ids(tok),
        max_new_tokens=recipe.ppo.response_length,
        temperature=recipe.ppo.temperature,
        chunk=recipe.ppo.local_rollout_forward_batch_size,
    )
    rows = [slice(i * n, (i + 1) * n) for i in range(len(prompts))]
    return [g.rows(r) for r in rows]


def mean_score(rm_dir: Path, generations: list[Generation]) -> float:
    """Mean reward-model score of the sampled answers, read at each one's stop token (as PPO reads it)."""
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    scores = [float(x) for g in generations for x in score(rm, g)]
    return sum(scores) / len(scores)


def _rate(values: list[bool | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def plots(run: RunDir, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for stage, title in (("sft", "SFT loss"), ("rm", "Reward model loss")):
        hist = trainer_history(run.stage(stage))
        train = [(h["step"], h["loss"]) for h in hist if "loss" in h]
        ev = [(h["step"], h["eval_loss"]) for h in hist if "eval_loss" in h]
        if not train:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(*zip(*train), label="train")
        if ev:
            ax.plot(*zip(*ev), "o-", label="eval")
        ax.set(title=title, xlabel="optimizer step", ylabel="loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{stage}_loss.png", dpi=100)
        plt.close(fig)
        made.append(f"{stage}_loss.png")
    rows = read_metrics(run.stage("ppo"))
    if rows:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
        for ax, key, label in zip(
            axes,
            ("objective/scores", "objective/kl", "ppo/response_length"),
            ("score", "KL to the SFT model (nats per response)", "response length (tokens)"),
        ):
            ax.plot([r["update"] for r in rows], [r[key] for r in rows])
            ax.set(title=f"PPO {label}", xlabel="update")
        fig.tight_layout()
        fig.savefig(out / "ppo.png", dpi=100)
        plt.close(fig)
        made.append("ppo.png")
    return made


def run(recipe: Recipe) -> dict[str, Any]:
    import datasets
    from transformers import AutoTokenizer

    run_dir = RunDir.of(recipe)
    data = data_output(run_dir, "the data stage output")
    sft_dir = require_checkpoint(run_dir.stage("sft").final, "the SFT checkpoint")
    rm_dir = require_checkpoint(run_dir.stage("rm").final, "the reward model")
    ppo_dir = require_checkpoint(run_dir.stage("ppo").final, "the PPO checkpoint")
    eval_path = data.split("prompts", "eval")
    if eval_path is None:
        raise ConfigError("the report needs held-out prompts: set data.prompts.eval")
    datasets.disable_progress_bars()
    held = datasets.Dataset.from_parquet(str(eval_path))
    prompts = list(held["prompt_ids"])
    texts = [json.loads(m)[-1]["content"] for m in held["messages"]]

    tokenizer = AutoTokenizer.from_pretrained(data.tokenizer)  # the one every stage used
    generations = {
        name: sample_answers(d, tokenizer, prompts, recipe, recipe.run.seed)
        for name, d in (("sft", sft_dir), ("ppo", ppo_dir))
    }
    answers = {  # per prompt: (text before the stop token, whether it stopped) of each sample
        name: [list(zip(g.texts(tokenizer), g.stopped.tolist())) for g in gens] for name, gens in generations.items()
    }
    result: dict[str, Any] = {}
    check = ground_truth_check(recipe.report.ground_truth)
    for name, groups in answers.items():
        if check is not None:
            checks = [check(p, text, stopped) for p, group in zip(texts, groups) for text, stopped in group]
            for measure in dict.fromkeys(k for c in checks for k in c):  # in the rule's order
                rate = _rate([c.get(measure) for c in checks])
                if rate is not None or measure == "accuracy":
                    result[f"{name}_{measure}"] = rate
        result[f"{name}_rm_score"] = mean_score(rm_dir, generations[name])
        result[f"{name}_stop_rate"] = _rate([s for group in groups for _, s in group])
    ppo_rows = read_metrics(run_dir.stage("ppo"))
    last = ppo_rows[-10:]
    result["rm_accuracy"] = RewardStats.read(rm_dir).accuracy
    result["ppo_kl"] = sum(r["objective/kl"] for r in last) / len(last)
    result["ppo_updates"] = len(ppo_rows)
    seconds = {"data": data.manifest.seconds}
    for stage, d in (("sft", sft_dir), ("rm", rm_dir)):
        seconds[stage] = lineage_metrics(d).get("seconds_this_session")
    seconds["ppo"] = round(sum(r["time/update"] for r in ppo_rows), 1)
    result["stage_seconds"] = seconds
    result["samples_per_prompt"] = recipe.report.samples_per_prompt
    result["heldout_prompts"] = len(prompts)
    result["ground_truth"] = recipe.report.ground_truth

    run_dir.report_images.mkdir(parents=True, exist_ok=True)
    images = plots(run_dir, run_dir.report_images)
    run_dir.report_json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    replace_card_section(ppo_dir, CARD_SECTION, card_section(result))
    run_dir.report_md.write_text(markdown(recipe, run_dir, result, texts, answers, images), encoding="utf-8")
    print(
        f"[report] wrote {run_dir.report_md}: "
        + ", ".join(f"{k} {v:.3f}" for k, v in result.items() if isinstance(v, float)),
        flush=True,
    )
    return result


PARTS = [("polite_accuracy", "polite Korean (part of the rule)"), ("on_topic_accuracy", "on topic (part of the rule)")]


def card_section(r: dict) -> str:
    """The report's before/after figures for the PPO model card."""
    rows = [
        f"| {label} | {r[f'sft_{key}']:.3f} | {r[f'ppo_{key}']:.3f} | {r[f'ppo_{key}'] - r[f'sft_{key}']:+.3f} |"
        for key, label in (
            ("accuracy", f"ground-truth rate ({r['ground_truth']})"),
            *PARTS,
            ("arithmetic_accuracy", "arithmetic correct"),
            ("rm_score", "reward-model score"),
        )
        if r.get(f"sft_{key}") is not None and r.get(f"ppo_{key}") is not None
    ]
    return "\n".join(
        [
            f"{r['heldout_prompts']} held-out prompts, {r['samples_per_prompt']} "
            "sampled answers each; reward-model held-out accuracy "
            f"{r['rm_accuracy']:.3f}; KL to the SFT model {r['ppo_kl']:.3f}.",
            "",
            "| measure | SFT | PPO | change |",
            "|---|---|---|---|",
            *rows,
            "",
        ]
    )


def cell(text: str, stopped: bool) -> str:
    """An answer as one markdown table cell: a newline the model wrote shows as ⏎ (it would end the row), a pipe is
    escaped, and an answer that never ended its turn says so."""
    body = text.replace("|", "\\|").replace("\r", "").replace("\n", " ⏎ ")
    return body + ("" if stopped else f" *(no `{END_OF_TURN}`)*")


def markdown(recipe: Recipe, run_dir: RunDir, r: dict, texts: list[str], answers: dict, images: list[str]) -> str:
    def fmt(v):
        return "n/a" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    lines = [f"# Run report: {recipe.run.name}", ""]
    lines += ["| measure | SFT | PPO |", "|---|---|---|"]
    if "sft_accuracy" in r:
        lines.append(
            f"| ground-truth rate ({r['ground_truth']}, held-out prompts) | {fmt(r['sft_accuracy'])} | "
            f"{fmt(r['ppo_accuracy'])} |"
        )
    for key, label in PARTS:
        if f"sft_{key}" in r:
            lines.append(f"| {label} | {fmt(r[f'sft_{key}'])} | {fmt(r.get(f'ppo_{key}'))} |")
    if "sft_arithmetic_accuracy" in r:
        lines.append(
            f"| arithmetic correct (held-out problems) | {fmt(r['sft_arithmetic_accuracy'])} | "
            f"{fmt(r.get('ppo_arithmetic_accuracy'))} |"
        )
    lines.append(f"| mean reward-model score | {fmt(r['sft_rm_score'])} | {fmt(r['ppo_rm_score'])} |")
    lines.append(f"| answers ending with `{END_OF_TURN}` | {fmt(r['sft_stop_rate'])} | {fmt(r['ppo_stop_rate'])} |")
    lines += [
        "",
        f"{r['heldout_prompts']} held-out prompts (never in any training data), {r['samples_per_prompt']} "
        f"sampled answers each per model, temperature {recipe.ppo.temperature}, top_k 0, top_p 1.",
        "",
        f"- Reward model held-out pairwise accuracy: {fmt(r['rm_accuracy'])}",
        f"- PPO KL to the SFT model (mean of the last 10 updates, nats per response): {fmt(r['ppo_kl'])}",
        f"- PPO updates: {r['ppo_updates']}",
        "- Stage seconds: " + ", ".join(f"{k} {v}" for k, v in r["stage_seconds"].items()),
        "",
    ]
    images_dir = run_dir.report_images.relative_to(run_dir.root)
    lines += [f"![{name}]({images_dir.as_posix()}/{name})" for name in images]
    lines += ["", "## Answers before and after PPO", "", "| prompt | SFT | PPO |", "|---|---|---|"]
    for i in range(min(recipe.report.examples, len(texts))):
        lines.append(f"| {cell(texts[i], True)} | {cell(*answers['sft'][i][0])} | {cell(*answers['ppo'][i][0])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    return run_cli("report", "Write the run report.", run, argv, input_errors=(IncompleteError,))


if __name__ == "__main__":
    sys.exit(main())
