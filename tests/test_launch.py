"""Stages under `accelerate launch` with 2 CPU processes (gloo): DDP, DeepSpeed ZeRO-2 and ZeRO-3, through the
same launcher and configs as `make sft` / `make rm` (GPU-style configs; the stages select gloo on a CPU machine)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from pipeline.core.notices import missing_notices
from pipeline.data import main as data_main
from tests.conftest import REPO, launch_command

RECIPE = REPO / "recipes" / "tiny_ko.yaml"
CONFIGS = [("ddp", "MULTI_CPU"), ("zero2", "DeepSpeed ZeRO-2"), ("zero3", "DeepSpeed ZeRO-3")]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    out = tmp_path_factory.mktemp("launch")
    assert data_main(["--recipe", str(RECIPE), f"run.output_dir={out}"]) == 0
    return out


def _launch(stage: str, root, run: str, config: str, *overrides: str) -> str:
    cmd = launch_command(
        stage, config, f"run.output_dir={root}", f"run.name={run}", "tracking.mode=disabled", *overrides
    )
    res = subprocess.run(
        cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=600
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    return out


def _engine_ran(ckpt, config: str) -> None:
    """The checkpoint's layout shows which engine wrote it (not a label built from environment variables): ZeRO
    partitions the optimizer state over both processes (ZeRO-3 the weights too); DDP saves one optimizer file."""
    files = {p.name for p in ckpt.rglob("*") if p.is_file()}
    optim = {r: any(f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" in f for f in files) for r in (0, 1)}
    weights_partitioned = {"zero_pp_rank_1_mp_rank_00_model_states.pt"} <= files
    if config == "ddp":
        assert not any(optim.values()) and files & {"optimizer.pt", "optimizer.bin"}, sorted(files)
    else:
        assert all(optim.values()), sorted(files)  # one optimizer partition per process
        assert weights_partitioned == (config == "zero3"), sorted(files)


@pytest.mark.slow
@pytest.mark.parametrize("config, kind", CONFIGS)
def test_sft_two_processes(data_root, tiny_dir, config, kind):
    run = f"launch_{config}"
    shutil.copytree(data_root / "tiny_ko" / "data", data_root / run / "data", dirs_exist_ok=True)
    out = _launch(
        "sft", data_root, run, config, "sft.max_steps=6", "sft.save_steps=3", "sft.eval_steps=3", "sft.logging_steps=1"
    )
    assert f"[sft] 2 process(es), {kind}" in out, out[-4000:]
    final = data_root / run / "sft" / "final"
    for ckpt in (final, data_root / run / "sft" / "checkpoints" / "checkpoint-3"):
        assert missing_notices(ckpt) == [], ckpt
    _engine_ran(data_root / run / "sft" / "checkpoints" / "checkpoint-3", config)
    # A full, consolidated checkpoint (under ZeRO-3 too): every tensor has the base model's shape.
    base, saved = load_file(tiny_dir / "model.safetensors"), load_file(final / "model.safetensors")
    assert set(base) <= set(saved)
    assert {k: v.shape for k, v in base.items()} == {k: v.shape for k, v in saved.items() if k in base}
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(final)


@pytest.mark.slow
@pytest.mark.parametrize("config, kind", CONFIGS)
def test_rm_two_processes(data_root, config, kind):
    from pipeline import sft
    from pipeline.core.config import load_recipe

    sft_final = data_root / "tiny_ko" / "sft" / "final"
    if not sft_final.exists():  # one short SFT serves the three launches
        sft.run(
            load_recipe(
                RECIPE,
                [
                    f"run.output_dir={data_root}",
                    "sft.max_steps=20",
                    "sft.eval_steps=100",
                    "sft.save_steps=100",
                    "tracking.mode=disabled",
                ],
            )
        )
    run = f"launch_rm_{config}"
    shutil.copytree(data_root / "tiny_ko" / "data", data_root / run / "data", dirs_exist_ok=True)
    shutil.copytree(sft_final, data_root / run / "sft" / "final", dirs_exist_ok=True)
    out = _launch(
        "rm", data_root, run, config, "rm.max_steps=6", "rm.save_steps=3", "rm.eval_steps=3", "rm.logging_steps=1"
    )
    assert f"[rm] 2 process(es), {kind}" in out, out[-4000:]
    final = data_root / run / "rm" / "final"
    assert missing_notices(final) == []
    assert missing_notices(data_root / run / "rm" / "checkpoints" / "checkpoint-3") == []
    _engine_ran(data_root / run / "rm" / "checkpoints" / "checkpoint-3", config)
    stats = json.loads((final / "reward_stats.json").read_text())
    assert stats["pairs"] == 116  # every held-out pair scored exactly once across the two processes
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(final)
    assert model.score.weight.shape == (1, model.config.hidden_size)


def _ppo_inputs(data_root, run: str):
    """Data, a short SFT and reward model (built once per module) copied into run folder ``run``; the recipe."""
    from pipeline import rm, sft
    from pipeline.core.config import load_recipe

    base = data_root / "tiny_ko"
    recipe = load_recipe(
        RECIPE,
        [
            f"run.output_dir={data_root}",
            "sft.max_steps=20",
            "sft.eval_steps=100",
            "sft.save_steps=100",
            "rm.max_steps=10",
            "tracking.mode=disabled",
        ],
    )
    if not (base / "sft" / "final").exists():
        sft.run(recipe)
    if not (base / "rm" / "final").exists():
        rm.run(recipe)
    for part in ("data", "sft/final", "rm/final"):
        shutil.copytree(base / part, data_root / run / part, dirs_exist_ok=True)
    return base, recipe


# 16 rollouts per update over the two processes, 2 epochs x 2 minibatches, a checkpoint every update
PPO_SIZES = (
    "ppo.per_device_train_batch_size=4",
    "ppo.gradient_accumulation_steps=2",
    "ppo.num_mini_batches=2",
    "ppo.num_ppo_epochs=2",
    "ppo.save_steps=1",
    "ppo.panel_every=2",
    "ppo.ignore_rm_gate=true",
    "rm.min_accuracy=0",
)


@pytest.mark.slow
@pytest.mark.parametrize("config, kind", CONFIGS)
def test_ppo_two_processes(data_root, config, kind):
    run = f"launch_ppo_{config}"
    base, recipe = _ppo_inputs(data_root, run)
    out = _launch(
        "ppo",
        data_root,
        run,
        config,
        "ppo.total_episodes=64",
        *PPO_SIZES,
    )
    assert f"[ppo] 2 process(es), {kind}" in out, out[-4000:]
    assert "4 updates of 16 rollouts, 4 optimizer steps each" in out, out[-4000:]
    final = data_root / run / "ppo" / "final"
    assert missing_notices(final) == []
    assert missing_notices(data_root / run / "ppo" / "checkpoints" / "checkpoint-3") == []
    _engine_ran(data_root / run / "ppo" / "checkpoints" / "checkpoint-3", config)
    # The log-prob chunks are sized from the config's vocabulary, also where ZeRO-3 partitions the head (E6).
    vocab = json.loads((base / "sft" / "final" / "config.json").read_text())["vocab_size"]
    rows = (recipe.ppo.logits_memory_mb << 20) // (4 * vocab)
    assert f"[ppo] output head: {vocab} ids; logits of up to {rows} response positions at a time" in out, out[-4000:]
    lineage = json.loads((final / "lineage.json").read_text())
    assert lineage["metrics"]["updates"] == 4 and lineage["metrics"]["optimizer_steps_this_session"] == 16
    from transformers import AutoModelForCausalLM

    base_sd = AutoModelForCausalLM.from_pretrained(base / "sft" / "final").state_dict()
    saved = AutoModelForCausalLM.from_pretrained(final).state_dict()
    assert {k: v.shape for k, v in base_sd.items()} == {k: v.shape for k, v in saved.items()}


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, kind, estimator",
    [("ddp", "MULTI_CPU", "rloo"), ("zero3", "DeepSpeed ZeRO-3", "grpo")],
)
def test_critic_free_ppo_two_processes(data_root, config, kind, estimator):
    """Catches a critic-free run that breaks under DDP or ZeRO-3 without a value model (an optimizer or engine
    that expects one, a gathered state dict with value keys, a value/ folder saved anyway) and the KL-as-a-loss
    path under a partitioned model. Each process holds 2 prompts x 4 samples."""
    run = f"launch_{estimator}_{config}"
    _ppo_inputs(data_root, run)
    out = _launch(
        "ppo",
        data_root,
        run,
        config,
        f"ppo.estimator={estimator}",
        "ppo.num_generations=4",
        "ppo.kl_penalty=loss",
        "ppo.kl_estimator=k3",
        "ppo.total_episodes=32",
        *PPO_SIZES,
    )
    assert f"[ppo] 2 process(es), {kind}" in out, out[-4000:]
    assert f"estimator {estimator}, 4 samples per prompt, no value model" in out, out[-4000:]
    assert "2 updates of 16 rollouts, 4 optimizer steps each" in out, out[-4000:]
    final = data_root / run / "ppo" / "final"
    assert missing_notices(final) == [] and not (final / "value").exists()
    _engine_ran(data_root / run / "ppo" / "checkpoints" / "checkpoint-1", config)
    metrics = [json.loads(x) for x in (data_root / run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [m["update"] for m in metrics] == [1, 2]
    # the KL term ran: after the first optimizer step the policy differs from the reference, so its k3 KL is > 0
    assert all(m["loss/kl_avg"] > 0 and "loss/value_avg" not in m for m in metrics)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(final)


@pytest.mark.slow
def test_a_stage_failing_on_two_processes_exits_with_its_code_in_one_line(data_root):
    from pipeline.core.faults import FAULT_ENV

    cmd = [sys.executable, "-m", "pipeline.launch", "sft", "--recipe", str(RECIPE), "--num-processes", "2"]
    cmd += ["--config-file", "configs/accelerate/ddp.yaml", f"run.output_dir={data_root}", "run.name=fail"]
    cmd += ["tracking.mode=disabled", "sft.max_steps=10", "sft.logging_steps=1", "sft.save_steps=2"]
    shutil.copytree(data_root / "tiny_ko" / "data", data_root / "fail" / "data")
    env = {**os.environ, FAULT_ENV: "sft:3"}  # NaN weights on every process before step 3
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 1, res.stderr[-3000:]
    ckpts = data_root / "fail" / "sft" / "checkpoints"
    assert (
        f"non-finite loss (nan) at step 3; stopping: the last good checkpoint, {ckpts / 'checkpoint-2'}" in res.stderr
    )
    assert re.search(r"error: pipeline\.sft: process [01] exited with code 1", res.stderr), res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert (ckpts / "checkpoint-2" / "COMPLETE").is_file() and not (data_root / "fail" / "sft" / "final").exists()
