"""The run report: every model the run trained (SFT, and PPO and DPO where they ran) compared on the same held-out
prompts, by a measure the reward model cannot fake where the recipe has one.

    make report RECIPE=recipes/tiny_ko.yaml
    python -m pipeline.report --recipe recipes/tiny_ko.yaml

The models compared are the SFT checkpoint and each later stage whose final checkpoint is in the run folder (PPO,
DPO; at least one of them). Samples ``report.samples_per_prompt`` answers per held-out prompt (the data stage's
prompts eval split: given as ``data.prompts.eval`` or held out of ``data.prompts.train`` by
``data.prompts.eval_fraction``) from each model with the same settings and the same seed (temperature
``ppo.temperature``, top_k 0, top_p 1, at most ``ppo.response_length`` tokens, stopping at ``<end_of_turn>``), on the
accelerator in bf16 when there is one (``sampling_device``). The answers are checked with the recipe's ground-truth
rule (``report.ground_truth``, when it has one), described by the Korean answer measures (pipeline/core/korean.py),
and, when the run has a reward model, the sampled ids are scored with it at their stop token, as PPO does; that score
is the reward model's view, what PPO optimised, not evidence of quality. Held-out prompts are checked against every
training prompt (``heldout_overlap``) and the report says how many were trained on. It names the PPO estimator that
ran (from the PPO checkpoint's lineage), plots the measures per model, the SFT, RM and DPO losses and PPO's score,
KL and response length, and writes ``runs/<run>/report.md``, ``runs/<run>/report.json`` (``<model>_<measure>`` keys
per model) and the PNGs in ``runs/<run>/report/``.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from data_prep import overlap
from data_prep.gemma_format import END_OF_TURN, stop_token_ids
from pipeline.core import benchmarks, starts
from pipeline.core.checkpoint import require_checkpoint
from pipeline.core.cli import run_cli
from pipeline.core.config import ConfigError, Recipe
from pipeline.core.korean import korean_metrics
from pipeline.core.loading import load_causal_lm, load_sequence_classifier
from pipeline.core.locations import resolve_path
from pipeline.core.notices import replace_card_section
from pipeline.core.reward_stats import RewardStats
from pipeline.core.rundir import (
    REPORT_LOCK,
    DataOutput,
    IncompleteError,
    RunDir,
    data_output,
    is_complete,
    lineage_metrics,
    lineage_recipe,
    read_marker,
    read_metrics,
    trainer_history,
)
from pipeline.core.sampling import Generation, generate, left_pad, score
from pipeline.core.topology import Topology
from pipeline.core.writer import wait_until, writer_lock

# The models a report can compare, in column order: the SFT model, then the stages trained from it.
METHODS = {"sft": "SFT", "ppo": "PPO", "dpo": "DPO"}
CARD_SECTION = "Evaluation on held-out prompts"
NO_HELDOUT = (
    "the report needs held-out prompts, and {path} has no prompts eval split: set data.prompts.eval (prompts that no "
    "training file contains) or data.prompts.eval_fraction (a share of data.prompts.train held out by prompt), then "
    "re-run `make data`"
)

# --------------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------------

Answer = tuple[str, bool, int]  # text before the stop token, ended its turn on <end_of_turn>, length in tokens


@dataclass(frozen=True)
class ModelResult:
    """One model's answers to the held-out prompts and what they measure. A rate is None where there is nothing to
    measure: no rule (``report.ground_truth: none``), or no prompt the measure applies to."""

    answers: list[list[Answer]]  # per held-out prompt, its report.samples_per_prompt answers
    stop_rate: float  # share of the answers that ended their turn
    korean: dict[str, float | None]  # the Korean answer measures: pipeline/core/korean.py's, without "korean/"
    accuracy: float | None = None  # the rule, over the prompts it applies to (all but arithmetic ones)
    polite_accuracy: float | None = None  # polite_on_topic's parts: polite Korean,
    on_topic_accuracy: float | None = None  # and naming the prompt's subject
    arithmetic_accuracy: float | None = None  # arithmetic prompts, measured apart from the rule
    rm_score: float | None = None  # mean reward-model score (None: the run has no reward model)

    @property
    def judged(self) -> bool:
        """Whether a ground-truth rule judged the answers: it gives every prompt a rate (arithmetic's, or its own)."""
        rates = (self.accuracy, self.polite_accuracy, self.on_topic_accuracy, self.arithmetic_accuracy)
        return any(rate is not None for rate in rates)


@dataclass(frozen=True)
class RewardModelFacts:
    accuracy: float | None  # held-out pairwise accuracy, from its reward statistics (None where they have none)


@dataclass(frozen=True)
class PPOFacts:
    """What the PPO run ran with (its checkpoint's lineage: what ran, whatever the recipe now says) and logged."""

    kl: float | None  # mean KL to the SFT model over the last 10 updates, nats per response
    updates: int
    estimator: str
    num_generations: int  # samples per prompt
    kl_penalty: str  # where the KL acted: "reward" (a per-token penalty) or a loss term


@dataclass(frozen=True)
class DPOFacts:
    """What the DPO run ran with (its checkpoint's lineage) and logged."""

    method: str | None
    beta: float | None
    loss_type: str | None
    steps: int | None
    eval_reward_accuracy: float | None  # held-out implicit-reward accuracy: chosen above rejected


@dataclass(frozen=True)
class Report:
    """Everything the report says: the renderers read it as is, ``flatten`` turns it into report.json's keys."""

    models: dict[str, ModelResult]  # each model compared, in METHODS order (SFT first)
    ground_truth: str  # report.ground_truth: the rule, or "none"
    samples_per_prompt: int
    heldout_prompts: int
    heldout_overlap: dict[str, int]  # held-out prompts also a user turn of a training row, per overlap.OVERLAP_SOURCES
    heldout_overlap_any: int  # held-out prompts in any of them
    stage_seconds: dict[str, float | None]
    models_compared: dict[str, str]  # each final's completion time: which checkpoints were compared
    rm: RewardModelFacts | None = None  # None: the run has no reward model
    ppo: PPOFacts | None = None  # None: PPO did not run
    dpo: DPOFacts | None = None  # None: DPO did not run
    start: str = "SFT"  # the first column's name: SFT, or the start model's (ppo.init_from, dpo.init_from)


# --------------------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------------------


def run(recipe: Recipe, launch: Topology | None = None) -> dict[str, Any]:
    """Write the report (one writer: the report lock; on a multi-machine run machine 0, the others wait for its
    report.json on the same checkpoints) and return what report.json holds."""
    run_dir = RunDir.of(recipe)
    timeout = recipe.launch.wait_minutes * 60
    if launch is not None and launch.machine_rank > 0:
        return written_by_machine_0(recipe, run_dir, timeout)
    with writer_lock(run_dir.root / REPORT_LOCK, str(run_dir.report_md), timeout, _say):
        return write_report(recipe, run_dir)


def written_by_machine_0(recipe: Recipe, run_dir: RunDir, timeout: float) -> dict[str, Any]:
    """Wait for machine 0's report.json on the checkpoints this machine sees, and return it."""
    wanted = models_identity(compared_models(recipe, run_dir))

    def written() -> bool:
        try:
            return json.loads(run_dir.report_json.read_text(encoding="utf-8")).get("models_compared") == wanted
        except (OSError, ValueError):
            return False

    wait_until(
        written, f"machine 0 to write {run_dir.report_json} on the checkpoints this machine sees", timeout, _say
    )
    _say(f"{run_dir.report_md} written by machine 0")
    return json.loads(run_dir.report_json.read_text(encoding="utf-8"))


def write_report(recipe: Recipe, run_dir: RunDir) -> dict[str, Any]:
    """The report, step by step; returns what report.json holds."""
    import datasets
    from transformers import AutoTokenizer

    # 1. What is compared: the held-out prompts, each model's final checkpoint, the reward model (when there is one)
    data = data_output(run_dir, "the data stage output")
    eval_path = data.split("prompts", "eval")
    if eval_path is None:
        raise ConfigError(NO_HELDOUT.format(path=data.path))
    finals = compared_models(recipe, run_dir)
    rm_dir = reward_model(recipe, run_dir, finals)
    datasets.disable_progress_bars()
    held = datasets.Dataset.from_parquet(str(eval_path))
    prompts = list(held["prompt_ids"])
    texts = [json.loads(m)[-1]["content"] for m in held["messages"]]
    tokenizer = AutoTokenizer.from_pretrained(data.tokenizer)  # the one every stage used

    # 2. Measure: every model sampled alike, scored by the reward model, judged by the rule, described in Korean terms
    models = measure_models(recipe, finals, rm_dir, tokenizer, prompts, texts)

    # 3. Held-out overlap: how many held-out prompts some training row also asks
    overlap, overlap_any = heldout_overlap(data, tokenizer, texts)

    # 4. The report: the measures, what the later stages ran with, and the run's facts
    report = Report(
        models=models,
        ground_truth=recipe.report.ground_truth,
        samples_per_prompt=recipe.report.samples_per_prompt,
        heldout_prompts=len(prompts),
        heldout_overlap=overlap,
        heldout_overlap_any=overlap_any,
        stage_seconds=stage_seconds(recipe, run_dir, data, finals, rm_dir),
        models_compared=models_identity(finals),
        rm=RewardModelFacts(reward_model_accuracy(rm_dir)) if rm_dir is not None else None,
        ppo=ppo_facts(recipe, run_dir, finals["ppo"]) if "ppo" in finals else None,
        dpo=dpo_facts(recipe, finals["dpo"]) if "dpo" in finals else None,
        start=f"start ({recipe.start_model})" if recipe.start_model else "SFT",
    )

    # 5. Render: the plots, each later model's card section, report.md
    run_dir.report_images.mkdir(parents=True, exist_ok=True)
    images = plots(run_dir, run_dir.report_images, report)
    for name, final in finals.items():
        if name in ("ppo", "dpo"):  # this run's models (a compared checkpoint of another run keeps its card)
            replace_card_section(final, CARD_SECTION, card_section(report, name))
    bench = benchmarks.read_results(recipe, _say)  # make eval's results, of these checkpoints
    chart = benchmarks.plot(bench, run_dir.report_images)
    md = markdown(recipe, run_dir, report, texts, images) + benchmarks.report_section(bench, run_dir, chart)
    run_dir.report_md.write_text(md, encoding="utf-8")

    # 6. report.json last, whole (written aside, then renamed): what another machine waits for
    saved = {**flatten(report), "benchmarks": benchmarks.summary(bench)}
    pending = run_dir.report_json.with_name(f".{run_dir.report_json.name}.tmp")
    pending.write_text(json.dumps(saved, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(pending, run_dir.report_json)
    _say(f"wrote {run_dir.report_md}: " + ", ".join(f"{k} {v:.3f}" for k, v in saved.items() if isinstance(v, float)))
    return saved


def _say(line: str) -> None:
    print(f"[report] {line}", flush=True)


def compared_models(recipe: Recipe, run_dir: RunDir) -> dict[str, Path | str]:
    """The checkpoint of each model the report compares: first the one the run's preference stages started from
    (key ``sft``: the SFT checkpoint, or the start model of ``ppo.init_from``/``dpo.init_from``), then each later stage
    (PPO, DPO) whose final checkpoint is in the run folder, then the checkpoints of ``report.compare`` that exist
    (one that does not is skipped, and said). A final that is there but unfinished, or without its notices, is an
    error rather than a column silently left out; with neither PPO nor DPO there is nothing to compare the start
    with."""
    start = starts.policy_start(recipe, "ppo" if recipe.ppo.init_from or not recipe.dpo.init_from else "dpo")
    finals: dict[str, Path | str] = {"sft": start.location}
    for name, label in METHODS.items():
        if name != "sft" and run_dir.stage(name).final.exists():
            finals[name] = require_checkpoint(run_dir.stage(name).final, f"the {label} checkpoint")
    if len(finals) == 1:
        raise IncompleteError(
            f"nothing to compare {start.what} with: neither {run_dir.stage('ppo').final} nor "
            f"{run_dir.stage('dpo').final} exists; run `make ppo` or `make dpo` first"
        )
    for label, path in recipe.report.compare.items():
        folder = resolve_path(path)
        if folder.exists():
            finals[label] = require_checkpoint(folder, f"report.compare.{label}")
        else:
            _say(f"report.compare.{label}: {path} does not exist; left out of the comparison (train it to include it)")
    return finals


def reward_model(recipe: Recipe, run_dir: RunDir, finals: dict[str, Path | str]) -> Path | None:
    """The reward model, required when PPO ran with one (it is what PPO optimised); otherwise used when it is there,
    else None (a DPO-only run, or PPO on reward functions alone: the rule does not read it)."""
    final = run_dir.stage("rm").final
    if ("ppo" in finals and recipe.ppo.uses_reward_model) or final.exists():
        return require_checkpoint(final, "the reward model")
    return None


def models_identity(finals: dict[str, Path | str]) -> dict[str, str]:
    """Which checkpoints a report compared: each final's completion time, from its marker (a retrained stage has a
    new one; a start model this pipeline did not write: its location). A machine other than machine 0 waits for a
    report.json that names the checkpoints it sees."""
    return {
        name: str(read_marker(final).get("finished_at")) if is_complete(final) else str(final)
        for name, final in finals.items()
    }


# --------------------------------------------------------------------------------------------------------------
# Measure: sample answers per model, score them, rates and Korean measures
# --------------------------------------------------------------------------------------------------------------


def measure_models(
    recipe: Recipe,
    finals: dict[str, Path],
    rm_dir: Path | None,
    tokenizer: Any,
    prompts: list[list[int]],
    texts: list[str],
) -> dict[str, ModelResult]:
    """Each model's ``ModelResult`` on the held-out prompts (``prompts``: their ids, ``texts``: their last user
    turn): the same prompts, settings and seed for every model, so the columns differ only by the model."""
    device, dtype = sampling_device()
    _say(
        f"comparing {', '.join(METHODS.get(m, m) for m in finals)}; sampling and scoring on {device} "
        f"({str(dtype).removeprefix('torch.')})"
    )
    generations = {name: sample_answers(d, tokenizer, prompts, recipe, recipe.run.seed) for name, d in finals.items()}
    answers = {name: per_prompt(g, tokenizer, recipe.report.samples_per_prompt) for name, g in generations.items()}
    rm_scores = mean_scores(recipe, rm_dir, generations) if rm_dir is not None else {}
    return measures(recipe.report.ground_truth, texts, answers, rm_scores)


def sampling_device() -> tuple[str, Any]:
    """``(device, dtype)`` the report samples and scores on: the GPU when CUDA is available, in bf16 where it is
    supported and fp32 elsewhere; else the CPU in fp32 (bf16 on a CPU is slower than fp32 and changes the samples for
    nothing)."""
    import torch

    if torch.cuda.is_available():  # a GPU without bf16 (T4, V100) still samples far faster than the CPU, in fp32
        return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return "cpu", torch.float32


def sample_answers(model_dir: Path, tok: Any, prompts: list[list[int]], recipe: Recipe, seed: int) -> Generation:
    """``samples_per_prompt`` sampled answers per prompt, the samples of prompt ``i`` in rows ``i * n`` to
    ``(i + 1) * n - 1`` (the sampled ids kept, on the sampling device). All prompts' samples are drawn together,
    ``ppo.local_rollout_forward_batch_size`` rows per decoding batch."""
    import torch

    device, dtype = sampling_device()
    model = load_causal_lm(recipe.model, str(model_dir), dtype=dtype).to(device).eval()
    n = recipe.report.samples_per_prompt
    torch.manual_seed(seed)
    return generate(
        model,
        left_pad([ids for ids in prompts for _ in range(n)], tok.pad_token_id, device),
        pad_id=tok.pad_token_id,
        stop_ids=stop_token_ids(tok),
        max_new_tokens=recipe.ppo.response_length,
        temperature=recipe.ppo.temperature,
        chunk=recipe.ppo.local_rollout_forward_batch_size,
    )


def per_prompt(g: Generation, tokenizer: Any, n: int) -> list[list[Answer]]:
    """Per prompt, its ``n`` answers. An answer that stopped on ``<eos>`` did not end its turn (as in PPO)."""
    rows = list(zip(g.texts(tokenizer), g.ended_on(stop_token_ids(tokenizer)[0]), (g.seq_len + 1).tolist()))
    return [rows[i : i + n] for i in range(0, len(rows), n)]


def mean_scores(recipe: Recipe, rm_dir: Path, generations: dict[str, Generation]) -> dict[str, float]:
    """Mean reward-model score of each model's sampled ids, read at each answer's stop token (as PPO reads it); the
    reward model loaded once, on the sampling device and dtype, scoring in batches."""
    device, dtype = sampling_device()
    rm = load_sequence_classifier(recipe.model, str(rm_dir), dtype=dtype).to(device).eval()
    chunk = recipe.ppo.local_rollout_forward_batch_size
    return {name: float(score(rm, g, chunk).float().mean()) for name, g in generations.items()}


def measures(
    ground_truth: str, texts: list[str], answers: dict[str, list[list[Answer]]], rm_scores: dict[str, float]
) -> dict[str, ModelResult]:
    """Each model's ``ModelResult`` (``sft``, ``ppo``, ``dpo``: the keys of ``answers``): the ground-truth rates when
    the recipe has a rule, the mean reward-model score when ``rm_scores`` has the model (a run without a reward model
    has none), the stop rate and the Korean answer measures."""
    check = ground_truth_check(ground_truth)
    results = {}
    for name, groups in answers.items():
        flat = [a for group in groups for a in group]
        rates: dict[str, float | None] = {}
        if check is not None:
            checks = [check(p, text, ended) for p, group in zip(texts, groups) for text, ended, _ in group]
            rates = {measure: _rate([c.get(measure) for c in checks]) for measure in {k for c in checks for k in c}}
        results[name] = ModelResult(
            answers=groups,
            stop_rate=_rate([ended for _, ended, _ in flat]),
            korean={k.split("/", 1)[1]: v for k, v in korean_metrics(flat).items()},
            rm_score=rm_scores.get(name),
            **rates,
        )
    return results


def ground_truth_check(kind: str):
    """The rule for ``report.ground_truth``: (prompt, response, stopped: whether the answer ended its turn on
    ``<end_of_turn>``) -> {measure: ok, or None where the measure does not apply to the prompt}, each measure a
    ``ModelResult`` rate. ``accuracy`` is the rule itself; ``polite_on_topic`` also reports its two parts
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


def _rate(values: list[bool | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


# --------------------------------------------------------------------------------------------------------------
# What the later stages ran with
# --------------------------------------------------------------------------------------------------------------


def heldout_overlap(data: DataOutput, tokenizer: Any, heldout: list[str]) -> tuple[dict[str, int], int]:
    """``data_prep.overlap.heldout_overlap`` on a finished data folder (the count the data stage also records)."""
    return overlap.heldout_overlap(data.path, tokenizer, heldout)


def reward_model_accuracy(rm_dir: Path) -> float | None:
    stats = RewardStats.read(rm_dir)
    return stats.accuracy if stats is not None else None


def ppo_facts(recipe: Recipe, run_dir: RunDir, final: Path) -> PPOFacts:
    """The estimator (a lineage from before ``ppo.estimator`` is GAE's), samples per prompt, where the KL acted, the
    mean KL of the last 10 updates and the update count."""
    ran = trained_with(final, "ppo", recipe.ppo)
    rows = read_metrics(run_dir.stage("ppo"))
    last = rows[-10:]
    return PPOFacts(
        kl=sum(row["objective/kl"] for row in last) / len(last) if last else None,
        updates=len(rows),
        estimator=ran.get("estimator", "gae"),
        num_generations=ran.get("num_generations", 1),
        kl_penalty=ran.get("kl_penalty", "reward"),
    )


def dpo_facts(recipe: Recipe, final: Path) -> DPOFacts:
    """Method, beta, loss, steps and the held-out implicit-reward accuracy."""
    ran = trained_with(final, "dpo", recipe.dpo)
    metrics = lineage_metrics(final)
    return DPOFacts(
        method=ran.get("method"),
        beta=ran.get("beta"),
        loss_type=ran.get("loss_type"),
        steps=metrics.get("steps"),
        eval_reward_accuracy=metrics.get("eval/rewards/accuracies"),
    )


def trained_with(final: Path, section: str, current: Any) -> dict:
    """The recipe section a checkpoint was trained with, from its lineage (what ran, whatever the recipe now says);
    the current recipe's section where the lineage has none."""
    return lineage_recipe(final, section) or asdict(current)


def stage_seconds(
    recipe: Recipe, run_dir: RunDir, data: DataOutput, finals: dict[str, Path | str], rm_dir: Path | None
) -> dict:
    """Seconds per stage of this run: the data stage's, each Trainer stage's last session (its lineage), PPO's
    updates summed (a start model's training is not this run's)."""
    seconds = {"data": data.manifest.seconds}
    if not recipe.start_model:
        seconds["sft"] = lineage_metrics(finals["sft"]).get("seconds_this_session")
    if rm_dir is not None:
        seconds["rm"] = lineage_metrics(rm_dir).get("seconds_this_session")
    if "ppo" in finals:
        seconds["ppo"] = round(sum(row["time/update"] for row in read_metrics(run_dir.stage("ppo"))), 1)
    if "dpo" in finals:
        seconds["dpo"] = lineage_metrics(finals["dpo"]).get("seconds_this_session")
    return seconds


# --------------------------------------------------------------------------------------------------------------
# Render: the plots, the model-card section, report.md
# --------------------------------------------------------------------------------------------------------------

POLITE = "polite Korean (part of the rule)"
ON_TOPIC = "on topic (part of the rule)"
KOREAN_ROWS = [  # (measure of ModelResult.korean, label)
    ("hangul_ratio", "Hangul share of the letters"),
    ("script_switch_rate", "Korean answers that switch script"),
    ("repetition", "repeated character trigrams"),
    ("length", "answer length (tokens)"),
]
RM_VIEW = "reward-model score (the reward model's view: what PPO optimised, not evidence of quality)"


def plots(run: RunDir, out: Path, report: Report) -> list[str]:
    """The PNGs in ``out``: the measures of every model side by side, the loss of each Trainer stage that logged one
    (SFT, reward model, DPO) and PPO's score, KL and response length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = [method_plot(plt, out, report)]
    for stage, title in (("sft", "SFT loss"), ("rm", "Reward model loss"), ("dpo", "DPO loss")):
        if stage == "dpo" and stage not in report.models:  # an unfinished DPO run is not part of this report
            continue
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
    rows = read_metrics(run.stage("ppo")) if "ppo" in report.models else []
    if rows:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
        for ax, key, label in zip(
            axes,
            ("objective/scores", "objective/kl", "ppo/response_length"),
            ("score", "KL to the SFT model (nats per response)", "response length (tokens)"),
        ):
            ax.plot([row["update"] for row in rows], [row[key] for row in rows])
            ax.set(title=f"PPO {label}", xlabel="update")
        fig.tight_layout()
        fig.savefig(out / "ppo.png", dpi=100)
        plt.close(fig)
        made.append("ppo.png")
    return made


def method_plot(plt: Any, out: Path, report: Report) -> str:
    """One bar chart: each rate of ``rate_rows`` (a group of bars), one bar per model, the same prompts, samples and
    seed for all."""
    rows = rate_rows(report)
    methods = list(report.models)
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(rows) + 2), 3.8))
    for j, m in enumerate(methods):
        values = [per_model[j] for _, per_model in rows]
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(rows))]
        bars = ax.bar(xs, [0.0 if v is None else v for v in values], width, label=method_label(report, m))
        ax.bar_label(bars, labels=["n/a" if v is None else f"{v:.2f}" for v in values], fontsize=7)
    ax.set_xticks(range(len(rows)), [label.replace(f"`{END_OF_TURN}`", "end of turn") for label, _ in rows])
    ax.tick_params(axis="x", labelsize=8)
    ax.set(ylim=(0, 1.1), ylabel="share of sampled answers", title="Held-out prompts, per model")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "methods.png", dpi=100)
    plt.close(fig)
    return "methods.png"


def rate_rows(report: Report) -> list[tuple[str, list[float | None]]]:
    """(label, a value per model) of the rates between 0 and 1 that some model has: the rule, its parts, arithmetic,
    stopping."""
    models = report.models.values()
    rows = [
        (f"ground-truth rate ({report.ground_truth})", [m.accuracy for m in models]),
        (POLITE, [m.polite_accuracy for m in models]),
        (ON_TOPIC, [m.on_topic_accuracy for m in models]),
        ("arithmetic correct", [m.arithmetic_accuracy for m in models]),
        (f"answers ending with `{END_OF_TURN}`", [m.stop_rate for m in models]),
    ]
    return [(label, values) for label, values in rows if any(v is not None for v in values)]


def method_label(report: Report, method: str) -> str:
    """A model's column name: PPO's names the estimator that ran (and its samples per prompt when critic-free)."""
    label = report.start if method == "sft" else METHODS.get(method, method)
    if method != "ppo" or report.ppo is None:
        return label
    est = report.ppo.estimator
    return f"{label} ({est})" if est == "gae" else f"{label} ({est}, k={report.ppo.num_generations})"


def card_section(report: Report, method: str = "ppo") -> str:
    """The report's before/after figures for the model card of ``method`` (``ppo`` or ``dpo``): it against SFT."""
    before, after = report.models["sft"], report.models[method]
    compared = [
        (f"ground-truth rate ({report.ground_truth})", before.accuracy, after.accuracy),
        (POLITE, before.polite_accuracy, after.polite_accuracy),
        (ON_TOPIC, before.on_topic_accuracy, after.on_topic_accuracy),
        ("arithmetic correct", before.arithmetic_accuracy, after.arithmetic_accuracy),
        (RM_VIEW, before.rm_score, after.rm_score),
        *((label, before.korean.get(key), after.korean.get(key)) for key, label in KOREAN_ROWS),  # None: no Korean
    ]
    rows = [
        f"| {label} | {b:.3f} | {a:.3f} | {a - b:+.3f} |"
        for label, b, a in compared
        if b is not None and a is not None
    ]
    overlap = report.heldout_overlap_any
    facts = [
        f"{report.heldout_prompts} held-out prompts"
        + (f" ({overlap} of them also in the training data)" if overlap else "")
        + f", {report.samples_per_prompt} sampled answers each"
    ]
    if report.rm is not None and report.rm.accuracy is not None:
        facts.append(f"reward-model held-out accuracy {report.rm.accuracy:.3f}")
    if method == "ppo" and report.ppo is not None:
        facts.append(estimator_phrase(report.ppo))
        if report.ppo.kl is not None:
            facts.append(f"KL to the SFT model {report.ppo.kl:.3f}")
    if method == "dpo" and report.dpo is not None and report.dpo.eval_reward_accuracy is not None:
        facts.append(f"DPO held-out implicit-reward accuracy {report.dpo.eval_reward_accuracy:.3f}")
    return "\n".join(
        [
            "; ".join(facts) + ".",
            "",
            f"| measure | {report.start} | {METHODS[method]} | change |",
            "|---|---|---|---|",
            *rows,
            "",
        ]
    )


def estimator_phrase(ppo: PPOFacts) -> str:
    """How PPO estimated its advantages and where its KL acted, as the report and the model card say it."""
    est, k = ppo.estimator, ppo.num_generations
    where = "a per-token penalty in the reward" if ppo.kl_penalty == "reward" else "a loss term"
    how = "GAE with a value model" if est == "gae" else "critic-free: no value model, each sample against its group"
    samples = f", {k} samples per prompt" if k != 1 else ""
    return f"estimator {est}{samples} ({how}); KL as {where}"


def markdown(recipe: Recipe, run_dir: RunDir, report: Report, texts: list[str], images: list[str]) -> str:
    """The report: one table with a column per model compared (SFT first), what each later stage ran with, the plots,
    and the first answer of each model to the first ``report.examples`` held-out prompts (``texts``)."""
    models = list(report.models.values())

    def fmt(v):
        return "n/a" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    def row(label: str, values: list) -> str:
        return f"| {label} | " + " | ".join(fmt(v) for v in values) + " |"

    has_rm = any(m.rm_score is not None for m in models)
    lines = [f"# Run report: {recipe.run.name}", ""]
    if report.ground_truth == "none":
        lines += [
            "No ground-truth rule (`report.ground_truth: none`): nothing below measures whether the answers are "
            "right. The Korean answer measures describe the text (script, repetition, stopping, length)"
            + (
                "; the reward-model score is the reward model's own view, the quantity PPO was trained to raise, so "
                "a higher score after PPO is not evidence of better answers."
                if has_rm
                else "."
            ),
            "",
        ]
    labels = [method_label(report, m) for m in report.models]
    lines += [
        f"Models compared: {', '.join(labels)}; each sampled on the same held-out prompts with the same settings and "
        "seed" + (", and checked by the same rule." if report.ground_truth != "none" else "."),
        "",
        "| measure | " + " | ".join(labels) + " |",
        "|---" * (len(models) + 1) + "|",
    ]
    if report.models["sft"].judged:
        lines.append(row(f"ground-truth rate ({report.ground_truth}, held-out prompts)", [m.accuracy for m in models]))
    for label, values in (
        (POLITE, [m.polite_accuracy for m in models]),
        (ON_TOPIC, [m.on_topic_accuracy for m in models]),
        ("arithmetic correct (held-out problems)", [m.arithmetic_accuracy for m in models]),
    ):
        if any(v is not None for v in values):
            lines.append(row(label, values))
    lines.append(row(f"answers ending with `{END_OF_TURN}`", [m.stop_rate for m in models]))
    for key, label in KOREAN_ROWS:
        lines.append(row(label, [m.korean.get(key) for m in models]))
    if has_rm:
        lines.append(row(f"mean {RM_VIEW}", [m.rm_score for m in models]))
    lines += [
        "",
        f"{heldout_sentence(report)}; {report.samples_per_prompt} sampled answers each per model, temperature "
        f"{recipe.ppo.temperature}, top_k 0, top_p 1, seed {recipe.run.seed}.",
        "",
        "Korean answer measures (pipeline/core/korean.py): Hangul letters over all letters (digits, punctuation and "
        "spaces are not letters); the share of answers with Hangul that also use another script (Latin, Hanja, "
        "kana, ...); the share of repeated character trigrams; the length in tokens with the stop token.",
        "",
    ]
    if report.rm is not None:
        lines.append(f"- Reward model held-out pairwise accuracy: {fmt(report.rm.accuracy)}")
    if report.ppo is not None:
        lines += [
            f"- PPO: {estimator_phrase(report.ppo)}",
            f"- PPO KL to the SFT model (mean of the last 10 updates, nats per response): {fmt(report.ppo.kl)}",
            f"- PPO updates: {report.ppo.updates}",
        ]
    if report.dpo is not None:
        dpo = report.dpo
        lines.append(
            f"- DPO: {dpo.method}, beta {dpo.beta}, {dpo.loss_type} loss, {fmt(dpo.steps)} steps; held-out "
            f"implicit-reward accuracy (chosen above rejected): {fmt(dpo.eval_reward_accuracy)}"
        )
    lines += ["- Stage seconds: " + ", ".join(f"{k} {v}" for k, v in report.stage_seconds.items()), ""]
    images_dir = run_dir.report_images.relative_to(run_dir.root)
    lines += [f"![{name}]({images_dir.as_posix()}/{name})" for name in images]
    lines += [
        "",
        "## Answers of each model (the first sample)",
        "",
        "| prompt | " + " | ".join(labels) + " |",
        "|---" * (len(models) + 1) + "|",
    ]
    for i in range(min(recipe.report.examples, len(texts))):
        shown = [m.answers[i][0] for m in models]
        lines.append(f"| {cell(texts[i], True)} | " + " | ".join(cell(text, ended) for text, ended, _ in shown) + " |")
    return "\n".join(lines) + "\n"


def heldout_sentence(report: Report) -> str:
    """What is true of the held-out prompts: never trained on only when no source contains one of them."""
    m, hit = report.heldout_prompts, report.heldout_overlap_any
    if not hit:
        return f"{m} held-out prompts (never in any training data: none is a user turn of {_sources()})"
    per = report.heldout_overlap
    parts = ", ".join(f"{per.get(k, 0)} in {label}" for k, label in overlap.OVERLAP_SOURCES.items())
    return (
        f"{hit} of {m} held-out prompts also appear in the training data ({parts}); on those the comparison "
        "measures answers to prompts the models were trained on, not held-out behaviour"
    )


def _sources() -> str:
    labels = list(overlap.OVERLAP_SOURCES.values())
    return ", ".join(labels[:-1]) + " or " + labels[-1]


def cell(text: str, stopped: bool) -> str:
    """An answer as one markdown table cell: a newline the model wrote shows as ⏎ (it would end the row), a pipe is
    escaped, and an answer that never ended its turn says so."""
    body = text.replace("|", "\\|").replace("\r", "").replace("\n", " ⏎ ")
    return body + ("" if stopped else f" *(no `{END_OF_TURN}`)*")


# --------------------------------------------------------------------------------------------------------------
# report.json
# --------------------------------------------------------------------------------------------------------------


def flatten(report: Report) -> dict[str, Any]:
    """The report as report.json holds it: each model's measures as ``<model>_<measure>`` (``sft_accuracy``,
    ``ppo_korean``, ...), the models compared (``methods``), each later stage's facts as ``<stage>_<fact>``
    (``rm_accuracy``, ``ppo_kl``, ``dpo_beta``, ...), then the run's facts. A rate a model does not have is left out,
    but for ``<model>_accuracy``: there, even None, whenever a rule judged the answers."""
    out: dict[str, Any] = {}
    for name, m in report.models.items():
        rates = {
            "accuracy": m.accuracy,
            "polite_accuracy": m.polite_accuracy,
            "on_topic_accuracy": m.on_topic_accuracy,
            "arithmetic_accuracy": m.arithmetic_accuracy,
            "rm_score": m.rm_score,
        }
        out.update({f"{name}_{k}": v for k, v in rates.items() if v is not None or (k == "accuracy" and m.judged)})
        out[f"{name}_stop_rate"] = m.stop_rate
        out[f"{name}_korean"] = m.korean
    out["methods"] = list(report.models)
    for stage, facts in (("rm", report.rm), ("ppo", report.ppo), ("dpo", report.dpo)):
        if facts is not None:
            out.update({f"{stage}_{k}": v for k, v in asdict(facts).items()})
    out.update(
        stage_seconds=report.stage_seconds,
        samples_per_prompt=report.samples_per_prompt,
        heldout_prompts=report.heldout_prompts,
        heldout_overlap=report.heldout_overlap,
        heldout_overlap_any=report.heldout_overlap_any,
        ground_truth=report.ground_truth,
        models_compared=report.models_compared,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    return run_cli("report", "Write the run report.", run, argv, with_launch=True)


if __name__ == "__main__":
    sys.exit(main())
