"""The shipped Gemma-2B recipe's data, read through the same loading code from local stand-ins in hub layout: its
held-out PPO prompts share no user turn with any training row, counted the way the report counts them.

Each stand-in repository holds rows derived from its own hub id, so two entries that read the same dataset read the
same rows, as they would on the hub: a recipe that held out prompts from a training source (as this one did, PPO
prompts from KoAlpaca beside KoAlpaca SFT) shows an overlap (the negative control)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.core.config import load_recipe
from pipeline.core.rundir import RunDir
from pipeline.data import run as run_data
from pipeline.report import heldout_overlap
from tests.helpers import REPO

RECIPE = REPO / "recipes" / "gemma2b_ko.yaml"


def _stand_in_rows(dataset_id: str, n: int = 40) -> list[dict]:
    """Rows with the columns the real dataset has; texts derived from its id."""
    tag = dataset_id.split("/")[1]
    q = [f"{tag}의 질문 {i}번은 무엇인가요?" for i in range(n)]
    a = [f"{tag}의 답 {i}번입니다." for i in range(n)]
    if "Ultrafeedback" in dataset_id:
        return [{"prompt": q[i], "chosen": a[i], "rejected": f"몰라 {i}"} for i in range(n)]
    if dataset_id.lower().endswith("k2-eval"):  # the held-out instruction set
        return [{"instruction": q[i], "subject": "역사", "ability": "추론", "reference": a[i]} for i in range(n)]
    if "kullm" in dataset_id:
        return [{"id": str(i), "instruction": q[i], "input": "", "output": a[i]} for i in range(n)]
    return [{"instruction": q[i], "output": a[i], "url": f"https://example.com/{i}"} for i in range(n)]


def _hub_ids(raw: dict) -> set[str]:
    return {
        spec["path"]
        for section in ("sft", "preference", "prompts")
        for split in ("train", "eval")
        for spec in raw["data"].get(section, {}).get(split, [])
    }


@pytest.fixture
def stand_ins(tmp_path, monkeypatch):
    """Every hub dataset of the shipped recipe as a local folder in hub layout, loaded by datasets.load_dataset."""
    import data_prep.readers as readers

    root = tmp_path / "hub"
    for dataset_id in _hub_ids(yaml.safe_load(RECIPE.read_text(encoding="utf-8"))):
        repo = root / dataset_id / "data"
        repo.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(_stand_in_rows(dataset_id)), repo / "train-00000-of-00001.parquet")
    monkeypatch.setattr(readers, "hub_location", lambda dataset_id: str(root / dataset_id))
    return root


def _overlap(recipe_path: Path, tmp_path: Path, name: str) -> tuple[dict, int, int]:
    import datasets
    from transformers import AutoTokenizer

    from pipeline.report import data_output

    overrides = [
        f"run.name={name}",
        f"run.output_dir={tmp_path / 'runs'}",
        "model.name_or_path=embedded:tiny-gemma-ko",
        "model.revision=null",
        "data.num_proc=1",
    ]
    recipe = load_recipe(recipe_path, overrides)
    run_data(recipe)
    run_dir = RunDir.of(recipe)
    data = data_output(run_dir, "the data stage output")
    held = datasets.Dataset.from_parquet(str(data.split("prompts", "eval")))
    texts = [json.loads(m)[-1]["content"] for m in held["messages"]]
    tokenizer = AutoTokenizer.from_pretrained(data.tokenizer)
    per_source, any_source = heldout_overlap(data, tokenizer, texts)
    manifest = json.loads((run_dir.data / "manifest.json").read_text())
    assert manifest["heldout_prompt_overlap"] == any_source  # the data stage's own count agrees with the report's
    return per_source, any_source, len(texts)


def test_the_shipped_recipe_holds_out_prompts_no_training_row_asks(stand_ins, tmp_path):
    per_source, any_source, n = _overlap(RECIPE, tmp_path, "shipped")
    assert n == 40 and any_source == 0 and per_source == {"sft": 0, "preference": 0, "prompts": 0}


def test_prompts_held_out_from_the_sft_data_are_counted(stand_ins, tmp_path):
    """Negative control: the recipe as it was (PPO prompts from KoAlpaca, an eval_fraction of them held out)."""
    raw = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    raw["data"]["prompts"] = {
        "train": [{"path": "beomi/KoAlpaca-v1.1a", "split": "train", "format": "alpaca"}],
        "eval_fraction": 0.1,
    }
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    per_source, any_source, n = _overlap(old, tmp_path, "old")
    assert n == 4 and any_source == 4 and per_source["sft"] == 4
