"""The run report: evidence that RLHF made the model better, by a measure the reward model cannot fake.

    make report RECIPE=recipes/tiny_ko.yaml
    python -m pipeline.report --recipe recipes/tiny_ko.yaml

Samples ``report.samples_per_prompt`` answers per held-out prompt (``data.prompts.eval``) from the SFT model and from
the PPO model with the same settings (temperature ``ppo.temperature``, top_k 0, top_p 1, at most
``ppo.response_length`` tokens, stopping at ``<end_of_turn>``), checks them with the recipe's ground-truth rule
(``report.ground_truth``) and scores them with the reward model; plots the SFT and RM losses and PPO's score, KL and
response length; and writes ``runs/<run>/report.md``, ``runs/<run>/report.json`` and the PNGs in
``runs/<run>/report/``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pipeline.atomic import IncompleteError, require_complete
from pipeline.config import ConfigError, Recipe, run_cli


def _trainer_history(stage_dir: Path) -> list[dict]:
    """The Trainer log history of a stage (from its newest resumable checkpoint)."""
    from pipeline.checkpoint import checkpoints

    ckpts = checkpoints(stage_dir / "checkpoints")
    if not ckpts:
        return []
    return json.loads((ckpts[-1] / "trainer_state.json").read_text(encoding="utf-8")).get("log_history", [])


def ground_truth_check(kind: str):
    """The rule for ``report.ground_truth``: (prompt, response, stopped) -> (property ok, arithmetic ok or None)."""
    if kind == "polite_korean":
        from data_prep.tiny_ko.rules import arithmetic_answer, is_arithmetic_correct, is_polite_korean

        def check(prompt: str, response: str, stopped: bool):
            if arithmetic_answer(prompt) is not None:
                return None, is_arithmetic_correct(prompt, response, stopped)
            return is_polite_korean(response, stopped), None

        return check
    return None


def sample_answers(
    model_dir: Path, prompts: list[list[int]], recipe: Recipe, seed: int
) -> list[list[tuple[str, bool]]]:
    """``samples_per_prompt`` sampled answers per prompt: (text up to the stop token, whether it stopped)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    stops = [eot, tok.eos_token_id]
    n = recipe.report.samples_per_prompt
    gen = GenerationConfig(
        do_sample=True,
        temperature=recipe.ppo.temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=recipe.ppo.response_length,
        eos_token_id=stops,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    out = []
    for ids in prompts:
        x = torch.tensor([ids] * n)
        with torch.no_grad():
            y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gen)
        answers = []
        for row in y[:, x.size(1) :].tolist():
            end = next((i for i, t in enumerate(row) if t in stops), None)
            answers.append(
                (tok.decode(row[:end] if end is not None else row, skip_special_tokens=True), end is not None)
            )
        out.append(answers)
    return out


def score_answers(rm_dir: Path, prompts: list[list[int]], answers: list[list[tuple[str, bool]]]) -> float:
    """Mean reward-model score of the answers (read at <end_of_turn>, as in training)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(rm_dir)
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    scores = []
    for ids, group in zip(prompts, answers):
        for text, stopped in group:
            seq = ids + tok(text, add_special_tokens=False)["input_ids"] + ([eot] if stopped else [])
            with torch.no_grad():
                scores.append(float(rm(input_ids=torch.tensor([seq])).logits[0, 0]))
    return sum(scores) / len(scores)


def _rate(values: list[bool | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def plots(run_dir: Path, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for stage, title in (("sft", "SFT loss"), ("rm", "Reward model loss")):
        hist = _trainer_history(run_dir / stage)
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
    metrics_path = run_dir / "ppo" / "metrics.jsonl"
    if metrics_path.is_file():
        rows = [json.loads(x) for x in metrics_path.read_text(encoding="utf-8").splitlines()]
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

    from pipeline.checkpoint import require_checkpoint

    run_dir = recipe.run_dir
    data_dir = require_complete(run_dir / "data", "the data stage output")
    sft_dir = require_checkpoint(run_dir / "sft" / "final", "the SFT checkpoint")
    rm_dir = require_checkpoint(run_dir / "rm" / "final", "the reward model")
    ppo_dir = require_checkpoint(run_dir / "ppo" / "final", "the PPO checkpoint")
    eval_path = data_dir / "prompts" / "eval.parquet"
    if not eval_path.is_file():
        raise ConfigError("the report needs held-out prompts: set data.prompts.eval")
    datasets.disable_progress_bars()
    held = datasets.Dataset.from_parquet(str(eval_path))
    prompts = list(held["prompt_ids"])
    texts = [json.loads(m)[-1]["content"] for m in held["messages"]]

    answers = {
        name: sample_answers(d, prompts, recipe, recipe.run.seed) for name, d in (("sft", sft_dir), ("ppo", ppo_dir))
    }
    result: dict[str, Any] = {}
    check = ground_truth_check(recipe.report.ground_truth)
    for name, groups in answers.items():
        if check is not None:
            checks = [check(p, text, stopped) for p, group in zip(texts, groups) for text, stopped in group]
            result[f"{name}_accuracy"] = _rate([c[0] for c in checks])
            arithmetic = _rate([c[1] for c in checks])
            if arithmetic is not None:
                result[f"{name}_arithmetic_accuracy"] = arithmetic
        result[f"{name}_rm_score"] = score_answers(rm_dir, prompts, groups)
        result[f"{name}_stop_rate"] = _rate([s for group in groups for _, s in group])
    stats = json.loads((rm_dir / "reward_stats.json").read_text(encoding="utf-8"))
    ppo_rows = [json.loads(x) for x in (run_dir / "ppo" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    last = ppo_rows[-10:]
    result["rm_accuracy"] = stats["accuracy"]
    result["ppo_kl"] = sum(r["objective/kl"] for r in last) / len(last)
    result["ppo_updates"] = len(ppo_rows)
    seconds = {"data": json.loads((data_dir / "manifest.json").read_text())["seconds"]}
    for stage, d in (("sft", sft_dir), ("rm", rm_dir)):
        seconds[stage] = json.loads((d / "lineage.json").read_text(encoding="utf-8"))["metrics"].get(
            "seconds_this_session"
        )
    seconds["ppo"] = round(sum(r["time/update"] for r in ppo_rows), 1)
    result["stage_seconds"] = seconds
    result["samples_per_prompt"] = recipe.report.samples_per_prompt
    result["heldout_prompts"] = len(prompts)
    result["ground_truth"] = recipe.report.ground_truth

    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    images = plots(run_dir, out)
    (run_dir / "report.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    add_to_card(ppo_dir / "README.md", result)
    (run_dir / "report.md").write_text(markdown(recipe, result, texts, answers, images), encoding="utf-8")
    print(
        f"[report] wrote {run_dir / 'report.md'}: "
        + ", ".join(f"{k} {v:.3f}" for k, v in result.items() if isinstance(v, float)),
        flush=True,
    )
    return result


CARD_SECTION = "## Evaluation on held-out prompts"


def add_to_card(card: Path, r: dict) -> None:
    """Put the report's before/after figures into the PPO model card (replacing an earlier report's), atomically."""
    text = card.read_text(encoding="utf-8")
    if CARD_SECTION in text:
        head, _, rest = text.partition(CARD_SECTION)
        after = rest.split("\n## ", 1)
        text = head + ("## " + after[1] if len(after) > 1 else "")
    rows = [
        f"| {label} | {r[f'sft_{key}']:.3f} | {r[f'ppo_{key}']:.3f} | {r[f'ppo_{key}'] - r[f'sft_{key}']:+.3f} |"
        for key, label in (
            ("accuracy", f"ground-truth rate ({r['ground_truth']})"),
            ("arithmetic_accuracy", "arithmetic correct"),
            ("rm_score", "reward-model score"),
        )
        if r.get(f"sft_{key}") is not None and r.get(f"ppo_{key}") is not None
    ]
    section = "\n".join(
        [
            CARD_SECTION,
            "",
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
    tmp = card.with_name(f".{card.name}.tmp")
    tmp.write_text(text.rstrip("\n") + "\n\n" + section, encoding="utf-8")
    tmp.replace(card)


def markdown(recipe: Recipe, r: dict, texts: list[str], answers: dict, images: list[str]) -> str:
    def fmt(v):
        return "n/a" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    lines = [f"# Run report: {recipe.run.name}", ""]
    lines += ["| measure | SFT | PPO |", "|---|---|---|"]
    if "sft_accuracy" in r:
        lines.append(
            f"| ground-truth rate ({r['ground_truth']}, held-out prompts) | {fmt(r['sft_accuracy'])} | "
            f"{fmt(r['ppo_accuracy'])} |"
        )
    if "sft_arithmetic_accuracy" in r:
        lines.append(
            f"| arithmetic correct (held-out problems) | {fmt(r['sft_arithmetic_accuracy'])} | "
            f"{fmt(r.get('ppo_arithmetic_accuracy'))} |"
        )
    lines.append(f"| mean reward-model score | {fmt(r['sft_rm_score'])} | {fmt(r['ppo_rm_score'])} |")
    lines.append(f"| answers ending with `<end_of_turn>` | {fmt(r['sft_stop_rate'])} | {fmt(r['ppo_stop_rate'])} |")
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
    lines += [f"![{name}](report/{name})" for name in images]
    lines += ["", "## Answers before and after PPO", "", "| prompt | SFT | PPO |", "|---|---|---|"]
    for i in range(min(recipe.report.examples, len(texts))):
        sft, ppo = answers["sft"][i][0][0], answers["ppo"][i][0][0]
        lines.append(f"| {texts[i]} | {sft.replace('|', '/')} | {ppo.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    return run_cli("report", "Write the run report.", run, argv, input_errors=(IncompleteError,))


if __name__ == "__main__":
    sys.exit(main())
