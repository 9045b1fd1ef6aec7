"""`make plan`: the resolved plan and a memory estimate, offline, for the real recipe and the embedded one."""

from __future__ import annotations

import os
import subprocess

import pytest

from pipeline.core import topology
from pipeline.core.config import load_recipe
from pipeline.plan import (
    KNOWN_CONFIGS,
    Arch,
    architecture,
    dpo_shape,
    per_gpu,
    ppo_shape,
    sft_shape,
    trained_bytes,
)
from tests.helpers import REPO


def plan(recipe, gpu_gib: float = 80.0, **launch):
    """The plan under the recipe's own launch (or ``launch``: topology.resolve's options)."""
    from pipeline.plan import plan as make_plan

    return make_plan(recipe, topology.resolve(recipe, **launch), gpu_gib)


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
    assert all(f"[{stage}]" in res.stdout for stage in ("sft", "rm", "ppo", "dpo")) and "fits" in res.stdout


GEMMA_2B = 2_506_172_416  # the published gemma-2b parameter count (test_parameter_counts_match_real_models)
ADAPTERS = GEMMA_2B // 100  # LoRA adapters, planned at about 1% of the parameters
ZERO2_8 = (8, 2, "none")  # gemma2b_ko's launch: 8 processes, ZeRO-2, no offload


def _gemma2b(*overrides: str):
    recipe = load_recipe(REPO / "recipes" / "gemma2b_ko.yaml", list(overrides))
    return recipe, architecture(recipe)[0]


def _total(shape) -> float:
    return sum(per_gpu(shape, *ZERO2_8).values())


@pytest.mark.parametrize("estimator", ["rloo", "grpo"])
def test_critic_free_ppo_plans_without_the_value_model(estimator):
    """Catches the plan charging rloo/grpo for a value model they never build (its weights, gradients, Adam states
    and training activations), or multiplying the rollout rows by num_generations (the rollout batch already counts
    samples: prompts x num_generations). The value model's share is computed here by hand for gemma-2b on 8 GPUs
    under ZeRO-2: 2 bytes of weights, 2/8 of gradients and 12/8 of fp32 master and moments per parameter of a
    classifier (the decoder plus a 2048-wide score head), and 2 x hidden bytes per token and layer of one checkpointed
    micro-batch (8 rows of prompt + response)."""
    gae, a = _gemma2b()
    critic_free, _ = _gemma2b(f"ppo.estimator={estimator}", "ppo.num_generations=4")
    assert (gae.ppo.per_device_train_batch_size, gae.ppo.gradient_checkpointing) == (8, True)
    value_params = GEMMA_2B + 2048
    tokens = 8 * (gae.data.max_prompt_length + gae.ppo.response_length)
    value_share = (2 + 2 / 8 + 12 / 8) * value_params + tokens * 18 * 2 * 2048
    local_batch = 64
    with_value = _total(ppo_shape(gae, a, local_batch))
    without = _total(ppo_shape(critic_free, a, local_batch))
    assert without < with_value
    assert without == pytest.approx(with_value - value_share, rel=1e-12)
    assert value_share > 0.3 * with_value  # a share this size cannot hide in the tolerance above
    # the same rows per GPU whatever the samples per prompt: 2 or 4 generations plan alike
    two, _ = _gemma2b(f"ppo.estimator={estimator}", "ppo.num_generations=2")
    assert _total(ppo_shape(two, a, local_batch)) == without
    # LoRA: the adapters are all that trains (no value model beside them); the base is still held frozen
    lora, _ = _gemma2b(f"ppo.estimator={estimator}", "ppo.num_generations=4", "ppo.method=lora")
    parts = per_gpu(ppo_shape(lora, a, local_batch), *ZERO2_8)
    assert parts["optimizer"] == pytest.approx(12 / 8 * ADAPTERS)
    assert parts["frozen models"] == pytest.approx(2 * GEMMA_2B + 2 * value_params)  # base and reward model
    text, fits = plan(critic_free)
    assert fits and f"estimator {estimator}, 4 samples per prompt, no value model" in text
    assert "512 rollouts (64 per process; 128 prompts x 4 samples)" in text
    assert "estimator gae, value from rm" in plan(gae)[0]  # negative control: GAE still names its value model


def test_dpo_plans_a_reference_copy_for_full_and_none_under_lora():
    """Catches a DPO estimate without its reference model (full fine-tuning holds a second frozen copy of the SFT
    model), one that adds a copy under LoRA (where the adapter-disabled base is the reference), or one counting a
    pair as one row (chosen and rejected both go through the policy: a pair costs what two SFT rows cost)."""
    full, a = _gemma2b("dpo.method=full", "dpo.gradient_checkpointing=true", "dpo.per_device_train_batch_size=4")
    lora, _ = _gemma2b("dpo.method=lora", "dpo.gradient_checkpointing=true", "dpo.per_device_train_batch_size=4")
    f, lo = per_gpu(dpo_shape(full, a), *ZERO2_8), per_gpu(dpo_shape(lora, a), *ZERO2_8)
    assert f["frozen models"] == lo["frozen models"] == 2 * GEMMA_2B  # one 16-bit copy each: reference, LoRA base
    assert f["optimizer"] == pytest.approx(12 / 8 * GEMMA_2B)
    assert lo["optimizer"] == pytest.approx(12 / 8 * ADAPTERS)
    assert sum(f.values()) > sum(lo.values())
    assert sum(f.values()) - sum(lo.values()) == pytest.approx((2 + 2 / 8 + 12 / 8) * (GEMMA_2B - ADAPTERS))
    # 4 pairs per micro-batch cost what 8 SFT rows of the same length cost; not what 4 rows cost (negative control)
    sft8, _ = _gemma2b("sft.per_device_train_batch_size=8", "sft.gradient_checkpointing=true")
    sft4, _ = _gemma2b("sft.per_device_train_batch_size=4", "sft.gradient_checkpointing=true")
    dpo = dpo_shape(full, a)
    assert (dpo.activations, dpo.logits) == (sft_shape(sft8, a).activations, sft_shape(sft8, a).logits)
    assert dpo.activations != sft_shape(sft4, a).activations
    text, _ = plan(lora)
    assert "[dpo]" in text and "method lora" in text and "reference: the adapter-disabled base (no copy)" in text
    assert "reference: a frozen copy of the SFT model" in plan(full)[0]


def test_ppo_on_reward_functions_plans_without_the_reward_model_and_names_its_chain():
    """Catches the plan charging a reward-model-free PPO for a reward model it never loads, and `make plan` hiding
    which stages `make ppo` runs when PPO starts from another model (``ppo.init_from``)."""
    functions = [
        "ppo.reward_model=none",
        "ppo.normalize_reward=false",
        "ppo.reward_functions=[{function: 'data_prep.tiny_ko.rules:polite_reward'}]",
    ]
    rm, a = _gemma2b("ppo.estimator=grpo", "ppo.num_generations=4")
    free, _ = _gemma2b("ppo.estimator=grpo", "ppo.num_generations=4", "ppo.init_from=google/gemma-2b-it", *functions)
    with_rm, without = per_gpu(ppo_shape(rm, a, 64), *ZERO2_8), per_gpu(ppo_shape(free, a, 64), *ZERO2_8)
    classifier = a.parameters(lm_head=False)
    assert with_rm["frozen models"] - without["frozen models"] == pytest.approx(2 * classifier)  # bf16 under ZeRO
    text = plan(free)[0]
    assert "starts from google/gemma-2b-it; score: data_prep.tiny_ko.rules:polite_reward x 1" in text
    assert "make ppo runs: data -> ppo" in text and "make dpo runs: data -> sft -> dpo" in text
    assert "make ppo runs: data -> sft -> rm -> ppo" in plan(rm)[0]  # negative control: the default chain
