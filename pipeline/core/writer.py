"""One writer per shared output, across processes and machines.

On a multi-machine run every machine sees the same ``runs/`` on shared storage. The outputs that no launched job's
rank 0 writes (the data stage's folder, the run report) are written under ``writer_lock``: a lock file created with
``O_EXCL`` (atomic on local disks and on NFS) that names its owner (host, process, a random token) and is kept fresh
by a heartbeat while the owner writes. Another process that wants to write the same output waits while the owner is
alive, then finds the output finished and reuses it. A lock whose owner died is taken over: at once when the owner
was a process of this host (and PID namespace) that no longer exists, otherwise once its heartbeat has not moved for
``STALE_AFTER_S`` seconds as the waiter's own clock measures it (no clock is compared across machines). Only the lock
holder cleans up a dead writer's leftovers, so no cleanup removes a folder a live process is writing.

A machine other than machine 0 never writes these outputs: it waits (``wait_until``) for the completion marker that
machine 0 writes, with a timeout and one line naming what it waits for.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.core.errors import RunError

HEARTBEAT_S = 2.0
STALE_AFTER_S = 30.0
POLL_S = 0.5


class WaitTimeout(RunError, RuntimeError):
    """A process waited longer than ``launch.wait_minutes`` for an output another process or machine writes."""


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def _me(token: str) -> dict:
    return {"host": socket.gethostname(), "pidns": _pid_namespace(), "pid": os.getpid(), "token": token}


def _read(path: Path) -> dict | None:
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _process_gone(owner: dict) -> bool:
    """True only when the owner was a process of this host and PID namespace that no longer exists."""
    me = _me("")
    if owner.get("host") != me["host"] or owner.get("pidns") != me["pidns"] or not isinstance(owner.get("pid"), int):
        return False
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _heartbeat(path: Path, token: str, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        owner = _read(path)
        if owner is None or owner.get("token") != token:
            return  # the lock was taken over (this process was judged dead): nothing of ours to refresh
        try:
            os.utime(path)
        except OSError:
            return


def _describe(owner: dict | None) -> str:
    if owner is None:
        return "another process"
    return f"process {owner.get('pid')} on {owner.get('host')}"


@contextmanager
def writer_lock(lock: str | Path, what: str, timeout_s: float, say: Callable[[str], None] = print) -> Iterator[None]:
    """Hold ``lock`` while writing ``what``; wait while a live process holds it (one line, then silence), take it over
    from a dead one. Raises WaitTimeout after ``timeout_s`` seconds of waiting."""
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    deadline = time.monotonic() + timeout_s
    seen: tuple[float, float] | None = None  # (the lock's mtime, when this process saw it change)
    announced = False
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(_me(token), fh)
                fh.flush()
                os.fsync(fh.fileno())
            break
        owner = _read(lock)
        try:
            mtime = lock.stat().st_mtime
        except FileNotFoundError:
            continue  # released between the two calls: try again at once
        now = time.monotonic()
        if seen is None or seen[0] != mtime:
            seen = (mtime, now)
        dead = (owner is not None and _process_gone(owner)) or now - seen[1] > STALE_AFTER_S
        if dead:
            say(f"taking over the lock of {what} from {_describe(owner)}, which is no longer running ({lock})")
            _remove_if_held_by(lock, (owner or {}).get("token"))
            seen = None
            continue
        if not announced:
            say(f"waiting for {_describe(owner)}, which is writing {what} (lock {lock}); up to {timeout_s:.0f} s")
            announced = True
        if now > deadline:
            raise WaitTimeout(
                f"gave up after {timeout_s:.0f} s waiting for {_describe(owner)} to finish writing {what} (lock "
                f"{lock}); if no such process runs, delete the lock file and run the same command again"
            )
        time.sleep(POLL_S)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(lock, token, stop), daemon=True, name="writer-lock-heartbeat")
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        _remove_if_held_by(lock, token)


def _remove_if_held_by(lock: Path, token: str | None) -> None:
    """Remove ``lock`` if it holds ``token`` (this process's own, or that of an owner judged dead; None: a lock whose
    owner never finished writing it). It is renamed aside first, so that a lock another process created in between
    is put back rather than deleted."""
    aside = lock.with_name(f"{lock.name}.{secrets.token_hex(4)}.released")
    try:
        os.replace(lock, aside)
    except FileNotFoundError:
        return
    if (_read(aside) or {}).get("token") != token:
        try:
            os.link(aside, lock)  # someone else's fresh lock: restore it (fails if yet another was created)
        except FileExistsError:
            pass
    aside.unlink(missing_ok=True)


def wait_until(done: Callable[[], bool], what: str, timeout_s: float, say: Callable[[str], None] = print) -> None:
    """Return once ``done()`` is true, after one line saying what this process waits for; raise WaitTimeout naming
    it after ``timeout_s`` seconds."""
    if done():
        return
    say(f"waiting for {what}; up to {timeout_s:.0f} s")
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise WaitTimeout(f"gave up after {timeout_s:.0f} s waiting for {what}")
        time.sleep(POLL_S)
