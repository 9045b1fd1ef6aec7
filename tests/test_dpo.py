"""The DPO stage on the tiny chain: TRL's DPOTrainer on the data stage's own ids, from the SFT checkpoint, saved as a
notice-carrying derivative that stops at <end_of_turn>."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.core.notices import missing_notices
from tests.ppo_chain import _recipe

FAST = [
    "dpo.max_steps=24",
    "dpo.learning_rate=5e-5",
    "dpo.eval_steps=1000",
    "dpo.save_steps=12",
    "dpo.logging_steps=4",
]


@pytest.fixture()
def sft_run(chain, tmp_path):
    for part in ("data", "sft/final"):
        shutil.copytree(chain / "tiny_ko" / part, tmp_path / "tiny_ko" / part)
    return tmp_path


def test_dpo_trains_on_the_data_stages_ids_and_saves_a_derivative(sft_run):
    """Catches TRL re-tokenising the pairs (a second <bos>, a prompt cut off its completion), a checkpoint without
    its notices or its stop at <end_of_turn>, and a DPO that does not move the implicit reward toward the chosen
    answers on held-out pairs."""
    from pipeline import dpo

    recipe = _recipe(sft_run, *FAST)
    train = dpo.pairs_dataset(sft_run / "tiny_ko" / "data" / "preference" / "train.parquet")
    trainer_cls = dpo.pretokenized_trainer()
    assert trainer_cls._prepare_dataset(None, train, None, None, "train") is train  # the ids as they are
    final = dpo.run(recipe)
    assert final == sft_run / "tiny_ko" / "dpo" / "final"
    assert missing_notices(final) == []
    lineage = json.loads((final / "lineage.json").read_text())
    assert lineage["stage"] == "dpo" and lineage["parent"] == "sft/final"
    assert lineage["datasets"] == ["data_prep/tiny_ko/preference.jsonl"]
    gen = json.loads((final / "generation_config.json").read_text())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(final)
    assert tok.convert_tokens_to_ids("<end_of_turn>") in gen["eos_token_id"]
    metrics = lineage["metrics"]
    assert metrics["steps"] == 24
    assert metrics["eval/rewards/accuracies"] > 0.6, metrics
    assert metrics["eval/rewards/margins"] > 0, metrics
