"""The run report on any recipe: held-out prompts checked against every training prompt, the wording that follows
from the counts, the report without a ground-truth rule, and where it samples."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pipeline.core.config import ConfigError, load_recipe
from pipeline.core.rundir import RunDir, data_output
from pipeline.data import main as data_main
from tests.helpers.chain import RECIPE
from tests.helpers.chain import chain_recipe as _recipe
from tests.helpers.chain import fresh_run as _fresh
from tests.helpers.recipes import write_jsonl, write_recipe


def _chat(user: str, answer: str = "네, 그렇습니다.") -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def _data(tmp_path, data: dict):
    """A recipe with this data section and its finished data folder."""
    path = write_recipe(tmp_path, data)
    assert data_main(["--recipe", str(path)]) == 0
    recipe = load_recipe(path)
    return recipe, data_output(RunDir.of(recipe))


def _tokenizer(data):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(data.tokenizer)


def _heldout_texts(data) -> list[str]:
    """The held-out prompts as the report reads them: each row's last user turn."""
    import datasets

    rows = datasets.Dataset.from_parquet(str(data.split("prompts", "eval")))["messages"]
    return [json.loads(m)[-1]["content"] for m in rows]


def test_heldout_prompts_are_checked_against_every_training_source(tmp_path):
    """Catches held-out prompts trained on going unreported: an SFT row (read back from its ids, a later user turn
    of a dialogue included), a preference prompt and a PPO prompt each count for their source, compared on
    normalised text; a prompt that is only a prefix of training prompts, or new, counts nowhere."""
    sft = [_chat(f"질문 {i}번") for i in range(10)]
    sft.append(
        {
            "messages": [
                {"role": "user", "content": "안녕하세요"},
                {"role": "assistant", "content": "안녕하세요!"},
                {"role": "user", "content": "두 번째 질문입니다"},
                {"role": "assistant", "content": "네."},
            ]
        }
    )
    pref = [{"prompt": f"선호 질문 {i}", "chosen": "좋습니다.", "rejected": "좋아."} for i in range(4)]
    held = ["질문 3번", "두 번째   질문입니다", "선호 질문 2", "훈련 질문 1", "질문", "완전히 새 질문"]
    recipe, data = _data(
        tmp_path,
        {
            "sft": {"train": [{"path": str(write_jsonl(tmp_path / "sft.jsonl", sft))}]},
            "preference": {"train": [{"path": str(write_jsonl(tmp_path / "pref.jsonl", pref))}]},
            "prompts": {
                "train": [{"path": str(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "훈련 질문 1"}]))}],
                "eval": [{"path": str(write_jsonl(tmp_path / "h.jsonl", [{"prompt": p} for p in held]))}],
            },
        },
    )
    from pipeline.report import heldout_overlap

    tok = _tokenizer(data)
    texts = _heldout_texts(data)
    assert texts == held  # the inner spaces of "두 번째   질문입니다" are still there: normalisation must match it
    counts, hit = heldout_overlap(data, tok, texts)
    assert counts == {"sft": 2, "preference": 1, "prompts": 1} and hit == 4
    # Negative control: prompts in no training row count nowhere.
    assert heldout_overlap(data, tok, ["완전히 새 질문", "질문 11번"]) == (
        {"sft": 0, "preference": 0, "prompts": 0},
        0,
    )


def test_split_off_heldout_prompts_that_sft_trained_on_are_counted(tmp_path):
    """Catches the gemma2b_ko case reported as "never in any training data": PPO prompts are the SFT instructions,
    and the held-out prompts are split off the PPO prompts (eval_fraction), so each held-out prompt was trained on
    by SFT though none is a PPO training prompt."""
    questions = [f"{i}번째 지시문을 따라 주세요." for i in range(20)]
    recipe, data = _data(
        tmp_path,
        {
            "sft": {"train": [{"path": str(write_jsonl(tmp_path / "sft.jsonl", [_chat(q) for q in questions]))}]},
            "prompts": {
                "train": [{"path": str(write_jsonl(tmp_path / "p.jsonl", [{"prompt": q} for q in questions]))}],
                "eval_fraction": 0.2,
            },
        },
    )
    from pipeline.report import heldout_overlap

    held = _heldout_texts(data)
    assert len(held) == 4
    assert heldout_overlap(data, _tokenizer(data), held) == ({"sft": 4, "preference": 0, "prompts": 0}, 4)


def test_no_heldout_split_is_one_clear_error(tmp_path):
    """Catches a report that samples without held-out prompts (or fails on a missing file) instead of naming the
    recipe keys that give them."""
    from pipeline import report

    recipe, _ = _data(
        tmp_path, {"sft": {"train": [{"path": str(write_jsonl(tmp_path / "s.jsonl", [_chat("질문")]))}]}}
    )
    with pytest.raises(ConfigError) as e:
        report.run(recipe)
    assert "data.prompts.eval " in str(e.value) and "data.prompts.eval_fraction" in str(e.value)


ANSWERS = {  # one held-out prompt, two samples per model: (text, ended its turn, length in tokens)
    "sft": [[("사과는 맛있습니다.", True, 5), ("apple", False, 16)]],
    "ppo": [[("사과는 좋아요.", True, 7), ("사과 good이에요.", True, 4)]],
}


def _result(ground_truth: str, overlap: dict[str, int], hit: int):
    from pipeline.report import PPOFacts, Report, RewardModelFacts, measures

    return Report(
        models=measures(ground_truth, ["사과는 무엇인가요?"], ANSWERS, {"sft": -0.5, "ppo": 1.25}),
        rm=RewardModelFacts(accuracy=0.9),
        ppo=PPOFacts(kl=0.3, updates=3, estimator="gae", num_generations=1, kl_penalty="reward"),
        stage_seconds={"data": 1.0, "sft": 2.0, "rm": 3.0, "ppo": 4.0},
        samples_per_prompt=2,
        heldout_prompts=1 if not hit else 5,
        heldout_overlap=overlap,
        heldout_overlap_any=hit,
        ground_truth=ground_truth,
        models_compared={},
    )


def test_report_without_a_rule_shows_korean_measures_and_labels_the_reward_models_view(tmp_path):
    """Catches a report without a ground-truth rule that shows the reward-model score as if it measured quality, or
    drops the Korean measures; and wrong Korean means (computed here by hand)."""
    from pipeline.report import RM_VIEW, card_section, flatten, markdown

    result = _result("none", {"sft": 0, "preference": 0, "prompts": 0}, 0)
    r = flatten(result)
    assert "sft_accuracy" not in r and "ppo_accuracy" not in r
    assert r["sft_korean"] == pytest.approx(
        {"hangul_ratio": 0.5, "script_switch_rate": 0.0, "repetition": 0.0, "stop_rate": 0.5, "length": 10.5}
    )
    # 사과 good이에요.: 5 Hangul of 9 letters, a switch; 사과는 좋아요.: all Hangul.
    assert r["ppo_korean"]["hangul_ratio"] == pytest.approx((1 + 5 / 9) / 2)
    assert r["ppo_korean"]["script_switch_rate"] == 0.5 and r["ppo_korean"]["stop_rate"] == 1.0
    recipe = load_recipe(RECIPE, [f"run.output_dir={tmp_path}", "report.ground_truth=none"])
    md = markdown(recipe, RunDir.of(recipe), result, ["사과는 무엇인가요?"], [])
    assert "No ground-truth rule (`report.ground_truth: none`)" in md and "not evidence of better answers" in md
    assert f"| mean {RM_VIEW} | -0.500 | 1.250 |" in md
    assert "| Hangul share of the letters | 0.500 | 0.778 |" in md
    assert "| Korean answers that switch script | 0.000 | 0.500 |" in md
    assert "ground-truth rate" not in md
    assert "1 held-out prompts (never in any training data" in md
    card = card_section(result)
    assert f"| {RM_VIEW} | -0.500 | 1.250 | +1.750 |" in card and "| answer length (tokens) | 10.500 | 5.500 |" in card


def test_report_with_a_rule_keeps_its_keys_and_adds_the_korean_measures(tmp_path):
    """Catches the Korean measures replacing the ground-truth rate (the keys other tests and the README read) or the
    no-rule disclaimer showing when a rule judges the answers."""
    from pipeline.report import flatten, markdown

    result = _result("polite_korean", {"sft": 0, "preference": 0, "prompts": 0}, 0)
    r = flatten(result)
    # Polite, ended and at least half Hangul: both PPO answers; of the SFT ones only 사과는 맛있습니다.
    assert r["sft_accuracy"] == 0.5 and r["ppo_accuracy"] == 1.0
    names = {"hangul_ratio", "script_switch_rate", "repetition", "stop_rate", "length"}
    assert set(r["sft_korean"]) == set(r["ppo_korean"]) == names
    recipe = load_recipe(RECIPE, [f"run.output_dir={tmp_path}"])
    md = markdown(recipe, RunDir.of(recipe), result, ["사과는 무엇인가요?"], [])
    assert "| ground-truth rate (polite_korean, held-out prompts) | 0.500 | 1.000 |" in md
    assert "| Hangul share of the letters |" in md and "No ground-truth rule" not in md


def test_report_says_how_many_heldout_prompts_were_trained_on(tmp_path):
    """Catches "never in any training data" printed when held-out prompts do appear in training data; the counts
    per source are named."""
    from pipeline.report import card_section, markdown

    r = _result("none", {"sft": 2, "preference": 0, "prompts": 1}, 2)
    recipe = load_recipe(RECIPE, [f"run.output_dir={tmp_path}", "report.ground_truth=none"])
    md = markdown(recipe, RunDir.of(recipe), r, ["사과는 무엇인가요?"], [])
    assert "never in any training data" not in md
    assert (
        "2 of 5 held-out prompts also appear in the training data (2 in the SFT training rows, 0 in the preference "
        "training prompts, 1 in the PPO training prompts)" in md
    )
    assert "5 held-out prompts (2 of them also in the training data)" in card_section(r)


@pytest.mark.parametrize(
    "cuda, bf16, expected",
    [
        (False, None, ("cpu", torch.float32)),
        (True, False, ("cuda", torch.float32)),
        (True, True, ("cuda", torch.bfloat16)),
    ],
)
def test_sampling_device(monkeypatch, cuda, bf16, expected):
    """Catches the report sampling on the CPU beside an idle GPU (a bf16 one, or a T4/V100 without bf16, which then
    runs fp32), trying bf16 on a GPU without it, or asking a machine without CUDA whether it supports bf16 (that call
    fails there)."""
    from pipeline.report import sampling_device

    def bf16_supported(*args, **kwargs):
        if bf16 is None:
            raise AssertionError("bf16 support asked without CUDA")
        return bf16

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16_supported)
    assert sampling_device() == expected


@pytest.mark.slow
def test_report_runs_on_the_chain_without_a_rule(chain, tmp_path):
    """Catches the report failing end to end on a recipe without a rule, or its held-out check disagreeing with the
    data stage's own (the tiny recipe's held-out prompts are in no training file): one PPO update on the shared
    chain, then the report with 2 samples per prompt."""
    from pipeline import ppo, report

    out = _fresh(chain, tmp_path)
    recipe = _recipe(
        out, "ppo.total_episodes=32", "ppo.panel_every=0", "report.ground_truth=none", "report.samples_per_prompt=2"
    )
    ppo.run(recipe)
    r = report.run(recipe)
    saved = json.loads(RunDir.of(recipe).report_json.read_text(encoding="utf-8"))
    assert saved == json.loads(json.dumps(r))
    assert saved["heldout_overlap"] == {"sft": 0, "preference": 0, "prompts": 0} and saved["heldout_overlap_any"] == 0
    assert data_output(RunDir.of(recipe)).manifest.raw["heldout_prompt_overlap"] == 0
    assert "sft_accuracy" not in saved and {"rm_accuracy", "ppo_kl", "stage_seconds"} <= set(saved)
    for name in ("sft", "ppo"):
        k = saved[f"{name}_korean"]
        assert all(0 <= k[m] <= 1 for m in ("hangul_ratio", "script_switch_rate", "repetition", "stop_rate"))
        assert k["hangul_ratio"] > 0.5 and k["stop_rate"] == pytest.approx(saved[f"{name}_stop_rate"])
    md = RunDir.of(recipe).report_md.read_text(encoding="utf-8")
    assert "No ground-truth rule" in md and "60 held-out prompts (never in any training data" in md


THREE = {  # one held-out prompt, two samples per model, DPO's both polite and ended
    **ANSWERS,
    "dpo": [[("사과는 달아요.", True, 6), ("사과는 빨갛습니다.", True, 6)]],
}
HELDOUT = dict(  # the report's held-out facts for THREE's one prompt, none of it trained on
    samples_per_prompt=2,
    heldout_prompts=1,
    heldout_overlap={"sft": 0, "preference": 0, "prompts": 0},
    heldout_overlap_any=0,
)


def test_report_table_has_a_column_per_model_and_names_the_estimator(tmp_path):
    """Catches a report that drops a model the run trained (the DPO column, or its dpo_ keys), that does not say
    which PPO estimator ran, or that writes DPO's card with PPO's numbers; the SFT and PPO keys stay as they were."""
    from dataclasses import replace

    from pipeline.report import (
        RM_VIEW,
        DPOFacts,
        PPOFacts,
        Report,
        RewardModelFacts,
        card_section,
        flatten,
        markdown,
        measures,
    )

    result = Report(
        models=measures("polite_korean", ["사과는 무엇인가요?"], THREE, {"sft": -0.5, "ppo": 1.25, "dpo": 0.75}),
        rm=RewardModelFacts(accuracy=0.9),
        ppo=PPOFacts(kl=0.3, updates=3, estimator="rloo", num_generations=4, kl_penalty="reward"),
        dpo=DPOFacts(method="full", beta=0.1, loss_type="sigmoid", steps=4, eval_reward_accuracy=0.625),
        stage_seconds={"data": 1.0, "sft": 2.0, "rm": 3.0, "ppo": 4.0, "dpo": 5.0},
        **HELDOUT,
        ground_truth="polite_korean",
        models_compared={},
    )
    r = flatten(result)
    assert (r["sft_accuracy"], r["ppo_accuracy"], r["dpo_accuracy"]) == (0.5, 1.0, 1.0)
    assert set(r["dpo_korean"]) == set(r["sft_korean"]) and r["dpo_rm_score"] == 0.75
    recipe = load_recipe(RECIPE, [f"run.output_dir={tmp_path}"])
    md = markdown(recipe, RunDir.of(recipe), result, ["사과는 무엇인가요?"], ["methods.png"])
    assert "| measure | SFT | PPO (rloo, k=4) | DPO |" in md and "|---|---|---|---|" in md
    assert "| ground-truth rate (polite_korean, held-out prompts) | 0.500 | 1.000 | 1.000 |" in md
    assert "4 samples per prompt (critic-free: no value model" in md
    assert "- DPO: full, beta 0.1, sigmoid loss, 4 steps" in md and "0.625" in md
    assert "| 사과는 무엇인가요? | 사과는 맛있습니다. | 사과는 좋아요. | 사과는 달아요. |" in md
    dpo_card = card_section(result, "dpo")
    assert "| measure | SFT | DPO | change |" in dpo_card and f"| {RM_VIEW} | -0.500 | 0.750 | +1.250 |" in dpo_card
    assert "value model" not in dpo_card and "implicit-reward accuracy 0.625" in dpo_card
    ppo_card = card_section(result, "ppo")
    assert f"| {RM_VIEW} | -0.500 | 1.250 | +1.750 |" in ppo_card and "estimator rloo" in ppo_card
    # GAE names its value model (negative control for the critic-free wording above)
    gae = replace(result, ppo=replace(result.ppo, estimator="gae"))
    md_gae = markdown(recipe, RunDir.of(recipe), gae, ["사과는 무엇인가요?"], [])
    assert "| PPO (gae) |" in md_gae and "GAE with a value model" in md_gae and "critic-free" not in md_gae


def test_report_without_ppo_or_a_reward_model_shows_no_reward_column(tmp_path):
    """Catches a DPO-only report (no PPO, no reward model) that expects PPO's keys or a reward-model score: no PPO
    column, no reward-model row, no rm_score keys; with a reward model the row is there (negative control)."""
    from dataclasses import replace

    from pipeline.report import RM_VIEW, Report, flatten, markdown, measures

    two = {"sft": THREE["sft"], "dpo": THREE["dpo"]}
    result = Report(
        models=measures("polite_korean", ["사과는 무엇인가요?"], two, {}),
        stage_seconds={"data": 1.0, "sft": 2.0, "dpo": 5.0},
        **HELDOUT,
        ground_truth="none",
        models_compared={},
    )
    r = flatten(result)
    assert r["dpo_accuracy"] == 1.0 and not any(k.startswith("ppo_") or k.endswith("rm_score") for k in r)
    recipe = load_recipe(RECIPE, [f"run.output_dir={tmp_path}"])
    md = markdown(recipe, RunDir.of(recipe), result, ["사과는 무엇인가요?"], [])
    assert "\n| measure | SFT | DPO |\n" in md and "- PPO" not in md
    assert "reward-model score" not in md and "Reward model" not in md
    scored = measures("polite_korean", ["사과는 무엇인가요?"], two, {"sft": 0.1, "dpo": 0.2})
    md = markdown(recipe, RunDir.of(recipe), replace(result, models=scored), ["사과는 무엇인가요?"], [])
    assert f"| mean {RM_VIEW} | 0.100 | 0.200 |" in md


@pytest.fixture(scope="module")
def three_methods(chain, tmp_path_factory):
    """A run folder with the chain's data, SFT and reward model, a one-update RLOO PPO final and a 4-step DPO final."""
    from pipeline import dpo, ppo

    out = _fresh(chain, tmp_path_factory.mktemp("three"))
    ppo.run(_recipe(out, "ppo.total_episodes=32", "ppo.panel_every=0", "ppo.estimator=rloo", "ppo.num_generations=4"))
    dpo.run(
        _recipe(
            out,
            "dpo.max_steps=4",
            "dpo.learning_rate=5e-5",
            "dpo.eval_steps=1000",
            "dpo.save_steps=1000",
            "dpo.logging_steps=1",
        )
    )
    return out


REPORT = ["report.samples_per_prompt=1", "report.examples=3"]


def _answer_column(md: str, column: int) -> list[str]:
    """The answers of one column of the report's answers table (0: the first model)."""
    table = md.split("## Answers of each model")[1].splitlines()[4:]
    return [line.split(" | ")[1 + column] for line in table if line.startswith("| ")]


@pytest.mark.slow
def test_report_compares_sft_ppo_and_dpo_in_one_table(three_methods):
    """Catches a report that compares only SFT and PPO when DPO also ran (no DPO column, no dpo_accuracy in
    report.json, no DPO card section), that loses the keys existing consumers read, that does not name the PPO
    estimator that ran (read from the PPO checkpoint, not the recipe now given), or that has no per-model plot."""
    from pipeline import report

    recipe = _recipe(three_methods, *REPORT)  # the recipe as given names gae: the report must say rloo
    r = report.run(recipe)
    run = RunDir.of(recipe)
    saved = json.loads(run.report_json.read_text(encoding="utf-8"))
    assert saved == json.loads(json.dumps(r)) and saved["methods"] == ["sft", "ppo", "dpo"]
    for key in ("sft_accuracy", "ppo_accuracy", "dpo_accuracy", "rm_accuracy", "ppo_kl", "ppo_updates"):
        assert saved[key] is not None, key
    for name in ("sft", "ppo", "dpo"):
        assert 0 <= saved[f"{name}_accuracy"] <= 1 and isinstance(saved[f"{name}_rm_score"], float)
        assert set(saved[f"{name}_korean"]) == set(saved["sft_korean"])
    assert (saved["ppo_estimator"], saved["ppo_num_generations"]) == ("rloo", 4)
    assert saved["dpo_steps"] == 4 and set(saved["stage_seconds"]) == {"data", "sft", "rm", "ppo", "dpo"}
    md = run.report_md.read_text(encoding="utf-8")
    assert "| measure | SFT | PPO (rloo, k=4) | DPO |" in md
    rate = next(line for line in md.splitlines() if line.startswith("| ground-truth rate"))
    assert rate.count(" | ") == 3  # a label and three models
    assert "![methods.png](report/methods.png)" in md and (run.report_images / "methods.png").stat().st_size > 0
    assert "![dpo_loss.png](report/dpo_loss.png)" in md and "![ppo.png](report/ppo.png)" in md
    assert len(_answer_column(md, 2)) == 3
    card = (run.stage("dpo").final / "README.md").read_text(encoding="utf-8")
    assert "## Evaluation on held-out prompts" in card and "| measure | SFT | DPO | change |" in card


@pytest.mark.slow
def test_report_on_sft_and_dpo_only(three_methods, tmp_path):
    """Catches a report that needs a PPO checkpoint or a reward model when only DPO ran, one that silently reports
    SFT alone (nothing to compare, or a DPO final left unfinished, is an error), and an unfair comparison: every model
    is sampled with the same seed and settings, so SFT's answers and rates do not depend on which other models are
    compared (the same as in the three-model report)."""
    from pipeline import report
    from pipeline.core.rundir import MARKER, IncompleteError

    for part in ("data", "sft/final"):
        shutil.copytree(three_methods / "tiny_ko" / part, tmp_path / "tiny_ko" / part)
    recipe = _recipe(tmp_path, *REPORT)
    with pytest.raises(IncompleteError, match="make dpo"):
        report.run(recipe)
    dpo_final = RunDir.of(recipe).stage("dpo").final
    shutil.copytree(three_methods / "tiny_ko" / "dpo" / "final", dpo_final)
    (dpo_final / MARKER).unlink()
    with pytest.raises(IncompleteError, match="incomplete"):
        report.run(recipe)
    shutil.copy(three_methods / "tiny_ko" / "dpo" / "final" / MARKER, dpo_final / MARKER)

    r = report.run(recipe)
    assert r["methods"] == ["sft", "dpo"] and "dpo_accuracy" in r
    assert not any(k.startswith("ppo_") or k.endswith("rm_score") for k in r) and "rm_accuracy" not in r
    assert set(r["stage_seconds"]) == {"data", "sft", "dpo"}
    md = RunDir.of(recipe).report_md.read_text(encoding="utf-8")
    assert "| measure | SFT | DPO |" in md and "reward-model score" not in md
    both = json.loads(RunDir.of(_recipe(three_methods)).report_json.read_text(encoding="utf-8"))
    assert (r["sft_accuracy"], r["dpo_accuracy"]) == (both["sft_accuracy"], both["dpo_accuracy"])
    first = (three_methods / "tiny_ko" / "report.md").read_text(encoding="utf-8")
    assert _answer_column(md, 0) == _answer_column(first, 0) and _answer_column(md, 1) == _answer_column(first, 2)


def test_report_rules_report_each_part_of_the_topic_rule():
    """Catches the report's topic rule collapsing into one number (or into the style rule): each part and their
    conjunction are reported, arithmetic prompts apart."""
    from pipeline.report import ModelResult, PPOFacts, Report, RewardModelFacts, card_section, ground_truth_check

    topic, style = ground_truth_check("polite_on_topic"), ground_truth_check("polite_korean")
    assert ground_truth_check("none") is None
    off = ("사과는 무엇인가요?", "바나나는 정말 좋습니다.", True)
    assert topic(*off) == {"accuracy": False, "polite_accuracy": True, "on_topic_accuracy": False}
    assert style(*off) == {"accuracy": True}  # negative control: the style rule alone passes it
    assert topic("3 더하기 4는?", "정답은 7이에요.", True) == {"accuracy": None, "arithmetic_accuracy": True}
    r = Report(
        models={
            m: ModelResult(answers=[], stop_rate=1.0, korean={}, accuracy=v, polite_accuracy=v, on_topic_accuracy=0.5)
            for m, v in (("sft", 0.25), ("ppo", 0.75))
        },
        ground_truth="polite_on_topic",
        samples_per_prompt=1,
        heldout_prompts=2,
        heldout_overlap={},
        heldout_overlap_any=0,
        stage_seconds={},
        models_compared={},
        rm=RewardModelFacts(accuracy=1.0),
        ppo=PPOFacts(kl=0.5, updates=1, estimator="gae", num_generations=1, kl_penalty="reward"),
    )
    card = card_section(r)
    assert "| polite Korean (part of the rule) | 0.250 | 0.750 | +0.500 |" in card
    assert "| on topic (part of the rule) | 0.500 | 0.500 | +0.000 |" in card


def test_report_answer_cells_keep_the_table_whole():
    """Catches an answer with a newline or a pipe breaking the report's markdown table (a model that runs on into
    an invented turn writes newlines)."""
    from pipeline.report import cell

    got = cell("수박은 좋다. | 모델\nmodel\n다음", False)
    assert "\n" not in got and "\\|" in got and got.endswith("*(no `<end_of_turn>`)*")
    assert cell("수박은 정말 좋습니다.", True) == "수박은 정말 좋습니다."
