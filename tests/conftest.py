"""Shared fixtures: the embedded tiny Gemma tokenizer, built offline, and helpers to write small recipes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    from pipeline.embedded import resolve_model_path

    return Path(resolve_model_path("embedded:tiny-gemma-ko"))


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    from pipeline.config import ModelConfig
    from pipeline.loading import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=str(tiny_dir)))


@pytest.fixture()
def encoder(tokenizer):
    from data_prep.gemma_format import GemmaEncoder

    return GemmaEncoder(tokenizer)


def write_jsonl(path: Path, rows: list) -> Path:
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
