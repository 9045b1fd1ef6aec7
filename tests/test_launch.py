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
from tests.helpers import REPO
from tests.helpers.launch import launch_command

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
    from types import SimpleNamespace

    from pipeline.core.heads import logit_positions

    stub = SimpleNamespace(config=SimpleNamespace(vocab_size=vocab))  # the config alone: no partitioned weight
    rows = logit_positions(stub, recipe.ppo.logits_memory_mb, "fp32")
    assert (
        f"[ppo] output head: {vocab} ids, fp32 (ppo.head_precision); logits of up to {rows} response positions" in out
    )
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


RECORDER = """
import json, os

def record(prompts, responses, ended, **columns):
    rank = int(os.environ.get("RANK", "0"))
    with open(os.environ["REWARD_LOG"], "a") as f:
        f.write(json.dumps({"rank": rank, "prompts": prompts, "responses": len(responses)}, ensure_ascii=False) + "\\n")
    if os.environ.get("REWARD_FAIL_RANK") == str(rank):
        raise ValueError("the checker broke")
    return [float(len(r) % 2) for r in responses]
"""


@pytest.mark.slow
def test_reward_functions_under_ddp_each_process_scores_its_own_rows(data_root, tmp_path):
    """``ppo.reward_model: none`` with a reward function on 2 processes: each process calls it on exactly its own
    rollout rows (the prompts ``batch_rows`` gives its rank), and no reward model is trained or loaded. Catches rows
    scored twice or by the wrong process (a gather before scoring), and a function failing on one process hanging
    the other instead of stopping both in one line."""
    import datasets

    from pipeline.core.batching import batch_sizes
    from pipeline.core.rewards import PromptRows
    from pipeline.ppo import batch_rows

    (tmp_path / "recorder.py").write_text(RECORDER)
    log = tmp_path / "calls.jsonl"
    run = "launch_reward_functions"
    shutil.copytree(data_root / "tiny_ko" / "data", data_root / run / "data")
    sft_dir = data_root / "tiny_ko" / "sft" / "final"
    if not sft_dir.exists():
        _ppo_inputs(data_root, "unused")
    shutil.copytree(sft_dir, data_root / run / "sft" / "final")
    overrides = [
        "ppo.estimator=rloo",
        "ppo.num_generations=4",
        "ppo.reward_model=none",
        "ppo.normalize_reward=false",
        f"ppo.reward_functions=[{{function: '{tmp_path}/recorder.py:record'}}]",
        "ppo.total_episodes=32",
        *[x for x in PPO_SIZES if "rm" not in x.split("=")[0]],
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "REWARD_LOG": str(log)}
    cmd = launch_command("ppo", "ddp", f"run.output_dir={data_root}", f"run.name={run}", "tracking.mode=disabled")
    res = subprocess.run([*cmd, *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert not (data_root / run / "rm").exists() and "reward model" not in res.stdout.split("weights:")[-1]
    calls = [json.loads(x) for x in log.read_text().splitlines()]
    train = datasets.Dataset.from_parquet(str(data_root / run / "data" / "prompts" / "train.parquet"))
    texts = PromptRows.read(train["messages"], train["columns"], "train").prompts
    sizes = batch_sizes(4, 2, 2, 2, 32, 2)
    for update in range(2):
        for rank in (0, 1):
            expected = [texts[i] for i in batch_rows(len(texts), update, sizes, rank, 42, 4)]
            got = [c["prompts"] for c in calls if c["rank"] == rank and c["responses"] == 8][update]
            assert got == expected, (update, rank)
    # 2 updates x 2 processes of 8 rows (2 prompts x 4 samples), then the panel's 4 prompts answered by the start
    # and by the policy, on each process
    assert sorted(c["responses"] for c in calls) == [4] * 4 + [8] * 4, [c["responses"] for c in calls]

    shutil.rmtree(data_root / run / "ppo")
    env["REWARD_FAIL_RANK"] = "1"
    res = subprocess.run([*cmd, *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0
    assert "reward function record (" in res.stderr and "raised ValueError: the checker broke" in res.stderr
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert not (data_root / run / "ppo" / "final").exists()


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


# --------------------------------------------------------------------------------------------------------------
# Guards that hold on a partitioned model, and the precision DeepSpeed keeps
# --------------------------------------------------------------------------------------------------------------

GUARD_SIZES = ("ppo.total_episodes=32", *PPO_SIZES)


def _launch_failing(stage: str, root, run: str, config: str, env: dict, *overrides: str):
    cmd = launch_command(
        stage, config, f"run.output_dir={root}", f"run.name={run}", "tracking.mode=disabled", *overrides
    )
    return subprocess.run(
        cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", **env}, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_zero3_a_nan_in_one_partition_stops_both_processes_naming_the_update(data_root):
    """Catches the non-finite-weights check looking at ZeRO-3 parameters themselves, which outside a gather are empty
    placeholders: a NaN written after update 2's optimizer steps into process 1's partition alone stops both
    processes at update 2, naming the process that holds it. Negative control: the fault hook reports what a check of
    the parameters themselves (the old check) sees on that process: finite."""
    from pipeline.core.faults import FAULT_ENV

    run = "guard_nan_zero3"
    _ppo_inputs(data_root, run)
    res = _launch_failing("ppo", data_root, run, "zero3", {FAULT_ENV: "ppo:2:after@1"}, *GUARD_SIZES)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out[-4000:]
    assert "a check of the parameters themselves finds them finite: True" in out, out[-4000:]
    for rank in (0, 1):
        assert (
            f"[rank {rank}] error: non-finite weights after the optimizer steps of update 2 (held by process 1)"
            in (res.stderr)
        ), res.stderr[-4000:]
    ckpts = data_root / run / "ppo" / "checkpoints"
    assert (ckpts / "checkpoint-1" / "COMPLETE").is_file() and not (ckpts / "checkpoint-2").exists()
    assert not (data_root / run / "ppo" / "final").exists()


@pytest.mark.slow
def test_a_sampler_error_on_one_machine_stops_the_other_with_its_message(data_root):
    """Two machines (one process each, gloo): process 1 fails inside sampling at update 2; process 0, on the other
    machine, is blocked in its next collective, which its launcher knows nothing about. It stops at once, printing
    process 1's message, and both commands exit with its code. (Without the peer watch, process 0 ends on gloo's
    "connection closed by peer" traceback once process 1 has gone, and under NCCL waits out the collective timeout;
    the message asserted below could not be on process 0's output at all.)"""
    import socket

    from pipeline.core.faults import ERROR_ENV

    run = "guard_sampler_two_machines"
    _ppo_inputs(data_root, run)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        cmd = launch_command(
            "ppo", "zero3", f"run.output_dir={data_root}", f"run.name={run}", "tracking.mode=disabled"
        )
        cmd += [*GUARD_SIZES, "--num-machines", "2", "--machine-rank", str(rank), "--main-process-ip", "127.0.0.1"]
        cmd += ["--main-process-port", str(port)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", ERROR_ENV: "ppo:sample:2@1"}
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [1, 1], [o[1][-3000:] for o in outs]
    failing = f"{ERROR_ENV}: non-finite logits in the sampler at update 2 (rank 1)"
    assert f"[rank 1] error: {failing}" in outs[1][1]
    assert f"[rank 0] error: stopping: process 1 failed: {failing}" in outs[0][1], outs[0][1][-3000:]
    assert "Traceback" not in outs[0][1] + outs[1][1]


def _first_update(root, run: str) -> dict:
    return json.loads((root / run / "ppo" / "metrics.jsonl").read_text().splitlines()[0])


@pytest.mark.slow
def test_deepspeed_bf16_keeps_the_frozen_models_fp32_and_the_first_kl_exactly_zero(data_root):
    """Catches DeepSpeed's bf16 mode casting the "fp32" reference and reward models to bf16 (TRL's prepare_deepspeed
    copies the engine's bf16 section), and a policy whose rollout log-probs come from bf16 weights while the
    reference's come from fp32 ones: under DeepSpeed ZeRO-2 and run.precision bf16, the start line reads fp32 from
    every model's parameters and the first update's KL is exactly 0. Negative control: the same launch with bf16
    frozen models reads bf16 and its first KL is not 0, so the KL check sees a precision mismatch."""
    _ppo_inputs(data_root, "ds_bf16")
    out = _launch("ppo", data_root, "ds_bf16", "zero2", "run.precision=bf16", *GUARD_SIZES)
    assert "; bf16;" in out and "weights: policy fp32, value fp32, reference fp32, reward model fp32" in out, out[
        -3000:
    ]
    assert _first_update(data_root, "ds_bf16")["objective/kl"] == 0.0
    _ppo_inputs(data_root, "ds_bf16_frozen")
    out = _launch(
        "ppo", data_root, "ds_bf16_frozen", "zero2", "run.precision=bf16", "ppo.frozen_precision=bf16", *GUARD_SIZES
    )
    assert "reference bf16, reward model bf16" in out, out[-3000:]
    assert _first_update(data_root, "ds_bf16_frozen")["objective/kl"] != 0.0


@pytest.mark.slow
def test_lora_sft_under_zero3_merges_its_adapter_at_the_final_save(data_root, tiny_dir):
    """Catches the final save of a LoRA stage hanging under ZeRO-3 (the main process alone loaded the base for the
    merge inside deepspeed.zero.Init, waiting for the others forever) and a merge of empty adapter partitions: the
    merged weights are the base plus scale x B @ A of the gathered adapter."""
    import torch

    run = "lora_zero3"
    shutil.copytree(data_root / "tiny_ko" / "data", data_root / run / "data", dirs_exist_ok=True)
    _launch(
        "sft", data_root, run, "zero3", "sft.method=lora", "sft.max_steps=3", "sft.save_steps=2", "sft.eval_steps=2"
    )
    final = data_root / run / "sft" / "final"
    assert missing_notices(final) == []
    adapter = load_file(final / "adapter" / "adapter_model.safetensors")
    merged, base = load_file(final / "model.safetensors"), load_file(tiny_dir / "model.safetensors")
    scale = json.loads((final / "adapter" / "adapter_config.json").read_text())
    scale = scale["lora_alpha"] / scale["r"]
    pairs = [k for k in adapter if "lora_A" in k]
    assert pairs
    for a_key in pairs:
        b_key = a_key.replace("lora_A", "lora_B")
        target = a_key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        assert adapter[b_key].abs().sum() > 0  # trained (B starts at zero)
        assert torch.allclose(merged[target], base[target] + scale * adapter[b_key] @ adapter[a_key], atol=1e-6)
