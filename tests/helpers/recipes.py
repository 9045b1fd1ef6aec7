"""Small recipes and input files written for one test, on the embedded tiny model."""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: Path, rows: list) -> Path:
    """``rows`` one per line: a dict as JSON (Korean kept as is), a string as written (to test malformed lines)."""
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return path


def write_recipe(tmp_path: Path, data: dict, name: str = "t", extra: dict | None = None) -> Path:
    """A recipe on the embedded model with the given data section, writing runs under tmp_path."""
    import yaml

    recipe = {
        "run": {"name": name, "output_dir": str(tmp_path / "runs")},
        "model": {"name_or_path": "embedded:tiny-gemma-ko"},
        "data": data,
        **(extra or {}),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    return path
