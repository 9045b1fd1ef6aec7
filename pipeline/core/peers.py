"""When one process of a multi-process stage fails, every process of the job stops within seconds.

A process that raises between two collectives (the sampler finding non-finite logits on its rank, a check of its own
ZeRO-3 shard, an out-of-memory on one GPU) leaves the others blocked in their next collective until the backend's
timeout (30 minutes under gloo, 10 under NCCL), and the launcher of another machine never learns of it. So every
process of a launched stage watches the job's rendezvous store (torchrun's, on machine 0, at ``MASTER_ADDR:
MASTER_PORT``) from a daemon thread (``watch``). A process that fails posts its one-line error there before it exits
(``post``, called by ``pipeline.core.cli.guarded``); the others print it, naming that process, and exit with its code.
A plain ``python -m pipeline.<stage>`` (one process) watches nothing.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
import time
from datetime import timedelta
from typing import Any

KEY = "gemma-rlhf/failed"
POLL_S = 0.5

_store: Any = None
_failed = threading.Event()  # this process has failed on its own: it exits with its own message
_stop = threading.Event()


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def watch() -> None:
    """Start watching for a peer's failure (once per process; nothing in a one-process run)."""
    global _store
    if _store is not None or int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1 or "MASTER_PORT" not in os.environ:
        return
    from torch.distributed import TCPStore

    # A client connection of its own: the process group's store is never used from a second thread.
    _store = TCPStore(
        os.environ.get("MASTER_ADDR", "127.0.0.1"),
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(seconds=60),
    )
    thread = threading.Thread(target=_watch, args=(_store,), daemon=True, name="peer-failure-watch")
    thread.start()

    def _join() -> None:  # no call into the store may be in flight while the interpreter tears it down
        _stop.set()
        thread.join(timeout=5)

    atexit.register(_join)


def _watch(store: Any) -> None:
    me = _rank()
    while True:
        if _failed.is_set() or _stop.is_set():
            return
        try:
            if store.check([KEY]):
                failure = json.loads(store.get(KEY).decode())
                if failure["rank"] != me and not _failed.is_set():
                    sys.stdout.flush()
                    sys.stderr.write(
                        f"[rank {me}] error: stopping: process {failure['rank']} failed: {failure['message']}\n"
                    )
                    sys.stderr.flush()
                    os._exit(int(failure["code"]) or 1)  # this process may be blocked in a collective forever
                return
        except Exception:  # noqa: BLE001 - the store is gone: the job is ending, there is nothing left to watch
            return
        _stop.wait(POLL_S)


def post(message: object, code: int) -> None:
    """Tell every other process of the job that this one failed with ``message`` (the first failure wins)."""
    _failed.set()
    if _store is None:
        return
    value = json.dumps({"rank": _rank(), "code": code, "message": str(message)})
    try:
        _store.compare_set(KEY, "", value)
    except Exception:  # noqa: BLE001 - the store is gone: the launcher is already tearing the job down
        return
    # Stay until the others have had time to read it: once this process is gone, a peer's pending collective fails
    # with the backend's own error ("connection closed by peer"), which says nothing of why.
    time.sleep(2 * POLL_S)
