"""Atomic stage outputs: a directory is used only once its completion marker exists."""

from __future__ import annotations

import os

import pytest

from pipeline.core.atomic import atomic_dir, clean_stale
from pipeline.core.rundir import MARKER, IncompleteError, is_complete, require_complete


def test_success_writes_marker_last_and_replaces_old(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
        assert not final.exists()
    assert is_complete(final) and (final / "a").read_text() == "1"
    with atomic_dir(final) as tmp:
        (tmp / "b").write_text("2")
    assert not (final / "a").exists() and (final / "b").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failure_leaves_previous_output_and_no_debris(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "a").write_text("half")
        raise RuntimeError("disk full")
    assert (final / "a").read_text() == "1" and is_complete(final)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_require_complete_refuses_missing_and_unfinished(tmp_path):
    with pytest.raises(IncompleteError, match="not found"):
        require_complete(tmp_path / "sft", "the SFT checkpoint")
    (tmp_path / "sft").mkdir()
    with pytest.raises(IncompleteError, match=f"incomplete \\(no {MARKER} marker\\)"):
        require_complete(tmp_path / "sft", "the SFT checkpoint")


def test_clean_stale_removes_temporaries_and_restores_a_swap_caught_midway(tmp_path):
    (tmp_path / ".data.tmp-1-2").mkdir()
    old = tmp_path / ".data.old-1-3"
    old.mkdir()
    (old / MARKER).write_text("{}")
    publishing = tmp_path / ".publish.tmp-5-6"  # another output's writer, alive: not the data writer's to clean
    publishing.mkdir()
    clean_stale(tmp_path, "data")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".publish.tmp-5-6", "data"]
    assert is_complete(tmp_path / "data")
    os.makedirs(tmp_path / ".data.old-9-9")
    clean_stale(tmp_path, "data")  # a complete "data" exists: the stale old copy is just removed
    assert sorted(p.name for p in tmp_path.iterdir()) == [".publish.tmp-5-6", "data"]


def test_storage_full_is_recognised_through_library_wrappers():
    import errno

    from pipeline.core.atomic import storage_full, storage_full_message

    enospc = OSError(errno.ENOSPC, "No space left on device", "/run/x/model.safetensors")
    assert storage_full(enospc) and storage_full(OSError(errno.EFBIG, "File too large"))
    # safetensors reports the OS error as text inside its own exception type; others chain it as a cause
    assert storage_full(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"))
    try:
        try:
            raise enospc
        except OSError as inner:
            raise RuntimeError("checkpoint save failed") from inner
    except RuntimeError as outer:
        assert storage_full(outer)
    assert not storage_full(PermissionError(errno.EACCES, "Permission denied")) and not storage_full(ValueError("x"))
    msg = storage_full_message(enospc, "sft")
    assert msg.startswith("sft: out of disk space writing /run/x/model.safetensors ([Errno 28] No space left")
    assert "run the same command again" in msg
