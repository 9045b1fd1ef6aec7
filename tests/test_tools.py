"""The inspector and the data benchmark run and report what they claim."""

from __future__ import annotations

import json

import pytest

from pipeline.bench import main as bench_main
from pipeline.data import main as data_main
from pipeline.inspect import main as inspect_main
from tests.conftest import REPO


def test_inspect_shows_the_loss_mask(tmp_path, capsys):
    recipe = str(REPO / "recipes" / "tiny_ko.yaml")
    assert data_main(["--recipe", recipe, f"run.output_dir={tmp_path}"]) == 0
    capsys.readouterr()
    assert inspect_main(["--recipe", recipe, f"run.output_dir={tmp_path}", "--index", "0", "--tokens"]) == 0
    out = capsys.readouterr().out
    assert "<bos><start_of_turn>user\n" in out and "«" in out and out.count("<bos>") == 2  # text + token table
    assert "<end_of_turn>»" in out  # the model turn's <end_of_turn> is inside the trained span
    assert inspect_main(["--recipe", recipe, f"run.output_dir={tmp_path}", "--stage", "preference"]) == 0
    assert inspect_main(["--recipe", recipe, f"run.output_dir={tmp_path / 'none'}"]) == 2


def test_data_bench_reports_ratio(capsys):
    bench_main(["data", "--rows", "2000", "--repeats", "1"])
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert line["rows"] == 2000 and line["stage_rows_per_s"] > 0 and line["raw_tokenizer_rows_per_s"] > 0
    assert line["ratio_stage_vs_raw"] > 0


def test_eta_from_the_pace_of_this_process():
    """Catches an ETA from the whole run's count after a resume (it would credit the killed run's steps)."""
    from pipeline.core.progress import eta

    assert eta(10.0, 0, 5) == ""  # nothing done yet: no pace
    assert eta(10.0, 1, 5) == "ETA 40s"
    assert eta(100.0, 1, 5) == "ETA 6m40s"
    assert eta(4000.0, 1, 3) == "ETA 2h13m"
    assert eta(5.0, 5, 5) == "ETA 0s"


def test_report_rules_report_each_part_of_the_topic_rule():
    """Catches the report's topic rule collapsing into one number (or into the style rule): each part and their
    conjunction are reported, arithmetic prompts apart."""
    from pipeline.report import card_section, ground_truth_check

    topic, style = ground_truth_check("polite_on_topic"), ground_truth_check("polite_korean")
    assert ground_truth_check("none") is None
    off = ("사과는 무엇인가요?", "바나나는 정말 좋습니다.", True)
    assert topic(*off) == {"accuracy": False, "polite_accuracy": True, "on_topic_accuracy": False}
    assert style(*off) == {"accuracy": True}  # negative control: the style rule alone passes it
    assert topic("3 더하기 4는?", "정답은 7이에요.", True) == {"accuracy": None, "arithmetic_accuracy": True}
    r = {
        "ground_truth": "polite_on_topic",
        "heldout_prompts": 2,
        "samples_per_prompt": 1,
        "rm_accuracy": 1.0,
        "ppo_kl": 0.5,
        **{f"{m}_{k}": v for m, v in (("sft", 0.25), ("ppo", 0.75)) for k in ("accuracy", "polite_accuracy")},
        **{f"{m}_on_topic_accuracy": 0.5 for m in ("sft", "ppo")},
    }
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


def test_ppo_bench_profile_splits_phases_and_head_time(tiny_dir):
    """Catches a profile whose phases are missing (labels not reached, so all time lands in ``unlabelled``) or whose
    head classification finds nothing: on the toy every phase appears, the sampler and the training step spend time
    in vocabulary-sized operators, and the value and reward forwards (no output head) none. Negative control: the
    same trace read without labels puts everything under ``unlabelled``."""
    import torch
    from torch.profiler import ProfilerActivity, record_function

    from pipeline.bench import PPO_PHASES, bench_ppo, phase_breakdown

    r = bench_ppo(str(tiny_dir), 8, 8, 1, 1, 1, {"rollout_logprobs": "sampler"}, profile=True)
    p = r["profile"]
    assert {"ppo/sample", "ppo/values", "ppo/reference", "ppo/reward", "ppo/train"} <= set(p)
    assert p["ppo/sample"]["head_s"] > 0 and p["ppo/train"]["head_s"] > 0 and p["ppo/reference"]["head_s"] > 0
    assert p["ppo/values"]["head_s"] == 0 and p["ppo/reward"]["head_s"] == 0
    assert p["ppo/train"]["s"] > p["ppo/train"]["head_s"]
    assert r["optimizer_steps"] == 2  # counted over the two timed iterations, before the profiled one
    with torch.profiler.profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        with record_function("ppo/train"):
            torch.randn(512, 77) @ torch.randn(77, 8192)
    assert phase_breakdown(prof.events(), 77, PPO_PHASES)["ppo/train"]["head_s"] > 0
    assert set(phase_breakdown(prof.events(), 77, ())) == {"unlabelled"}


def test_estimator_bench_measures_the_value_models_memory_saved(tiny_dir):
    """Catches a critic-free run that still holds a value model (or its Adam moments), and a training-state count
    that misses a model: GAE's measured training state minus RLOO's is exactly the value model's weights, gradients
    and two Adam moments (counted here independently from a freshly loaded classifier), and nothing else."""
    from transformers import AutoModelForSequenceClassification

    from pipeline.bench import bench_ppo

    gae = bench_ppo(str(tiny_dir), 8, 8, 1, 1, 1, {"rollout_logprobs": "sampler"})
    rloo = bench_ppo(
        str(tiny_dir), 8, 8, 1, 1, 1, {"rollout_logprobs": "sampler", "estimator": "rloo", "num_generations": 4}
    )
    assert rloo["settings"]["estimator"] == "rloo" and rloo["optimizer_steps"] == gae["optimizer_steps"] == 2
    value = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1)
    params = list(value.parameters())
    # weight, gradient and Adam's two moments in fp32, and Adam's step counter (one fp32 scalar per tensor)
    expected = (sum(p.numel() for p in params) * 4 * 4 + len(params) * 4) / 2**20
    assert gae["train_state_mb"] - rloo["train_state_mb"] == pytest.approx(expected, rel=1e-6)
    assert rloo["train_state_mb"] < 0.8 * gae["train_state_mb"]
