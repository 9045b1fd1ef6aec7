"""Where a recipe's paths point: a local file or folder (relative paths from the repository root), a hub id, or
an embedded model (``embedded:<name>``). Nothing here touches the network."""

from __future__ import annotations

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
EMBEDDED_PREFIX = "embedded:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95})?$")
_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def resolve_path(p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else REPO_ROOT / q


def looks_local(p: str) -> bool:
    """A recipe path is local when it exists, is explicitly relative/absolute, or names a data file."""
    return (
        p.startswith(("/", "./", "../", "~"))
        or p.lower().endswith(_LOCAL_SUFFIXES)
        or resolve_path(p).exists()
        or p.count("/") > 1
    )


def local_path(p: str) -> Path | None:
    """The resolved local path of a recipe path, or None when it names a hub dataset or model."""
    return resolve_path(p) if looks_local(p) else None


def is_hub_id(p: str) -> bool:
    return bool(_HUB_ID.match(p)) and ".." not in p and not p.endswith(".")
