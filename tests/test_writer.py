"""One writer per shared output (pipeline/core/writer.py), and the data stage under it: two data stages started at once
on one run directory (two machines sharing ``runs/``, or one user running `make data` twice) write it once; the
other waits and reuses it; a killed writer's half-written folder is cleaned only by the next writer, and the re-run
completes. Before, every data stage cleaned every staging folder it found, which can be another live writer's."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.core import writer
from pipeline.core.writer import WaitTimeout, wait_until, writer_lock
from tests.helpers import REPO


def _hold(lock: str, seconds: float, log: str, name: str) -> None:
    with writer_lock(lock, "the output", 60, lambda line: None):
        with open(log, "a") as fh:
            fh.write(f"{name} in\n")
        time.sleep(seconds)
        with open(log, "a") as fh:
            fh.write(f"{name} out\n")


def test_two_processes_never_hold_the_lock_at_once(tmp_path):
    """Catches a lock that lets a second writer in while the first writes (their in/out lines would interleave)."""
    log = tmp_path / "log"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hold, args=(str(tmp_path / "l"), 1.0, str(log), n)) for n in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    lines = log.read_text().split()
    assert len(lines) == 8 and lines[1] == "in" and lines[3] == "out" and lines[0] == lines[2], lines
    assert not (tmp_path / "l").exists()  # released


def test_a_dead_writers_lock_is_taken_over_at_once_on_its_host(tmp_path):
    lock = tmp_path / "l"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    me = writer._me("dead-token")
    lock.write_text(json.dumps({**me, "pid": int(dead.stdout)}))
    said = []
    t0 = time.monotonic()
    with writer_lock(lock, "the output", 5, said.append):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert time.monotonic() - t0 < 2 and "taking over" in said[0]


def test_a_live_writer_on_another_host_is_waited_for_until_its_heartbeat_stops(tmp_path, monkeypatch):
    """A lock from another machine is taken over only when its heartbeat stops; while it beats, the waiter waits
    (negative control: the same lock with a moving heartbeat is not taken within the same time)."""
    monkeypatch.setattr(writer, "STALE_AFTER_S", 1.0)
    monkeypatch.setattr(writer, "POLL_S", 0.05)
    lock = tmp_path / "l"
    lock.write_text(json.dumps({"host": "another-machine", "pidns": "", "pid": 1, "token": "x"}))
    t0 = time.monotonic()
    with writer_lock(lock, "the output", 5, lambda line: None):
        pass
    assert 1.0 <= time.monotonic() - t0 < 3
    lock.write_text(json.dumps({"host": "another-machine", "pidns": "", "pid": 1, "token": "x"}))
    stop = time.monotonic() + 2.5

    def beat():
        while time.monotonic() < stop:
            os.utime(lock, (time.time(), time.time() + 1000 * (stop - time.monotonic())))
            time.sleep(0.1)

    import threading

    threading.Thread(target=beat, daemon=True).start()
    with pytest.raises(WaitTimeout, match="waiting for process 1 on another-machine to finish writing the output"):
        with writer_lock(lock, "the output", 2.0, lambda line: None):
            pass


def test_waiting_for_a_marker_names_what_it_waits_for(tmp_path):
    said = []
    with pytest.raises(WaitTimeout, match="gave up after 0 s waiting for machine 0 to write x"):
        wait_until(lambda: False, "machine 0 to write x", 0.2, said.append)
    assert said == ["waiting for machine 0 to write x; up to 0 s"]


def _data(out: Path, logs: Path, name: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipeline.data", "--recipe", str(REPO / "recipes" / "tiny_ko.yaml")]
    cmd += [f"run.output_dir={out}"]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=open(logs / f"{name}.out", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@pytest.mark.slow
def test_two_data_stages_at_once_write_once_and_survive_a_killed_writer(tmp_path):
    out, logs = tmp_path / "runs", tmp_path / "logs"
    logs.mkdir()
    run = out / "tiny_ko"
    # Killed mid-write: a staging folder and the lock are left behind, nothing that looks finished.
    first = _data(out, logs, "killed")
    deadline = time.time() + 120
    while not any(p.name.startswith(".data.tmp-") for p in run.glob(".*")):
        assert first.poll() is None and time.time() < deadline, (logs / "killed.out").read_text()[-2000:]
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert (run / ".data.lock").exists() and not (run / "data").exists()
    # Two at once: one takes the dead writer's lock over, cleans its folder and writes; the other waits and reuses.
    a, b = _data(out, logs, "a"), _data(out, logs, "b")
    assert a.wait(300) == 0 and b.wait(300) == 0
    outs = [(logs / f"{n}.out").read_text() for n in ("a", "b")]
    wrote = [o for o in outs if f"[data] wrote {run / 'data'}" in o]
    reused = [o for o in outs if "is up to date (same inputs, settings and tokenizer): reusing it" in o]
    assert len(wrote) == 1 and len(reused) == 1, outs
    assert "[data] waiting for process" in reused[0] and "which is writing" in reused[0]
    # Whoever judged the dead writer's lock stale took it over; the other may then have created its own lock in the
    # gap and written without saying so (both may say it too): one of them says it.
    assert any("taking over the lock" in o for o in outs), outs
    assert sorted(p.name for p in run.iterdir()) == ["data"]  # no staging folder, no lock, one data folder
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    # the same manifest a lone data stage writes (counts, inputs, fingerprint)
    alone = tmp_path / "alone"
    assert _data(alone, logs, "alone").wait(300) == 0
    other = json.loads((alone / "tiny_ko" / "data" / "manifest.json").read_text())
    keep = ("fingerprint", "counts", "inputs", "tokenizer", "eval_split")
    assert {k: manifest[k] for k in keep} == {k: other[k] for k in keep}
