"""`make plan`: the resolved plan and a memory estimate, offline, for the real recipe and the embedded one."""

from __future__ import annotations

import os
import subprocess

from pipeline.core.config import load_recipe
from pipeline.plan import KNOWN_CONFIGS, Arch, architecture, plan, trained_bytes
from tests.conftest import REPO


def test_parameter_counts_match_real_models(tiny_dir):
    from transformers import AutoModelForCausalLM

    assert Arch(**KNOWN_CONFIGS["google/gemma-2b"]).parameters() == 2_506_172_416  # the published gemma-2b count
    tiny, _ = architecture(load_recipe(REPO / "recipes" / "tiny_ko.yaml"))
    assert tiny.parameters() == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_dir).parameters())


def test_the_real_embedded_model_plans_without_being_built(monkeypatch):
    """embedded:gemma-3-270m plans from its upstream architecture (nothing built, nothing downloaded); Gemma 3's
    per-head query/key norms and extra feed-forward norms (32,256 parameters) are the only difference from the
    268,098,176 counted in the converted model's safetensors header."""
    from pipeline.core import embedded

    monkeypatch.setattr(embedded, "build", lambda *a: (_ for _ in ()).throw(AssertionError("built")))
    arch, source = architecture(load_recipe(REPO / "recipes" / "gemma3_270m_ko.yaml"))
    assert "google/gemma-3-270m" in source
    assert abs(arch.parameters() - 268_098_176) / 268_098_176 < 2e-4


def test_zero_accounting():
    n = 1000
    # no ZeRO: fp32 weights and gradients under autocast, Adam's two moments (the same 16 bytes per parameter)
    assert trained_bytes(n, 8, 0, "none") == {"weights": 4000, "gradients": 4000, "optimizer": 8000}
    assert trained_bytes(n, 8, 2, "none") == {"weights": 2000, "gradients": 250, "optimizer": 1500}
    assert trained_bytes(n, 8, 3, "cpu") == {"weights": 250, "gradients": 250, "optimizer": 0.0}


def test_plan_flags_what_does_not_fit():
    recipe = load_recipe(REPO / "recipes" / "gemma2b_ko.yaml")
    text, fits = plan(recipe, gpu_gib=80)
    assert fits and "2.506B parameters" in text and "8 process(es), DeepSpeed ZeRO-2" in text
    assert "196 updates of 512 rollouts (64 per process), 4 optimizer steps each" in text
    text, fits = plan(recipe, gpu_gib=16)
    assert not fits and "DOES NOT FIT 16 GiB" in text


def test_make_plan_runs_offline_for_the_real_recipe():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    res = subprocess.run(
        ["make", "plan", "RECIPE=recipes/gemma2b_ko.yaml"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "[sft]" in res.stdout and "[rm]" in res.stdout and "[ppo]" in res.stdout and "fits" in res.stdout
