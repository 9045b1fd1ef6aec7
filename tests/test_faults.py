"""Fault injection through the Makefile: SIGKILL the whole `make ppo` process group at several points (while the data
stage writes, mid-training, while a checkpoint is being saved, in every stage), run the same command again each time,
and check the chain completes with the step counts of an uninterrupted run and no incomplete directory in use."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from pipeline.notices import missing_notices
from tests.conftest import REPO

SMALL = (
    "sft.max_steps=40 sft.save_steps=10 sft.eval_steps=20 rm.max_steps=20 rm.save_steps=5 rm.eval_steps=10 "
    "ppo.total_episodes=256 ppo.save_steps=2 ppo.panel_every=0 tracking.mode=disabled"
)


def _cmd(out):
    return ["make", "ppo", "RECIPE=recipes/tiny_ko.yaml", f"OVERRIDES=run.output_dir={out} {SMALL}"]


def _kill_when(out, ready, timeout=300):
    """Start the chain, SIGKILL its process group as soon as ``ready(run_dir)`` holds; True if it was killed."""
    proc = subprocess.Popen(
        _cmd(out), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + timeout
    while proc.poll() is None:
        if ready(out / "tiny_ko"):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("the kill point never came")
        time.sleep(0.02)
    return False


def _staging(run, stage):
    return any(p.name.startswith(".final.tmp") for p in (run / stage).glob(".*")) if (run / stage).is_dir() else False


@pytest.mark.slow
def test_chain_survives_sigkill_at_many_points(tmp_path):
    points = [
        (
            "data stage writing",
            lambda run: any(p.name.startswith(".data.tmp") for p in run.glob(".*")) if run.is_dir() else False,
        ),
        ("SFT mid-training", lambda run: (run / "sft" / "checkpoints" / "checkpoint-10" / "COMPLETE").exists()),
        ("SFT saving its final checkpoint", lambda run: _staging(run, "sft")),
        ("RM mid-training", lambda run: (run / "rm" / "checkpoints" / "checkpoint-5" / "COMPLETE").exists()),
        ("RM saving its final checkpoint", lambda run: _staging(run, "rm")),
        ("PPO mid-training", lambda run: (run / "ppo" / "checkpoints" / "checkpoint-2" / "COMPLETE").exists()),
        ("PPO after a later checkpoint", lambda run: (run / "ppo" / "checkpoints" / "checkpoint-6").exists()),
    ]
    killed = [name for name, ready in points if _kill_when(tmp_path, ready)]
    assert len(killed) >= 5, killed  # some saves are too quick to catch every time; most points must be hit
    res = subprocess.run(_cmd(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = tmp_path / "tiny_ko"
    assert json.loads((run / "sft" / "final" / "lineage.json").read_text())["metrics"]["steps"] == 40
    assert json.loads((run / "rm" / "final" / "lineage.json").read_text())["metrics"]["steps"] == 20
    ppo = json.loads((run / "ppo" / "final" / "lineage.json").read_text())["metrics"]
    assert ppo["updates"] == 8 and ppo["episodes"] == 256
    rows = [json.loads(x) for x in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rows] == list(range(1, 9))  # one line per update, none lost or doubled
    for d in [run / s / "final" for s in ("sft", "rm", "ppo")] + sorted(run.glob("*/checkpoints/checkpoint-*")):
        assert (d / "COMPLETE").is_file() and missing_notices(d) == [], d
    assert not [p for p in run.rglob(".*tmp*")], "temporary directories were left where a stage could use them"
