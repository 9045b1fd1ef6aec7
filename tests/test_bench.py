"""The benchmarks (``python -m pipeline.bench``) measure what they report: the data stage against the raw tokenizer,
PPO's phases in a profile, and the training state a critic-free estimator saves."""

from __future__ import annotations

import json

import pytest

from pipeline.bench import main as bench_main


def test_data_bench_reports_ratio(capsys):
    bench_main(["data", "--rows", "2000", "--repeats", "1"])
    out = capsys.readouterr().out  # building the tiny model on a fresh checkout prints a line of its own first
    line = json.loads(next(x for x in out.splitlines() if x.startswith("{")))
    assert line["rows"] == 2000 and line["stage_rows_per_s"] > 0 and line["raw_tokenizer_rows_per_s"] > 0
    assert line["ratio_stage_vs_raw"] > 0


@pytest.mark.slow
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


@pytest.mark.slow
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
