"""What a checkpoint or an export holds, checked from its files."""

from __future__ import annotations

import json
from pathlib import Path


def files_naming(folder: Path, root: str) -> list[str]:
    """Files under ``folder`` (relative, posix) whose text, or safetensors header, contains ``root``: the check that
    nothing a checkpoint or an export carries names a local folder."""
    from pipeline.core.notices import read_safetensors_metadata

    hits = []
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            blob = (
                json.dumps(read_safetensors_metadata(f))
                if f.suffix == ".safetensors"
                else f.read_text("utf-8", "replace")
            )
            if root in blob:
                hits.append(f.relative_to(folder).as_posix())
    return hits


def changed_fraction(before: dict, after: dict) -> float:
    """The share of entries that differ between two state dicts with the same keys and shapes."""
    changed = sum(int((before[k] != after[k]).sum()) for k in before)
    return changed / sum(v.numel() for v in before.values())
