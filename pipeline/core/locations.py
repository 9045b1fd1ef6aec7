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


def dataset_is_local(p: str) -> bool:
    """A recipe's dataset path is local unless it has a hub id's ``owner/name`` shape and its first part is not a
    local folder: ``mydata/koalpaca`` with a ``mydata/`` folder beside the recipe's paths is a mistyped local folder,
    not a hub dataset, and ``koalpaca`` alone is no hub id."""
    if looks_local(p) or "/" not in p:
        return True
    return resolve_path(p.split("/", 1)[0]).is_dir()


def dataset_local_path(p: str) -> Path | None:
    """The resolved local path of a recipe's dataset entry, or None for a hub dataset id (``dataset_is_local``)."""
    return resolve_path(p) if dataset_is_local(p) else None


def missing_dataset(p: str) -> str:
    """Why a local-looking dataset path that does not exist is not taken for a hub id."""
    if "/" not in p and is_hub_id(p):
        why = "; a hub dataset id has the form owner/name"
    elif not looks_local(p) and "/" in p:
        why = f"; {p.split('/', 1)[0]}/ is a local folder, so this is read as a path in it, not as a hub id"
    else:
        why = ""
    return f"local dataset {p!r} does not exist (resolved to {resolve_path(p)}){why}"


def local_path(p: str) -> Path | None:
    """The resolved local path of a recipe path, or None when it names a hub dataset or model."""
    return resolve_path(p) if looks_local(p) else None


def is_hub_id(p: str) -> bool:
    return bool(_HUB_ID.match(p)) and ".." not in p and not p.endswith(".")


def portable_path(p: str, run_root: Path | None) -> str:
    """A local path as a distributed checkpoint may carry it: relative to the run directory when inside it
    (``sft/final``), relative to the repository when inside it (``data_prep/tiny_ko/sft.jsonl``), otherwise the file
    or folder name alone (an absolute path names the machine's folders and its user). Hub ids, embedded model names
    and other strings are returned as they are."""
    if not p or p.startswith(EMBEDDED_PREFIX) or not Path(p).expanduser().is_absolute():
        return p
    q = Path(p).expanduser().resolve()
    for root in (run_root, REPO_ROOT):
        if root is None:
            continue
        try:
            rel = q.relative_to(Path(root).resolve())
        except ValueError:
            continue
        return rel.as_posix() or "."
    return q.name


def portable(value, run_root: Path | None):
    """``value`` (nested dicts, lists and strings, e.g. a manifest or a lineage) with every absolute path, among
    the values and the keys, made portable by ``portable_path``."""
    if isinstance(value, str):
        return portable_path(value, run_root)
    if isinstance(value, dict):
        return {portable(k, run_root) if isinstance(k, str) else k: portable(v, run_root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v, run_root) for v in value]
    return value


def path_pattern(root: str | Path) -> re.Pattern:
    """Where the absolute folder ``root`` appears as a path in text: not inside a longer word or URL before it
    (``ai.google.dev/gemma/terms`` holds no path ``/gemma``), and followed by a slash (group 1) or by the end of the
    name (a longer folder name that starts with it is another folder)."""
    return re.compile(r"(?<![\w.\-~/:])" + re.escape(str(root)) + r"(/|(?![\w.\-]))")


def scrub_paths(text: str, run_root: Path | None, known: dict[str, str] | None = None) -> str:
    """``text`` with the ``known`` absolute paths (e.g. a base model folder outside the repository) replaced by
    their portable forms, then the run directory, the repository and the home folder, wherever they appear as a
    path inside it, written relative (for files other libraries write with absolute paths in them, e.g. PEFT's
    ``adapter_config.json``)."""
    for path in sorted(known or {}, key=len, reverse=True):
        text = path_pattern(path).sub(lambda m, r=known[path]: r + m.group(1), text)
    roots = [(Path(run_root).resolve(), "")] if run_root is not None else []
    roots += [(REPO_ROOT, ""), (Path.home().resolve(), "~/")]
    for root, replacement in roots:
        if str(root) in ("/", ""):
            continue
        bare = replacement.rstrip("/") or "."
        text = path_pattern(root).sub(lambda m, r=replacement, b=bare: r if m.group(1) else b, text)
    return text
