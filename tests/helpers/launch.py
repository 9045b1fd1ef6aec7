"""Stages as subprocesses: ``python -m pipeline.launch`` with 2 processes and an accelerate config, and a stage
killed with SIGKILL at a checkpoint and run again."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from tests.helpers import REPO


def launch_command(stage: str, config: str, *args: str) -> list[str]:
    """``python -m pipeline.launch <stage>`` on the embedded recipe with 2 processes and an accelerate config."""
    return [
        sys.executable,
        "-m",
        "pipeline.launch",
        stage,
        "--recipe",
        str(REPO / "recipes" / "tiny_ko.yaml"),
        "--num-processes",
        "2",
        "--config-file",
        f"configs/accelerate/{config}.yaml",
        *args,
    ]


def kill_and_resume(stage: str, out: Path, overrides: list[str], kill_at: int, final_step: int) -> None:
    """Run ``stage`` as a subprocess, SIGKILL it once checkpoint ``kill_at`` is complete, run the same command
    again and check it resumes and ends at ``final_step``; a third run must skip the finished stage. The same
    command, uninterrupted, on a copy of the run folder must log the same losses and end with identical weights
    (same data position and RNG streams after the resume)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        f"pipeline.{stage}",
        "--recipe",
        str(REPO / "recipes" / "tiny_ko.yaml"),
        f"run.output_dir={out}",
        "tracking.mode=disabled",
        *overrides,
    ]
    ckpts = out / "tiny_ko" / stage / "checkpoints"
    ref = out.parent / f"{out.name}-uninterrupted"
    shutil.copytree(out / "tiny_ko", ref / "tiny_ko")  # the inputs: data (and the SFT model for the RM)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (ckpts / f"checkpoint-{kill_at}" / "COMPLETE").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before the checkpoint to kill at"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "tiny_ko" / stage / "final").exists()
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming from" in second.stdout
    state = json.loads((ckpts / f"checkpoint-{final_step}" / "trainer_state.json").read_text())
    assert state["global_step"] == final_step
    lineage = json.loads((out / "tiny_ko" / stage / "final" / "lineage.json").read_text())
    assert lineage["metrics"]["steps"] == final_step
    third = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0 and "already finished" in third.stdout

    plain = subprocess.run(
        [a.replace(f"run.output_dir={out}", f"run.output_dir={ref}") for a in cmd],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert plain.returncode == 0, plain.stderr[-3000:]

    def history(root: Path) -> list:
        state = json.loads(
            (root / "tiny_ko" / stage / "checkpoints" / f"checkpoint-{final_step}" / "trainer_state.json").read_text()
        )
        return [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h]

    assert history(out) == history(ref) and len(history(out)) > 1
    resumed = load_file(out / "tiny_ko" / stage / "final" / "model.safetensors")
    uninterrupted = load_file(ref / "tiny_ko" / stage / "final" / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert all(bool((resumed[k] == uninterrupted[k]).all()) for k in resumed), "resumed weights differ"
