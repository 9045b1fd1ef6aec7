"""Atomic output directories, and what a failed write means.

Everything a stage hands to the next is written into a temporary sibling directory, the completion marker
(``pipeline.core.rundir``) is written last, and the directory is renamed into place. A directory without the marker
is never taken as finished. ``storage_full`` recognises a full disk, a quota or a file-size limit behind whatever
exception a library raised, so a stage can say so in one line.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.core.rundir import MARKER, fsync_dir, is_complete, write_marker

# Write failures that mean "no room": a full disk, a quota, a file-size limit. Libraries wrap them in their own
# exception types (safetensors reports a Rust IoError as text), so the chain of causes is searched, text included.
_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_FULL_TEXT = ("No space left on device", "File too large", "Disk quota exceeded", "StorageFull")


def storage_full(e: BaseException | None) -> bool:
    """True when ``e`` (or an exception it was raised from) is a disk-full, quota or file-size-limit error."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return True
        if any(t in str(e) for t in _FULL_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


def storage_full_message(e: BaseException, stage: str) -> str:
    """One line for a stage that ran out of space: what failed, and that nothing half-written counts as finished."""
    where = f" writing {e.filename}" if isinstance(e, OSError) and e.filename else ""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return (
        f"{stage}: out of disk space{where} ({first}). Nothing half-written was marked {MARKER}: the last complete "
        "checkpoint or output is kept. Free space and run the same command again to resume."
    )


def commit_dir(tmp: Path, final: Path, marker_info: dict | None = None) -> None:
    """Mark ``tmp`` complete and rename it to ``final``; an existing ``final`` is replaced only now."""
    write_marker(tmp, marker_info)
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}"
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def staging_dir(final: Path, tag: str | None = None) -> Path:
    """The temporary sibling a writer fills before ``commit_dir`` (a fixed ``tag`` lets several ranks agree)."""
    return final.parent / f".{final.name}.tmp-{tag or f'{os.getpid()}-{time.monotonic_ns()}'}"


@contextmanager
def atomic_dir(final: str | Path, marker_info: dict | None = None) -> Iterator[Path]:
    """Yield a temporary directory; on success write the marker and rename it to ``final``.

    An existing ``final`` is replaced only after the new one is complete. On error the temporary directory is
    removed and ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(final)
    tmp.mkdir()
    try:
        yield tmp
        commit_dir(tmp, final, marker_info)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clean_stale(parent: str | Path, name: str) -> None:
    """Remove the temporary directories that killed writers of ``parent/name`` left; restore a replaced output caught
    mid-swap. Only the writer of ``name`` may call it (under its writer lock): another live writer's staging folder
    looks the same as a dead one's."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    for p in sorted(parent.iterdir()):
        if not (p.is_dir() and p.name.startswith(f".{name}.")):
            continue
        if ".old-" in p.name:
            # Killed between the two renames: the previous output is the only complete one, put it back.
            final = parent / p.name[1:].split(".old-")[0]
            if not final.exists() and is_complete(p):
                os.replace(p, final)
                continue
            shutil.rmtree(p, ignore_errors=True)
        elif ".tmp-" in p.name:
            shutil.rmtree(p, ignore_errors=True)
