"""The README's multi-machine commands, run as the README says: two "machines" on this box (two concurrent `make`
invocations with MACHINE_RANK=0 and 1, one process each, rendezvous on 127.0.0.1, gloo) over one shared `runs/`.

Catches: a multi-machine DeepSpeed launch handed to DeepSpeed's pdsh launcher instead of one torchrun job per machine
(the shipped configs name no multi-node launcher); both machines writing the data folder (or one cleaning the other's
half-written folder); a machine waiting forever or writing a second copy of a final; a two-machine job that trains
differently from the same job on one machine."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from pipeline.core.notices import missing_notices
from tests.helpers import REPO

RECIPE = "recipes/tiny_ko.yaml"
SMALL = (
    "sft.max_steps=3 sft.save_steps=2 sft.eval_steps=2 sft.logging_steps=1 rm.max_steps=3 rm.save_steps=2 "
    "rm.logging_steps=1 rm.min_accuracy=0 ppo.total_episodes=32 ppo.per_device_train_batch_size=4 "
    "ppo.gradient_accumulation_steps=2 ppo.num_mini_batches=2 ppo.num_ppo_epochs=1 ppo.save_steps=1 "
    "ppo.panel_every=0 tracking.mode=disabled report.samples_per_prompt=1 report.examples=1"
)
# One thread per process on both layouts: torch's reductions then add in the same order whether the two processes
# share a "machine" (accelerate gives each one thread) or not (each would get both cores), so losses compare exactly.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make(goals: list[str], out: Path, config: str, *launch: str, log: Path) -> subprocess.Popen:
    cmd = [
        "make",
        *goals,
        f"RECIPE={RECIPE}",
        f"ACCELERATE_CONFIG=configs/accelerate/{config}.yaml",
        "NUM_PROCESSES=2",
    ]
    cmd += [*launch, f"OVERRIDES=run.output_dir={out} {SMALL}"]
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def two_machines(goals: list[str], out: Path, config: str) -> list[str]:
    """The README's two-node commands on this box; both must exit 0. Returns each machine's output."""
    port = _free_port()
    procs = []
    for rank in (0, 1):
        launch = ("NUM_MACHINES=2", f"MACHINE_RANK={rank}", "MAIN_PROCESS_IP=127.0.0.1", f"MAIN_PROCESS_PORT={port}")
        procs.append(_make(goals, out, config, *launch, log=out.parent / f"{out.name}-machine{rank}.log"))
    codes = [p.wait(900) for p in procs]
    logs = [(out.parent / f"{out.name}-machine{rank}.log").read_text() for rank in (0, 1)]
    assert codes == [0, 0], "\n=====\n".join(log[-3000:] for log in logs)
    return logs


def one_machine(goals: list[str], out: Path, config: str) -> str:
    log = out.parent / f"{out.name}.log"
    assert _make(goals, out, config, log=log).wait(900) == 0, log.read_text()[-3000:]
    return log.read_text()


def history(run: Path) -> dict:
    """Every logged loss of the run: the Trainer stages' from their last checkpoint, PPO's per update."""
    out = {}
    for stage in ("sft", "rm"):
        ckpts = sorted((run / stage / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        if ckpts:
            state = json.loads((ckpts[-1] / "trainer_state.json").read_text())
            out[stage] = [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h]
    rows = [json.loads(x) for x in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    keys = ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg")
    out["ppo"] = [tuple(row[k] for k in keys) for row in rows]
    return out


def one_writer(run: Path, stages: tuple[str, ...], report: tuple[str, ...] = ()) -> None:
    """One data folder, one final per stage (and the report), nothing half-written or locked left behind."""
    found = sorted(p.name for p in run.iterdir())
    assert found == sorted(("data", *stages, *report)), found
    for stage in stages:
        assert sorted(p.name for p in (run / stage).iterdir() if p.name.startswith(("final", "."))) == ["final"]
        assert missing_notices(run / stage / "final") == []


def engine_partitioned_over_two(ckpt: Path) -> None:
    """The checkpoint shows one job of two processes: ZeRO wrote one optimizer partition per process."""
    names = {p.name for p in ckpt.rglob("*optim_states.pt")}
    assert any("zero_pp_rank_0_" in n for n in names) and any("zero_pp_rank_1_" in n for n in names), names


@pytest.fixture(scope="module")
def zero2_chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    logs = two_machines(["sft", "rm", "ppo", "report"], root / "two", "zero2")
    return root, logs


@pytest.mark.slow
def test_two_machines_run_the_chain_under_zero2_as_one_machine_does(zero2_chain):
    root, (m0, m1) = zero2_chain
    run = root / "two" / "tiny_ko"
    one_writer(run, ("sft", "rm", "ppo"), ("report", "report.json", "report.md"))
    assert "[data] wrote" in m0 and "[data] wrote" not in m1
    assert (
        "[report] wrote" in m0 and "[report] wrote" not in m1 and "written by machine 0" in m1.split("[report]", 1)[1]
    )
    assert "written by machine 0: using it" in m1
    for log, rank in ((m0, 0), (m1, 1)):
        assert f"--machine_rank {rank} " in log and "--deepspeed_multinode_launcher standard" in log
    assert "[ppo] 2 process(es), DeepSpeed ZeRO-2" in m0
    engine_partitioned_over_two(run / "sft" / "checkpoints" / "checkpoint-2")
    engine_partitioned_over_two(run / "ppo" / "checkpoints" / "checkpoint-1")
    one_machine(["sft", "rm", "ppo"], root / "one", "zero2")
    two, one = history(run), history(root / "one" / "tiny_ko")
    assert len(two["sft"]) == 3 and len(two["ppo"]) == 2
    assert two == one


@pytest.mark.slow
def test_two_machines_run_sft_and_ppo_under_zero3(zero2_chain):
    """ZeRO-3 partitions the weights over both machines' processes: SFT and PPO (the reward model reused) finish on
    both, and train as the same job on one machine does."""
    import shutil

    root, _ = zero2_chain
    for name in ("two3", "one3"):
        for part in ("data", "rm"):
            shutil.copytree(root / "two" / "tiny_ko" / part, root / name / "tiny_ko" / part)
    m0, m1 = two_machines(["sft", "ppo"], root / "two3", "zero3")
    run = root / "two3" / "tiny_ko"
    one_writer(run, ("sft", "rm", "ppo"))
    assert "[rm] already finished" in m0 and "[ppo] 2 process(es), DeepSpeed ZeRO-3" in m0
    weights = {p.name for p in (run / "sft" / "checkpoints" / "checkpoint-2").rglob("*model_states.pt")}
    assert "zero_pp_rank_1_mp_rank_00_model_states.pt" in weights, weights  # the weights partitioned too
    one_machine(["sft", "ppo"], root / "one3", "zero3")
    assert history(run) == history(root / "one3" / "tiny_ko")


def _accelerate_plan(argv: list[str]):
    """What accelerate would start for these launch arguments: (DeepSpeed's own command or None, the parsed args)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    args.deepspeed_fields_from_accelerate_config = (
        ",".join(defaults.deepspeed_config) if defaults else ""
    )  # as launch_command
    cmd, _ = prepare_deepspeed_cmd_env(args)
    return cmd, args


def test_every_machine_gets_a_torchrun_of_its_share_of_the_processes():
    """The launcher's command for machine 1 of 2 is a torchrun node of one 2-process job. Negative control: the same
    launch without the standard launcher (what accelerate did with the shipped configs) is DeepSpeed's pdsh launcher,
    which would start every node's processes from this one over ssh, not a 2-process job of two machines."""
    from pipeline.launch import build_command

    cmd = build_command(
        ["ppo", "--recipe", RECIPE, "--config-file", "configs/accelerate/zero2.yaml", "--num-processes", "16"]
        + [
            "--num-machines",
            "2",
            "--machine-rank",
            "1",
            "--main-process-ip",
            "10.0.0.1",
            "--main-process-port",
            "29500",
        ]
    )
    ours, args = _accelerate_plan(cmd[3:])
    assert ours is None  # no DeepSpeed launcher command: accelerate runs torchrun itself
    assert (args.nnodes, args.nproc_per_node, args.node_rank, args.master_addr) == ("2", "8", 1, "10.0.0.1")
    old = [a for a in cmd[3:] if a not in ("--deepspeed_multinode_launcher", "standard")]
    theirs, _ = _accelerate_plan(old)
    assert theirs is not None and theirs[0] == "deepspeed" and "pdsh" in theirs


@pytest.mark.slow
def test_machine_0_killed_mid_stage_stops_machine_1_and_both_resume(zero2_chain):
    """SIGKILL of machine 0's whole `make` (the writer of every checkpoint) while SFT trains: machine 1 does not
    wait on (it ends with an error), nothing half-written looks finished, and the same commands run again on both
    machines resume from the last complete checkpoint and finish."""
    import shutil
    import signal
    import time

    root, _ = zero2_chain
    out = root / "killed"
    shutil.copytree(root / "two" / "tiny_ko" / "data", out / "tiny_ko" / "data")
    sft = out / "tiny_ko" / "sft"
    port = _free_port()
    longer = "sft.max_steps=8 sft.save_steps=2 sft.eval_steps=100"

    def start(rank: int, log: str) -> subprocess.Popen:
        cmd = ["make", "sft", f"RECIPE={RECIPE}", "ACCELERATE_CONFIG=configs/accelerate/zero2.yaml", "NUM_PROCESSES=2"]
        cmd += ["NUM_MACHINES=2", f"MACHINE_RANK={rank}", "MAIN_PROCESS_IP=127.0.0.1", f"MAIN_PROCESS_PORT={port}"]
        cmd += [f"OVERRIDES=run.output_dir={out} {SMALL} {longer}"]
        return subprocess.Popen(
            cmd, cwd=REPO, env=ENV, stdout=open(root / log, "w"), stderr=subprocess.STDOUT, start_new_session=True
        )

    m0, m1 = start(0, "killed-0.log"), start(1, "killed-1.log")
    deadline = time.time() + 300
    while not (sft / "checkpoints" / "checkpoint-2" / "COMPLETE").is_file():
        assert m0.poll() is None and time.time() < deadline, (root / "killed-0.log").read_text()[-3000:]
        time.sleep(0.05)
    # A machine dies: every process it runs (torchrun starts its workers in process groups of their own).
    import psutil

    tree = [m0.pid, *(c.pid for c in psutil.Process(m0.pid).children(recursive=True))]
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    m0.wait()
    assert m1.wait(120) != 0  # machine 1 stopped on its own, well within the collective timeout
    assert not (sft / "final").exists()
    m0, m1 = start(0, "resumed-0.log"), start(1, "resumed-1.log")
    assert [m0.wait(600), m1.wait(600)] == [0, 0], (root / "resumed-0.log").read_text()[-3000:]
    assert "[sft] resuming from" in (root / "resumed-0.log").read_text()
    state = json.loads((sft / "checkpoints" / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8 and missing_notices(sft / "final") == []
    assert sorted(p.name for p in sft.iterdir() if p.name.startswith((".", "final"))) == ["final"]


def test_each_launched_process_gets_its_share_of_the_cpu_threads(monkeypatch):
    """Catches every launched stage running on one core: accelerate sets OMP_NUM_THREADS=1 in its processes unless
    the config says use_cpu (the shipped configs are GPU-style), so a CPU machine trained single-threaded. The
    launcher passes the cores shared by the machine's processes, or OMP_NUM_THREADS when the user set it."""
    import os

    from pipeline.launch import build_command

    def threads(*args: str) -> int:
        cmd = build_command(["sft", "--recipe", RECIPE, *args])
        return int(cmd[cmd.index("--num_cpu_threads_per_process") + 1])

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = os.cpu_count() or 1
    assert threads() == cores
    assert threads("--config-file", "configs/accelerate/ddp.yaml", "--num-processes", "2") == max(cores // 2, 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads() == 3
