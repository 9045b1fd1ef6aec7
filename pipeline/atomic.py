"""Atomic output directories with a completion marker.

Everything a stage hands to the next is written into a temporary sibling directory, the completion marker is
written last, and the directory is renamed into place. A directory without the marker is never taken as
finished: ``require_complete`` refuses it with a clear message.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MARKER = "COMPLETE"


class IncompleteError(RuntimeError):
    """A stage output is missing or was never finished."""


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


def is_complete(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def require_complete(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise IncompleteError(f"{what} not found at {path}: run that stage first")
    if not is_complete(path):
        raise IncompleteError(
            f"{what} at {path} is incomplete (no {MARKER} marker): its stage was interrupted; re-run that stage"
        )
    return path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_marker(folder: Path, info: dict | None = None) -> None:
    """Write the completion marker (last), durably."""
    data = {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(info or {})}
    with open(Path(folder) / MARKER, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(Path(folder))


def commit_dir(tmp: Path, final: Path, marker_info: dict | None = None) -> None:
    """Mark ``tmp`` complete and rename it to ``final``; an existing ``final`` is replaced only now."""
    write_marker(tmp, marker_info)
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}"
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
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


def clean_stale(parent: str | Path) -> None:
    """Remove temporary directories left by killed writers; restore a replaced output caught mid-swap."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    for p in sorted(parent.iterdir()):
        if not (p.is_dir() and p.name.startswith(".")):
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
