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
import unicodedata
from dataclasses import asdict
from pathlib import Path
from typing import Any

from data_prep.gemma_format import END_OF_TURN, USER, GemmaEncoder, stop_token_ids
from pipeline.core.checkpoint import require_checkpoint
from pipeline.core.cli import run_cli
from pipeline.core.config import ConfigError, Recipe
from pipeline.core.korean import korean_metrics
from pipeline.core.loading import load_causal_lm, load_sequence_classifier
from pipeline.core.notices import replace_card_section
from pipeline.core.reward_stats import RewardStats
from pipeline.core.rundir import (
    REPORT_LOCK,
    DataOutput,
    IncompleteError,
    RunDir,
    data_output,
    lineage_metrics,
    lineage_recipe,
    read_marker,
    read_metrics,
    trainer_history,
)
from pipeline.core.sampling import Generation, generate, left_pad, score
from pipeline.core.topology import Topology
from pipeline.core.writer import wait_until, writer_lock

CARD_SECTION = "Evaluation on held-out prompts"
# The models a report can compare, in column order: the SFT model, then the stages trained from it.
METHODS = {"sft": "SFT", "ppo": "PPO", "dpo": "DPO"}


def ground_truth_check(kind: str):
    """The rule for ``report.ground_truth``: (prompt, response, stopped: whether the answer ended its turn on
    ``<end_of_turn>``) -> {measure: ok, or None where the measure does not apply to the prompt}. ``accuracy`` is the rule itself; ``polite_on_topic`` also reports its two parts
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


def mean_scores(recipe: Recipe, rm_dir: Path, generations: dict[str, Generation]) -> dict[str, float]:
    """Mean reward-model score of each model's sampled ids, read at each answer's stop token (as PPO reads it); the
    reward model loaded once, on the sampling device and dtype, scoring in batches."""
    device, dtype = sampling_device()
    rm = load_sequence_classifier(recipe.model, str(rm_dir), dtype=dtype).to(device).eval()
    chunk = recipe.ppo.local_rollout_forward_batch_size
    return {name: float(score(rm, g, chunk).float().mean()) for name, g in generations.items()}


def normalise_prompt(text: str) -> str:
    """A prompt as the held-out check compares it: NFC, every run of whitespace one space, ends stripped."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def sft_user_turns(path: Path, tokenizer: Any) -> set[str]:
    """The normalised user turns of the SFT rows in ``path``. SFT rows keep only ids: each user turn is the content
    between ``<start_of_turn>user\n`` and the next ``<end_of_turn>`` (content never holds that token: the data stage
    refuses control-token text or keeps it as plain text), decoded once per distinct turn."""
    import numpy as np
    import pyarrow.parquet as pq

    enc = GemmaEncoder(tokenizer)
    header = enc.header_ids[USER]
    segments: dict[bytes, list[int]] = {}
    for chunk in pq.read_table(path, columns=["input_ids"]).column("input_ids").chunks:
        flat = chunk.flatten().to_numpy()  # every row's ids end to end: a user turn never crosses a row's end
        starts = np.flatnonzero(flat == enc.sot_id)
        for j, hid in enumerate(header):
            starts = starts[(starts + 1 + j < len(flat))]
            starts = starts[flat[starts + 1 + j] == hid]
        starts = starts + 1 + len(header)
        ends_at = np.flatnonzero(flat == enc.eot_id)
        ends = ends_at[np.minimum(np.searchsorted(ends_at, starts), len(ends_at) - 1)] if len(ends_at) else starts
        for a, b in zip(starts.tolist(), ends.tolist()):
            if b >= a:
                seg = flat[a:b]
                segments.setdefault(seg.tobytes(), seg.tolist())
    return {normalise_prompt(t) for t in tokenizer.batch_decode(list(segments.values()), skip_special_tokens=False)}


def message_user_turns(path: Path) -> set[str]:
    """The normalised user turns of the ``messages`` column (preference and PPO prompt rows)."""
    import pyarrow.parquet as pq

    column = pq.read_table(path, columns=["messages"]).column("messages").to_pylist()
    return {normalise_prompt(m["content"]) for row in column for m in json.loads(row) if m["role"] == USER}


OVERLAP_SOURCES = {
    "sft": "the SFT training rows",
    "preference": "the preference training prompts",
    "prompts": "the PPO training prompts",
}


def heldout_overlap(data: DataOutput, tokenizer: Any, heldout: list[str]) -> tuple[dict[str, int], int]:
    """How many held-out prompts (their last user turn) are also a user turn of a training row, per source (the
    train splits of ``OVERLAP_SOURCES``, 0 for one the recipe does not have), and how many are in any of them.

    The last user turn is what a held-out prompt asks; it is compared with every user turn of the training rows,
    after ``normalise_prompt``, so a question trained on inside a longer dialogue counts too."""
    held = [normalise_prompt(t) for t in heldout]
    hit_any = [False] * len(held)
    counts = {}
    for source in OVERLAP_SOURCES:
        path = data.split(source, "train")
        seen = (
            set()
            if path is None
            else (sft_user_turns(path, tokenizer) if source == "sft" else message_user_turns(path))
        )
        hits = [t in seen for t in held]
        counts[source] = sum(hits)
        hit_any = [a or b for a, b in zip(hit_any, hits)]
    return counts, sum(hit_any)


def _rate(values: list[bool | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def plots(run: RunDir, out: Path, r: dict, methods: list[str]) -> list[str]:
    """The PNGs in ``out``: the measures of every model side by side, the loss of each Trainer stage that logged one
    (SFT, reward model, DPO) and PPO's score, KL and response length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = [method_plot(plt, out, r, methods)]
    for stage, title in (("sft", "SFT loss"), ("rm", "Reward model loss"), ("dpo", "DPO loss")):
        if stage == "dpo" and stage not in methods:  # an unfinished DPO run is not part of this report
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
    rows = read_metrics(run.stage("ppo")) if "ppo" in methods else []
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


def rate_measures(r: dict, methods: list[str]) -> list[tuple[str, str]]:
    """(key, label) of the rates between 0 and 1 that some model has: the rule, its parts, arithmetic, stopping."""
    shown = [
        ("accuracy", f"ground-truth rate ({r['ground_truth']})"),
        *PARTS,
        ("arithmetic_accuracy", "arithmetic correct"),
        ("stop_rate", f"answers ending with `{END_OF_TURN}`"),
    ]
    return [(k, label) for k, label in shown if any(r.get(f"{m}_{k}") is not None for m in methods)]


def method_plot(plt: Any, out: Path, r: dict, methods: list[str]) -> str:
    """One bar chart: each rate of ``rate_measures`` (a group of bars), one bar per model, the same prompts, samples
    and seed for all."""
    keys = rate_measures(r, methods)
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(keys) + 2), 3.8))
    for j, m in enumerate(methods):
        values = [r.get(f"{m}_{k}") for k, _ in keys]
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(keys))]
        bars = ax.bar(xs, [0.0 if v is None else v for v in values], width, label=method_label(r, m))
        ax.bar_label(bars, labels=["n/a" if v is None else f"{v:.2f}" for v in values], fontsize=7)
    ax.set_xticks(range(len(keys)), [label.replace(f"`{END_OF_TURN}`", "end of turn") for _, label in keys])
    ax.tick_params(axis="x", labelsize=8)
    ax.set(ylim=(0, 1.1), ylabel="share of sampled answers", title="Held-out prompts, per model")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "methods.png", dpi=100)
    plt.close(fig)
    return "methods.png"


NO_HELDOUT = (
    "the report needs held-out prompts, and {path} has no prompts eval split: set data.prompts.eval (prompts that no "
    "training file contains) or data.prompts.eval_fraction (a share of data.prompts.train held out by prompt), then "
    "re-run `make data`"
)


def per_prompt(g: Generation, tokenizer: Any, n: int) -> list[list[tuple[str, bool, int]]]:
    """Per prompt, its ``n`` answers as ``(text before the stop token, whether it ended its turn on <end_of_turn>,
    length in tokens with the stop token)``. An answer that stopped on ``<eos>`` did not end its turn (as in PPO)."""
    rows = list(zip(g.texts(tokenizer), g.ended_on(stop_token_ids(tokenizer)[0]), (g.seq_len + 1).tolist()))
    return [rows[i : i + n] for i in range(0, len(rows), n)]


def measures(
    ground_truth: str, texts: list[str], answers: dict[str, list[list[tuple[str, bool, int]]]], rm_scores: dict
) -> dict[str, Any]:
    """Per model (``sft``, ``ppo``, ``dpo``: the keys of ``answers``), keys prefixed with its name: the ground-truth
    rates when the recipe has a rule, the mean reward-model score when ``rm_scores`` has the model (a run without a
    reward model has none), the stop rate and the Korean answer measures (``<model>_korean``, named as in
    pipeline/core/korean.py without the ``korean/`` prefix)."""
    result: dict[str, Any] = {}
    check = ground_truth_check(ground_truth)
    for name, groups in answers.items():
        flat = [a for group in groups for a in group]
        if check is not None:
            checks = [check(p, text, ended) for p, group in zip(texts, groups) for text, ended, _ in group]
            for measure in dict.fromkeys(k for c in checks for k in c):  # in the rule's order
                rate = _rate([c.get(measure) for c in checks])
                if rate is not None or measure == "accuracy":
                    result[f"{name}_{measure}"] = rate
        if name in rm_scores:
            result[f"{name}_rm_score"] = rm_scores[name]
        result[f"{name}_stop_rate"] = _rate([ended for _, ended, _ in flat])
        result[f"{name}_korean"] = {k.split("/", 1)[1]: v for k, v in korean_metrics(flat).items()}
    return result


def compared_models(run_dir: RunDir) -> dict[str, Path]:
    """The finished checkpoint of each model the report compares, in ``METHODS`` order: the SFT model, and each later
    stage (PPO, DPO) whose final checkpoint is in the run folder. A final that is there but unfinished, or without
    its notices, is an error rather than a column silently left out; with neither PPO nor DPO there is nothing to
    compare the SFT model with."""
    finals = {"sft": require_checkpoint(run_dir.stage("sft").final, "the SFT checkpoint")}
    for name, label in METHODS.items():
        if name != "sft" and run_dir.stage(name).final.exists():
            finals[name] = require_checkpoint(run_dir.stage(name).final, f"the {label} checkpoint")
    if len(finals) == 1:
        raise IncompleteError(
            f"nothing to compare the SFT model with: neither {run_dir.stage('ppo').final} nor "
            f"{run_dir.stage('dpo').final} exists; run `make ppo` or `make dpo` first"
        )
    return finals


def reward_model(run_dir: RunDir, finals: dict[str, Path]) -> Path | None:
    """The reward model, required when PPO ran (it is what PPO optimised); otherwise used when it is there, else
    None (a DPO-only run needs none: the rule does not read it)."""
    final = run_dir.stage("rm").final
    if "ppo" in finals or final.exists():
        return require_checkpoint(final, "the reward model")
    return None


def trained_with(final: Path, section: str, current: Any) -> dict:
    """The recipe section a checkpoint was trained with, from its lineage (what ran, whatever the recipe now says);
    the current recipe's section where the lineage has none."""
    return lineage_recipe(final, section) or asdict(current)


def stage_facts(recipe: Recipe, run_dir: RunDir, finals: dict[str, Path]) -> dict[str, Any]:
    """What each later stage ran with and logged. PPO: the estimator (a lineage from before ``ppo.estimator`` is
    GAE's), samples per prompt, where the KL acted, the mean KL of the last 10 updates and the update count. DPO:
    method, beta, loss, steps and the held-out implicit-reward accuracy."""
    facts: dict[str, Any] = {}
    if "ppo" in finals:
        ran = trained_with(finals["ppo"], "ppo", recipe.ppo)
        rows = read_metrics(run_dir.stage("ppo"))
        last = rows[-10:]
        facts.update(
            ppo_kl=sum(row["objective/kl"] for row in last) / len(last) if last else None,
            ppo_updates=len(rows),
            ppo_estimator=ran.get("estimator", "gae"),
            ppo_num_generations=ran.get("num_generations", 1),
            ppo_kl_penalty=ran.get("kl_penalty", "reward"),
        )
    if "dpo" in finals:
        ran = trained_with(finals["dpo"], "dpo", recipe.dpo)
        metrics = lineage_metrics(finals["dpo"])
        facts.update(
            dpo_method=ran.get("method"),
            dpo_beta=ran.get("beta"),
            dpo_loss_type=ran.get("loss_type"),
            dpo_steps=metrics.get("steps"),
            dpo_eval_reward_accuracy=metrics.get("eval/rewards/accuracies"),
        )
    return facts


def models_identity(finals: dict[str, Path]) -> dict[str, str]:
    """Which checkpoints a report compared: each final's completion time, from its marker (a retrained stage has a
    new one). A machine other than machine 0 waits for a report.json that names the checkpoints it sees."""
    return {name: str(read_marker(final).get("finished_at")) for name, final in finals.items()}


def _say(line: str) -> None:
    print(f"[report] {line}", flush=True)


def run(recipe: Recipe, launch: Topology | None = None) -> dict[str, Any]:
    """Write the report (one writer: the report lock; on a multi-machine run machine 0, the others wait for its
    report.json on the same checkpoints) and return its measures."""
    run_dir = RunDir.of(recipe)
    timeout = recipe.launch.wait_minutes * 60
    if launch is not None and launch.machine_rank > 0:
        wanted = models_identity(compared_models(run_dir))

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
    with writer_lock(run_dir.root / REPORT_LOCK, str(run_dir.report_md), timeout, _say):
        return _write(recipe, run_dir)


def _write(recipe: Recipe, run_dir: RunDir) -> dict[str, Any]:
    import datasets
    from transformers import AutoTokenizer

    data = data_output(run_dir, "the data stage output")
    eval_path = data.split("prompts", "eval")
    if eval_path is None:
        raise ConfigError(NO_HELDOUT.format(path=data.path))
    finals = compared_models(run_dir)
    rm_dir = reward_model(run_dir, finals)
    datasets.disable_progress_bars()
    held = datasets.Dataset.from_parquet(str(eval_path))
    prompts = list(held["prompt_ids"])
    texts = [json.loads(m)[-1]["content"] for m in held["messages"]]

    tokenizer = AutoTokenizer.from_pretrained(data.tokenizer)  # the one every stage used
    overlap, overlap_any = heldout_overlap(data, tokenizer, texts)
    device, dtype = sampling_device()
    print(
        f"[report] comparing {', '.join(METHODS[m] for m in finals)}; sampling and scoring on {device} "
        f"({str(dtype).removeprefix('torch.')})",
        flush=True,
    )
    # The same prompts, settings and seed for every model: the columns differ only by the model.
    generations = {name: sample_answers(d, tokenizer, prompts, recipe, recipe.run.seed) for name, d in finals.items()}
    n = recipe.report.samples_per_prompt
    answers = {name: per_prompt(g, tokenizer, n) for name, g in generations.items()}
    rm_scores = mean_scores(recipe, rm_dir, generations) if rm_dir is not None else {}
    result = measures(recipe.report.ground_truth, texts, answers, rm_scores)
    result["methods"] = list(finals)
    if rm_dir is not None:
        stats = RewardStats.read(rm_dir)
        result["rm_accuracy"] = stats.accuracy if stats is not None else None
    result.update(stage_facts(recipe, run_dir, finals))
    seconds = {"data": data.manifest.seconds, "sft": lineage_metrics(finals["sft"]).get("seconds_this_session")}
    if rm_dir is not None:
        seconds["rm"] = lineage_metrics(rm_dir).get("seconds_this_session")
    if "ppo" in finals:
        seconds["ppo"] = round(sum(row["time/update"] for row in read_metrics(run_dir.stage("ppo"))), 1)
    if "dpo" in finals:
        seconds["dpo"] = lineage_metrics(finals["dpo"]).get("seconds_this_session")
    result["stage_seconds"] = seconds
    result["samples_per_prompt"] = n
    result["heldout_prompts"] = len(prompts)
    result["heldout_overlap"] = overlap
    result["heldout_overlap_any"] = overlap_any
    result["ground_truth"] = recipe.report.ground_truth

    result["models_compared"] = models_identity(finals)

    run_dir.report_images.mkdir(parents=True, exist_ok=True)
    images = plots(run_dir, run_dir.report_images, result, list(finals))
    for name, final in finals.items():
        if name != "sft":
            replace_card_section(final, CARD_SECTION, card_section(result, name))
    run_dir.report_md.write_text(markdown(recipe, run_dir, result, texts, answers, images), encoding="utf-8")
    # report.json last, whole (written aside, then renamed): what another machine waits for
    pending = run_dir.report_json.with_name(f".{run_dir.report_json.name}.tmp")
    pending.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(pending, run_dir.report_json)
    print(
        f"[report] wrote {run_dir.report_md}: "
        + ", ".join(f"{k} {v:.3f}" for k, v in result.items() if isinstance(v, float)),
        flush=True,
    )
    return result


PARTS = [("polite_accuracy", "polite Korean (part of the rule)"), ("on_topic_accuracy", "on topic (part of the rule)")]
KOREAN_ROWS = [
    ("hangul_ratio", "Hangul share of the letters"),
    ("script_switch_rate", "Korean answers that switch script"),
    ("repetition", "repeated character trigrams"),
    ("length", "answer length (tokens)"),
]
RM_VIEW = "reward-model score (the reward model's view: what PPO optimised, not evidence of quality)"


def heldout_sentence(r: dict) -> str:
    """What is true of the held-out prompts: never trained on only when no source contains one of them."""
    m, hit = r["heldout_prompts"], r.get("heldout_overlap_any", 0)
    if not hit:
        return f"{m} held-out prompts (never in any training data: none is a user turn of {_sources()})"
    per = r["heldout_overlap"]
    parts = ", ".join(f"{per.get(k, 0)} in {label}" for k, label in OVERLAP_SOURCES.items())
    return (
        f"{hit} of {m} held-out prompts also appear in the training data ({parts}); on those the comparison "
        "measures answers to prompts the models were trained on, not held-out behaviour"
    )


def _sources() -> str:
    labels = list(OVERLAP_SOURCES.values())
    return ", ".join(labels[:-1]) + " or " + labels[-1]


def method_label(r: dict, method: str) -> str:
    """A model's column name: PPO's names the estimator that ran (and its samples per prompt when critic-free)."""
    label = METHODS[method]
    if method != "ppo" or "ppo_estimator" not in r:
        return label
    est = r["ppo_estimator"]
    return f"{label} ({est})" if est == "gae" else f"{label} ({est}, k={r.get('ppo_num_generations')})"


def estimator_phrase(r: dict) -> str:
    """How PPO estimated its advantages and where its KL acted, as the report and the model card say it."""
    est, k = r["ppo_estimator"], r.get("ppo_num_generations", 1)
    where = "a per-token penalty in the reward" if r.get("ppo_kl_penalty", "reward") == "reward" else "a loss term"
    how = "GAE with a value model" if est == "gae" else "critic-free: no value model, each sample against its group"
    samples = f", {k} samples per prompt" if k != 1 else ""
    return f"estimator {est}{samples} ({how}); KL as {where}"


def card_section(r: dict, method: str = "ppo") -> str:
    """The report's before/after figures for the model card of ``method`` (``ppo`` or ``dpo``): it against SFT."""
    rows = [
        f"| {label} | {r[f'sft_{key}']:.3f} | {r[f'{method}_{key}']:.3f} | "
        f"{r[f'{method}_{key}'] - r[f'sft_{key}']:+.3f} |"
        for key, label in (
            ("accuracy", f"ground-truth rate ({r['ground_truth']})"),
            *PARTS,
            ("arithmetic_accuracy", "arithmetic correct"),
            ("rm_score", RM_VIEW),
        )
        if r.get(f"sft_{key}") is not None and r.get(f"{method}_{key}") is not None
    ]
    before, after = r.get("sft_korean") or {}, r.get(f"{method}_korean") or {}
    rows += [
        f"| {label} | {before[key]:.3f} | {after[key]:.3f} | {after[key] - before[key]:+.3f} |"
        for key, label in KOREAN_ROWS
        if before.get(key) is not None and after.get(key) is not None  # None: no Korean answer
    ]
    overlap = r.get("heldout_overlap_any", 0)
    facts = [
        f"{r['heldout_prompts']} held-out prompts"
        + (f" ({overlap} of them also in the training data)" if overlap else "")
        + f", {r['samples_per_prompt']} sampled answers each"
    ]
    if r.get("rm_accuracy") is not None:
        facts.append(f"reward-model held-out accuracy {r['rm_accuracy']:.3f}")
    if method == "ppo" and "ppo_estimator" in r:
        facts.append(estimator_phrase(r))
    if method == "ppo" and r.get("ppo_kl") is not None:
        facts.append(f"KL to the SFT model {r['ppo_kl']:.3f}")
    if method == "dpo" and r.get("dpo_eval_reward_accuracy") is not None:
        facts.append(f"DPO held-out implicit-reward accuracy {r['dpo_eval_reward_accuracy']:.3f}")
    return "\n".join(
        [
            "; ".join(facts) + ".",
            "",
            f"| measure | SFT | {METHODS[method]} | change |",
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
    """The report: one table with a column per model compared (the keys of ``answers``, SFT first), what each later
    stage ran with, the plots, and the first answer of each model to the first ``report.examples`` prompts."""
    methods = list(answers)

    def fmt(v):
        return "n/a" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    def row(label: str, values: list) -> str:
        return f"| {label} | " + " | ".join(fmt(v) for v in values) + " |"

    def per_model(key: str) -> list:
        return [r.get(f"{m}_{key}") for m in methods]

    has_rm = any(f"{m}_rm_score" in r for m in methods)
    lines = [f"# Run report: {recipe.run.name}", ""]
    if r["ground_truth"] == "none":
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
    labels = [method_label(r, m) for m in methods]
    lines += [
        f"Models compared: {', '.join(labels)}; each sampled on the same held-out prompts with the same settings and "
        "seed" + (", and checked by the same rule." if r["ground_truth"] != "none" else "."),
        "",
        "| measure | " + " | ".join(labels) + " |",
        "|---" * (len(methods) + 1) + "|",
    ]
    if "sft_accuracy" in r:
        lines.append(row(f"ground-truth rate ({r['ground_truth']}, held-out prompts)", per_model("accuracy")))
    for key, label in PARTS:
        if any(f"{m}_{key}" in r for m in methods):
            lines.append(row(label, per_model(key)))
    if any(f"{m}_arithmetic_accuracy" in r for m in methods):
        lines.append(row("arithmetic correct (held-out problems)", per_model("arithmetic_accuracy")))
    lines.append(row(f"answers ending with `{END_OF_TURN}`", per_model("stop_rate")))
    for key, label in KOREAN_ROWS:
        lines.append(row(label, [(r.get(f"{m}_korean") or {}).get(key) for m in methods]))
    if has_rm:
        lines.append(row(f"mean {RM_VIEW}", per_model("rm_score")))
    lines += [
        "",
        f"{heldout_sentence(r)}; {r['samples_per_prompt']} sampled answers each per model, temperature "
        f"{recipe.ppo.temperature}, top_k 0, top_p 1, seed {recipe.run.seed}.",
        "",
        "Korean answer measures (pipeline/core/korean.py): Hangul letters over all letters (digits, punctuation and "
        "spaces are not letters); the share of answers with Hangul that also use another script (Latin, Hanja, "
        "kana, ...); the share of repeated character trigrams; the length in tokens with the stop token.",
        "",
    ]
    if "rm_accuracy" in r:
        lines.append(f"- Reward model held-out pairwise accuracy: {fmt(r['rm_accuracy'])}")
    if "ppo_estimator" in r:
        lines.append(f"- PPO: {estimator_phrase(r)}")
    if "ppo_kl" in r:
        lines.append(f"- PPO KL to the SFT model (mean of the last 10 updates, nats per response): {fmt(r['ppo_kl'])}")
    if "ppo_updates" in r:
        lines.append(f"- PPO updates: {r['ppo_updates']}")
    if "dpo" in methods:
        lines.append(
            f"- DPO: {r.get('dpo_method', 'n/a')}, beta {r.get('dpo_beta', 'n/a')}, {r.get('dpo_loss_type', 'n/a')} "
            f"loss, {fmt(r.get('dpo_steps'))} steps; held-out implicit-reward accuracy (chosen above rejected): "
            f"{fmt(r.get('dpo_eval_reward_accuracy'))}"
        )
    lines += ["- Stage seconds: " + ", ".join(f"{k} {v}" for k, v in r["stage_seconds"].items()), ""]
    images_dir = run_dir.report_images.relative_to(run_dir.root)
    lines += [f"![{name}]({images_dir.as_posix()}/{name})" for name in images]
    lines += [
        "",
        "## Answers of each model (the first sample)",
        "",
        "| prompt | " + " | ".join(labels) + " |",
        "|---" * (len(methods) + 1) + "|",
    ]
    for i in range(min(recipe.report.examples, len(texts))):
        shown = [answers[m][i][0] for m in methods]
        lines.append(f"| {cell(texts[i], True)} | " + " | ".join(cell(text, ended) for text, ended, _ in shown) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    return run_cli("report", "Write the run report.", run, argv, with_launch=True)


if __name__ == "__main__":
    sys.exit(main())
