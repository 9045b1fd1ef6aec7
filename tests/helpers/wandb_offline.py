"""Test helper: read a W&B offline run directory back without network (wandb-core's ``run-<id>.wandb`` log).

Offline runs keep their history, config and summary only in that binary file (no JSON summary is written), so
tests that check what a stage logged parse it here.

The offline run's data lives in ``run-<id>.wandb``: a LevelDB-style log
(7-byte file header ':W&B' + magic 0xBEE1 LE + version 0, then 32 KiB blocks of
records with a 7-byte header <crc32:u32><len:u16><type:u8>; type FULL=1,
FIRST=2, MIDDLE=3, LAST=4; crc = zlib.crc32(data, zlib.crc32(bytes([type])))).
Each assembled record is a serialized ``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import time
import warnings
import zlib

_BLOCK = 32768
_HDR = 7


def _iter_raw_records(path: str, verify_crc: bool = True, strict: bool = False):
    with open(path, "rb") as f:
        buf = f.read()
    if len(buf) < _HDR or buf[:4] != b":W&B":
        raise ValueError(f"{path}: not a wandb datastore file")
    magic, version = struct.unpack("<HB", buf[4:7])
    if magic != 0xBEE1 or version != 0:
        raise ValueError(f"{path}: unexpected header magic={magic:#x} version={version}")
    pos, pending = _HDR, None
    while pos + _HDR <= len(buf):
        space = _BLOCK - pos % _BLOCK
        if space < _HDR:  # block trailer padding
            pos += space
            continue
        crc, length, rtype = struct.unpack("<IHB", buf[pos : pos + _HDR])
        if length == 0 and rtype == 0:  # zero padding / preallocated tail
            pos += space
            continue
        data = buf[pos + _HDR : pos + _HDR + length]
        if len(data) < length:
            break  # truncated tail (run crashed mid-write)
        pos += _HDR + length
        if verify_crc and (zlib.crc32(data, zlib.crc32(bytes([rtype]))) & 0xFFFFFFFF) != crc:
            msg = f"{path}: checksum mismatch at offset {pos - length - _HDR}"
            if strict:
                raise ValueError(msg)
            warnings.warn(msg + "; stopping (torn write of a crashed run?)", stacklevel=2)
            break
        if rtype == 1:
            yield data
        elif rtype == 2:
            pending = bytearray(data)
        elif rtype == 3 and pending is not None:
            pending += data
        elif rtype == 4 and pending is not None:
            pending += data
            yield bytes(pending)
            pending = None


def _path(item) -> list:
    # items carry either `key` or `nested_key`; nested_key is a path into a dict, e.g.
    # ['train/loss'] for wandb.log({'train/loss': x}) or ['sft/panel', '_type'] for a Table.
    return [item.key] if item.key else list(item.nested_key)


def _set(d: dict, item) -> None:
    *parents, last = _path(item)
    for p in parents:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            return
    d[last] = json.loads(item.value_json) if item.value_json else None


def _pop(d: dict, item) -> None:
    *parents, last = _path(item)
    for p in parents:
        d = d.get(p)
        if not isinstance(d, dict):
            return
    d.pop(last, None)


def _artifact(a) -> dict:
    """An ``ArtifactRecord`` or ``UseArtifactRecord`` as a dict; ``entries`` is the manifest: a ``file://`` ``ref``
    for a reference, a ``local_path`` for a file wandb uploads. (wandb hands a large manifest over as a file instead,
    named in ``manifest_file``; entries is then empty.)"""
    manifest = a.manifest if hasattr(a, "manifest") else None
    return {
        "name": a.name,
        "type": a.type,
        "digest": getattr(a, "digest", ""),
        "metadata": json.loads(a.metadata) if getattr(a, "metadata", "") else {},
        "use_after_commit": getattr(a, "use_after_commit", False),
        "entries": [
            {"path": e.path, "ref": e.ref, "local_path": e.local_path, "digest": e.digest, "size": e.size}
            for e in (manifest.contents if manifest is not None else [])
        ],
        "manifest_file": manifest.manifest_file_path if manifest is not None else "",
    }


def _finished(path: str) -> bool:
    """Whether the log holds the run's exit record yet."""
    from wandb.proto import wandb_internal_pb2 as pb

    try:
        for raw in _iter_raw_records(path, verify_crc=False):
            rec = pb.Record()
            rec.ParseFromString(raw)
            if rec.WhichOneof("record_type") == "exit":
                return True
    except (OSError, ValueError):
        pass
    return False


def read_offline_run(run_dir: str, verify_crc: bool = True, strict: bool = False, wait: float = 0.0) -> dict:
    """Return {'run_id','project','name','tags','history','config','summary','tables','artifacts','use_artifacts',
    'stats','console'}.

    history: list of dicts (metric -> value, incl. '_step', '_runtime', '_timestamp');
    config: final config dict ('_wandb' internals dropped);
    summary: merged summary records (wandb rewrites them on every log, so a crashed run still
             has one; None only if no summary record exists at all). Its `_runtime` is whole seconds;
             use history[-1]["_runtime"] for the precise value;
    tables: {key: {'path': abs path of *.table.json, 'columns': [...], 'data': [[...]],
             'step': step}} for every wandb.Table found in history/summary;
    artifacts: every artifact record ({'name','type','digest','metadata','use_after_commit','entries'}); one
             with use_after_commit is an input of the run (what ``use_artifact`` of a new artifact writes);
    use_artifacts: the ``use_artifact`` records (name, type; written by ``use_artifact`` online);
    stats: how many system-metrics samples (CPU, memory, GPU) the run holds;
    console: the captured console output, one string per captured piece (empty when console capture is off).

    wait: seconds to wait for the run's exit record. wandb-core may still be writing the file when ``run.finish()``
    returns (right after finish it can hold only the file header), so a test reading a run it just finished waits.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    files = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one run-*.wandb in {run_dir}, found {files}")
    deadline = time.monotonic() + wait
    while wait and not _finished(files[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    out = {
        "run_id": None,
        "project": None,
        "name": None,
        "tags": [],
        "history": [],
        "config": {},
        "summary": None,
        "tables": {},
        "artifacts": [],
        "use_artifacts": [],
        "stats": 0,
        "console": [],
    }
    for raw in _iter_raw_records(files[0], verify_crc, strict):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out.update(run_id=r.run_id, project=r.project, name=r.display_name, tags=list(r.tags))
            for it in r.config.update:
                _set(out["config"], it)
        elif kind == "config":
            for it in rec.config.update:
                _set(out["config"], it)
            for it in rec.config.remove:
                _pop(out["config"], it)
        elif kind == "history":
            row = {}
            for it in rec.history.item:
                _set(row, it)
            if rec.history.HasField("step") and "_step" not in row:
                row["_step"] = rec.history.step.num
            out["history"].append(row)
        elif kind == "artifact":
            out["artifacts"].append(_artifact(rec.artifact))
        elif kind == "use_artifact":
            out["use_artifacts"].append(_artifact(rec.use_artifact))
        elif kind == "stats":
            out["stats"] += 1
        elif kind in ("output_raw", "output"):
            out["console"].append(getattr(rec, kind).line)
        elif kind == "summary":
            if out["summary"] is None:
                out["summary"] = {}
            for it in rec.summary.update:
                _set(out["summary"], it)
            for it in rec.summary.remove:
                _pop(out["summary"], it)
    out["config"].pop("_wandb", None)

    def _find_tables(prefix, v, step, dst):
        if not isinstance(v, dict):
            return
        if v.get("_type") == "table-file" and v.get("path"):
            p = os.path.abspath(os.path.join(run_dir, "files", v["path"]))
            t = {"path": p, "step": step, "columns": None, "data": None}
            try:
                with open(p) as f:
                    j = json.load(f)
                t.update(columns=j.get("columns"), data=j.get("data"))
            except (OSError, ValueError):
                pass
            dst[prefix] = t  # a later log under the same key wins
            return
        for k, sub in v.items():
            _find_tables(f"{prefix}/{k}" if prefix else k, sub, step, dst)

    from_summary = {}
    _find_tables("", out["summary"] or {}, None, from_summary)
    for row in out["history"]:
        _find_tables("", row, row.get("_step"), out["tables"])
    for k, t in from_summary.items():  # e.g. run.summary["x"] = wandb.Table(...)
        out["tables"].setdefault(k, t)
    return out
