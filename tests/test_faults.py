"""Fault injection through the Makefile, in every stage, each time followed by the same command again:

- SIGKILL of the whole `make ppo` process group (while the data stage writes, mid-training, while a checkpoint is
  being saved);
- a NaN forced into the weights (GEMMA_RLHF_INJECT_NAN): the stage stops naming the step, exits non-zero, keeps its
  last good checkpoint, and make does not start the next stage;
- a full disk (a small tmpfs filled up while the chain is paused; where mounting is not allowed, a file-size limit
  set on the paused processes): the save fails in one clear line and the previous checkpoint stays usable.

Each scenario ends with the chain complete at the step counts of an uninterrupted run, notices on every checkpoint
and no temporary directory left where a stage could take it as finished."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.core.notices import missing_notices
from pipeline.core.rundir import checkpoints
from tests.helpers import REPO

SMALL = (
    "sft.max_steps=40 sft.save_steps=10 sft.eval_steps=20 rm.max_steps=20 rm.save_steps=5 rm.eval_steps=10 "
    "ppo.total_episodes=256 ppo.save_steps=2 ppo.panel_every=0 tracking.mode=disabled"
)


def _cmd(out, extra=""):
    return ["make", "ppo", "RECIPE=recipes/tiny_ko.yaml", f"OVERRIDES=run.output_dir={out} {SMALL} {extra}"]


def _start_chain(out, logs):
    """``make ppo`` in its own process group, its output into files under ``logs`` (a pipe nobody reads while the
    chain runs could fill up and stall it)."""
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "stdout", "w") as so, open(logs / "stderr", "w") as se:
        return subprocess.Popen(_cmd(out), cwd=REPO, stdout=so, stderr=se, start_new_session=True)


def _reaches(proc, out, ready, timeout=300) -> bool:
    """Wait until ``ready(run_dir)`` holds (True) or the chain ends first (False)."""
    deadline = time.time() + timeout
    while proc.poll() is None:
        if ready(out / "tiny_ko"):
            return True
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("the fault point never came")
        time.sleep(0.02)
    return False


def _kill_when(out, ready):
    """Start the chain, SIGKILL its process group as soon as ``ready(run_dir)`` holds; True if it was killed."""
    proc = _start_chain(out, out / "logs")
    if not _reaches(proc, out, ready):
        return False
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


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
    _finishes_like_an_uninterrupted_run(tmp_path)


def _finishes_like_an_uninterrupted_run(out):
    res = subprocess.run(_cmd(out), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = out / "tiny_ko"
    assert json.loads((run / "sft" / "final" / "lineage.json").read_text())["metrics"]["steps"] == 40
    assert json.loads((run / "rm" / "final" / "lineage.json").read_text())["metrics"]["steps"] == 20
    ppo = json.loads((run / "ppo" / "final" / "lineage.json").read_text())["metrics"]
    assert ppo["updates"] == 8 and ppo["episodes"] == 256
    rows = [json.loads(x) for x in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rows] == list(range(1, 9))  # one line per update, none lost or doubled
    for d in [run / s / "final" for s in ("sft", "rm", "ppo")] + sorted(run.glob("*/checkpoints/checkpoint-*")):
        assert (d / "COMPLETE").is_file() and missing_notices(d) == [], d
    assert not [p for p in run.rglob(".*tmp*")], "temporary directories were left where a stage could use them"
    return res


def _complete_checkpoints(run, stage):
    return [p.name for p in checkpoints(run / stage / "checkpoints") if (p / "COMPLETE").is_file()]


@pytest.mark.slow
def test_non_finite_weights_stop_the_chain_in_every_stage(tmp_path):
    from pipeline.core.faults import FAULT_ENV

    run = tmp_path / "tiny_ko"
    # (injection, what the stage must say, its last good checkpoint, the stage make must not start)
    faults = [
        ("sft:15", "non-finite loss (nan) at step 20", ("sft", "checkpoint-10"), "rm"),
        ("rm:12", "non-finite weights at step 15 (held by process 0)", ("rm", "checkpoint-10"), "ppo"),
        ("ppo:5", "non-finite PPO loss (nan) at update 5, epoch 1, minibatch 1", ("ppo", "checkpoint-4"), None),
    ]
    for spec, said, (stage, good), next_stage in faults:
        env = {**os.environ, FAULT_ENV: spec}
        res = subprocess.run(_cmd(tmp_path), cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        out = res.stdout[-3000:] + res.stderr[-3000:]
        assert res.returncode != 0, out
        assert f"error: {said}; stopping: the last good checkpoint, {run / stage / 'checkpoints' / good}" in res.stderr
        assert "Traceback" not in res.stderr, out
        assert _complete_checkpoints(run, stage)[-1] == good
        assert not (run / stage / "final").exists()
        if next_stage:
            assert not (run / next_stage).exists(), f"make went on to {next_stage} after {stage} failed"
    _finishes_like_an_uninterrupted_run(tmp_path)


class _Disk:
    """A run folder whose disk can be filled up: a small tmpfs, or (where mounting is not allowed) a per-process
    file-size limit, which makes every larger write fail with EFBIG the way a full disk fails with ENOSPC."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True)
        self.tmpfs = (
            os.environ.get("FAULTS_DISK") != "fsize"
            and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160m", "tmpfs", str(root)]).returncode == 0
        )
        self.ballast = root / "ballast"
        print(f"disk-full by {'a 160 MB tmpfs' if self.tmpfs else 'RLIMIT_FSIZE'}")

    def fill(self, pgid: int | None) -> None:
        if self.tmpfs:
            free = shutil.disk_usage(self.root).free
            with open(self.ballast, "wb") as fh:
                fh.truncate(0)
                left = free - (32 << 10)
                while left > 0:
                    left -= fh.write(b"\0" * min(left, 8 << 20))
        elif pgid is not None:
            for pid in _group(pgid):
                resource.prlimit(pid, resource.RLIMIT_FSIZE, (16 << 10, resource.RLIM_INFINITY))

    def free(self) -> None:
        self.ballast.unlink(missing_ok=True)

    def limit_new_processes(self) -> None:  # preexec_fn for a run that starts on a full disk
        if not self.tmpfs:
            resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, resource.RLIM_INFINITY))

    def close(self) -> None:
        if self.tmpfs:
            subprocess.run(["umount", "-l", str(self.root)])


def _group(pgid):
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            pids.append(int(stat.parent.name))
    return pids


def _fill_disk_when(out, disk, ready, timeout=300):
    """Start the chain; when ``ready(run_dir)`` holds, pause its process group, fill the disk, let it go on, and
    return how it ended."""
    logs = out.parent / "logs"  # beside the disk that fills up, not on it
    proc = _start_chain(out, logs)
    assert _reaches(proc, out, ready, timeout), "the chain ended before the fault point"
    os.killpg(proc.pid, signal.SIGSTOP)
    disk.fill(proc.pid)
    os.killpg(proc.pid, signal.SIGCONT)
    proc.wait(timeout=timeout)
    return proc.returncode, (logs / "stdout").read_text(), (logs / "stderr").read_text()


@pytest.mark.slow
def test_disk_full_keeps_the_previous_checkpoint_in_every_stage(tmp_path):
    out = tmp_path / "disk"
    disk = _Disk(out)
    run = out / "tiny_ko"
    try:
        # The data stage, started on a full disk: nothing half-written is left under the run folder's data name.
        disk.fill(None)
        res = subprocess.run(
            _cmd(out), cwd=REPO, capture_output=True, text=True, timeout=900, preexec_fn=disk.limit_new_processes
        )
        print("data", [ln for ln in res.stderr.splitlines() if ln.startswith("error")])
        assert res.returncode != 0 and "error: data: out of disk space" in res.stderr, res.stderr[-3000:]
        assert not (run / "data").exists() and not list(run.glob(".data*")) and not (run / "sft").exists()
        disk.free()
        # Each training stage: the disk fills after one checkpoint; the next save (an intermediate one in SFT and
        # RM, PPO's final one) fails, and the checkpoint before it is what a re-run resumes from.
        points = [
            ("sft", "checkpoint-10", "checkpoint-20"),
            ("rm", "checkpoint-5", "checkpoint-10"),
            ("ppo", "checkpoint-6", "final"),
        ]
        expect_resume = None
        for stage, good, failed in points:
            ckpts = run / stage / "checkpoints"
            # Ready once the checkpoint is complete and the older ones it replaces are deleted: filling the disk
            # before that deletion would let it free the room the next save needs.
            rc, stdout, stderr = _fill_disk_when(
                out,
                disk,
                lambda r, c=ckpts / good: (c / "COMPLETE").is_file() and len(checkpoints(c.parent)) <= 2,
            )
            assert rc != 0, stdout[-3000:] + stderr[-3000:]
            print(stage, [ln for ln in stderr.splitlines() if ln.startswith("error")])
            assert f"error: {stage}: out of disk space" in stderr and "Traceback" not in stderr, stderr[-3000:]
            assert _complete_checkpoints(run, stage)[-1] == good
            assert not (run / stage / "final").exists() and not (ckpts / failed / "COMPLETE").exists()
            if expect_resume:  # the stage that failed before resumed from the checkpoint the full disk left
                assert expect_resume in stdout, stdout[-3000:]
            expect_resume = f"[{stage}] resuming from {ckpts / good}"
            disk.free()
        assert expect_resume in _finishes_like_an_uninterrupted_run(out).stdout
    finally:
        disk.close()
