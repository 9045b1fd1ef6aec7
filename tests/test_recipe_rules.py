"""Every recipe rule, launch-dependent ones included, is refused before anything trains: by `make recipe`, by `make
plan` and by the first stage of a chain, in one line naming the key, under the launch the stages will run with
(ACCELERATE_CONFIG, NUM_PROCESSES, NUM_MACHINES). Before, a PPO batch that does not split into minibatches, a group
size that does not divide the rollouts per process, LoRA or bf16 frozen models under ZeRO-3 passed `make recipe` and
stopped PPO only after SFT and the reward model had trained; a batch of 0 or negative epochs were accepted."""

from __future__ import annotations

import os
import subprocess

import pytest

from pipeline.core import topology
from pipeline.core.config import ConfigError, load_recipe, validate
from tests.helpers import REPO

RECIPE = REPO / "recipes" / "tiny_ko.yaml"
ZERO3 = ("ACCELERATE_CONFIG=configs/accelerate/zero3.yaml", "NUM_PROCESSES=2")

# (overrides, launch variables, the key the one-line error names)
BAD = [
    ("ppo.num_mini_batches=3", (), "ppo.num_mini_batches"),
    ("ppo.estimator=rloo ppo.num_generations=3", (), "ppo.num_generations"),
    ("ppo.method=lora", ZERO3, "ppo.method"),
    ("ppo.frozen_precision=bf16", ZERO3, "ppo.frozen_precision"),
    ("sft.per_device_train_batch_size=0", (), "sft.per_device_train_batch_size"),
    ("rm.num_train_epochs=-2", (), "rm.num_train_epochs"),
    ("", ("ACCELERATE_CONFIG=configs/accelerate/zero2.yaml", "NUM_PROCESSES=3", "NUM_MACHINES=2"), "NUM_PROCESSES"),
]


def _make(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(["make", "-s", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("overrides, launch, key", BAD, ids=[b[2] + (" " + b[1][0][18:] if b[1] else "") for b in BAD])
def test_make_recipe_refuses_in_one_line_naming_the_key(overrides, launch, key):
    res = _make("recipe", f"RECIPE={RECIPE}", *launch, f"OVERRIDES={overrides}")
    assert res.returncode != 0, res.stdout[-2000:]
    lines = _error_lines(res.stderr)
    assert len(lines) == 1 and f"key '{key}'" in lines[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr


def test_the_same_recipes_pass_under_a_launch_they_fit():
    """Negative control of the launch-dependent refusals: LoRA PPO and bf16 frozen models pass under ZeRO-2, three
    minibatches pass when they divide the rollouts per process, so the refusals above are about the launch."""
    for overrides, launch in (
        ("ppo.method=lora", ("ACCELERATE_CONFIG=configs/accelerate/zero2.yaml", "NUM_PROCESSES=2")),
        ("ppo.frozen_precision=bf16", ("ACCELERATE_CONFIG=configs/accelerate/zero2.yaml", "NUM_PROCESSES=2")),
        ("ppo.num_mini_batches=3 ppo.per_device_train_batch_size=2 ppo.gradient_accumulation_steps=3", ()),
    ):
        res = _make("recipe", f"RECIPE={RECIPE}", *launch, f"OVERRIDES={overrides}")
        assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.slow
def test_a_chain_with_a_bad_recipe_trains_nothing(tmp_path):
    """`make sft rm ppo` stops at the head of the chain (the data stage checks the recipe against the launch), before
    the data stage writes or any stage trains."""
    for overrides, launch, key in BAD:
        res = _make(
            "sft", "rm", "ppo", f"RECIPE={RECIPE}", *launch, f"OVERRIDES=run.output_dir={tmp_path} {overrides}"
        )
        assert res.returncode != 0 and f"key '{key}'" in res.stderr, res.stderr[-2000:]
        assert "[launch]" not in res.stdout  # no stage was launched
    assert not any(tmp_path.iterdir()), sorted(p.name for p in tmp_path.rglob("*"))


def test_make_plan_takes_the_launch_the_stages_take():
    """`make plan` with ACCELERATE_CONFIG, NUM_PROCESSES and NUM_MACHINES plans that launch (it used to read only
    NUM_PROCESSES and the recipe's own config), and refuses what the launch refuses."""
    res = _make(
        "plan",
        "RECIPE=recipes/gemma2b_ko.yaml",
        "ACCELERATE_CONFIG=configs/accelerate/zero3.yaml",
        "NUM_PROCESSES=16",
        "NUM_MACHINES=2",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "launch: configs/accelerate/zero3.yaml, 16 process(es) on 2 machines, DeepSpeed ZeRO-3" in res.stdout
    res = _make("plan", f"RECIPE={RECIPE}", *ZERO3, "OVERRIDES=ppo.method=lora")
    assert res.returncode != 0 and len(_error_lines(res.stderr)) == 1 and "key 'ppo.method'" in res.stderr


def test_launch_is_read_with_the_stages_precedence(tmp_path):
    """Command line over the recipe's launch section over the accelerate config; NUM_PROCESSES is the total."""
    recipe = load_recipe(RECIPE)
    own = topology.resolve(recipe)
    assert (own.config_file, own.num_processes, own.num_machines, own.zero_stage) == (
        "configs/accelerate/single.yaml",
        1,
        1,
        0,
    )
    z3 = topology.resolve(recipe, "configs/accelerate/zero3_offload.yaml")
    assert (z3.num_processes, z3.zero_stage, z3.offload_optimizer, z3.deepspeed) == (2, 3, "cpu", True)
    assert (
        topology.resolve(load_recipe(RECIPE, ["launch.num_processes=4"]), "configs/accelerate/ddp.yaml").num_processes
        == 4
    )
    two = topology.resolve(recipe, "configs/accelerate/zero2.yaml", 16, 2, 1, "10.0.0.1", 29500)
    assert (two.num_processes, two.per_machine, two.machine_rank, two.main_process_port) == (16, 8, 1, 29500)
    # a DeepSpeed JSON named by the accelerate config gives the ZeRO stage
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 3}}')
    (tmp_path / "acc.yaml").write_text(
        f"distributed_type: DEEPSPEED\nnum_processes: 4\ndeepspeed_config:\n  deepspeed_config_file: {tmp_path}/ds.json\n"
    )
    assert topology.resolve(recipe, str(tmp_path / "acc.yaml")).zero_stage == 3
    with pytest.raises(ConfigError, match="does not exist"):
        topology.resolve(recipe, "configs/accelerate/nope.yaml")


def test_a_launched_stage_reads_its_launch_from_the_environment(monkeypatch):
    for k, v in {
        "WORLD_SIZE": "16",
        "LOCAL_WORLD_SIZE": "8",
        "GROUP_RANK": "1",
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
    }.items():
        monkeypatch.setenv(k, v)
    env = topology.from_environment()
    assert (env.num_processes, env.num_machines, env.machine_rank, env.zero_stage) == (16, 2, 1, 3)
    with pytest.raises(ConfigError, match="key 'ppo.method'"):
        topology.check(load_recipe(RECIPE, ["ppo.method=lora"]), env)


@pytest.mark.parametrize(
    "override, key",
    [
        ("sft.gradient_accumulation_steps=0", "sft.gradient_accumulation_steps"),
        ("dpo.per_device_eval_batch_size=0", "dpo.per_device_eval_batch_size"),
        ("sft.num_train_epochs=0", "sft.num_train_epochs"),
        ("rm.max_steps=0", "rm.max_steps"),
        ("sft.save_steps=0", "sft.save_steps"),
        ("dpo.warmup_ratio=1.5", "dpo.warmup_ratio"),
        ("ppo.total_episodes=0", "ppo.total_episodes"),
        ("ppo.num_ppo_epochs=0", "ppo.num_ppo_epochs"),
        ("ppo.num_mini_batches=0", "ppo.num_mini_batches"),
        ("ppo.response_length=0", "ppo.response_length"),
        ("ppo.cliprange=0", "ppo.cliprange"),
        ("ppo.max_grad_norm=0", "ppo.max_grad_norm"),
        ("ppo.kl_coef=-0.1", "ppo.kl_coef"),
        ("ppo.save_steps=0", "ppo.save_steps"),
        ("ppo.kl_target=0", "ppo.kl_target"),
        ("report.samples_per_prompt=0", "report.samples_per_prompt"),
        ("launch.wait_minutes=0", "launch.wait_minutes"),
    ],
)
def test_every_range_rule_names_its_key(override, key):
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        validate(load_recipe(RECIPE, [override]), source="r.yaml")


def test_max_steps_stands_in_for_epochs():
    """Negative control: epochs of 0 are fine when max_steps sets the length (and every shipped default passes)."""
    validate(load_recipe(RECIPE, ["sft.num_train_epochs=0", "sft.max_steps=5"]), source="r.yaml")


def test_every_documented_accelerate_command_names_its_process_count():
    """A `make ... ACCELERATE_CONFIG=...` command in the docs without NUM_PROCESSES runs the config's own count (2 in
    the shipped multi-process configs): docs/dpo.md's ZeRO-3 example silently ran 2 processes on an 8-GPU node."""
    import re

    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = doc.read_text(encoding="utf-8").replace("\\\n", " ")
        for line in text.splitlines():
            if re.search(r"\bmake\b.*ACCELERATE_CONFIG=configs/accelerate/(?!single|\w+_8gpu)", line):
                assert "NUM_PROCESSES=" in line, f"{doc.name}: {line.strip()}"
