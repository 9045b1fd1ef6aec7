"""Reward-model stage on the tiny chain: learns the preference, scores at the final <end_of_turn>, carries its
notices, reloads as a sequence classifier, stores normalisation statistics, and gates PPO."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pipeline.core.config import load_recipe
from pipeline.core.notices import NOTICE_LINE, missing_notices, read_safetensors_metadata
from pipeline.data import main as data_main
from tests.helpers import REPO
from tests.helpers.launch import kill_and_resume
from tests.helpers.wandb_offline import read_offline_run

# Every test here reads this module's chain (data, SFT and the reward model: minutes to build).
pytestmark = pytest.mark.slow

RECIPE = REPO / "recipes" / "tiny_ko.yaml"
SFT_FAST = ["sft.max_steps=150", "sft.eval_steps=1000", "sft.save_steps=1000"]


def _recipe(out, *overrides):
    return load_recipe(RECIPE, [f"run.output_dir={out}", *SFT_FAST, *overrides])


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Data, a short SFT and the recipe's reward model (its own settings, W&B offline)."""
    from pipeline import rm, sft

    out = tmp_path_factory.mktemp("rm")
    assert data_main(["--recipe", str(RECIPE), f"run.output_dir={out}"]) == 0
    sft.run(_recipe(out, "tracking.mode=disabled"))
    recipe = _recipe(out, "tracking.mode=offline")
    return recipe, rm.run(recipe)


def test_reaches_high_heldout_accuracy_and_stores_stats(chain):
    recipe, final = chain
    stats = json.loads((final / "reward_stats.json").read_text())
    assert stats["accuracy"] >= 0.9 and stats["pairs"] == 116 and stats["std"] > 0
    cfg = json.loads((final / "config.json").read_text())
    assert cfg["reward_normalization"] == {"mean": stats["mean"], "std": stats["std"]}
    m = json.loads((final / "lineage.json").read_text())["metrics"]
    for k in (
        "eval/accuracy",
        "eval/margin",
        "eval/chosen_mean",
        "eval/chosen_std",
        "eval/rejected_mean",
        "eval/rejected_std",
        "eval/length_spearman",
    ):
        assert k in m
    assert m["eval/margin"] > 0 and m["eval/chosen_mean"] > m["eval/rejected_mean"]


def test_notices_and_reload_as_sequence_classifier(chain):
    from transformers import AutoModelForSequenceClassification

    recipe, final = chain
    assert missing_notices(final) == []
    for ckpt in sorted((recipe.run_dir / "rm" / "checkpoints").glob("checkpoint-*")):
        assert missing_notices(ckpt) == [] and (ckpt / "COMPLETE").is_file()
    meta = read_safetensors_metadata(final / "model.safetensors")
    assert meta["gemma_notice"] == NOTICE_LINE and "RM (full)" in meta["modification"]
    lineage = json.loads((final / "lineage.json").read_text())
    assert lineage["parent"].endswith("sft/final") and lineage["parent_lineage"]["stage"] == "sft"
    assert "pipeline_tag: text-classification" in (final / "README.md").read_text()
    model = AutoModelForSequenceClassification.from_pretrained(final)
    assert model.config.num_labels == 1 and model.score.out_features == 1


def test_score_is_read_at_the_final_end_of_turn(chain):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    recipe, final = chain
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    eot, pad = tok.convert_tokens_to_ids("<end_of_turn>"), tok.pad_token_id
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "사과는 무엇인가요?"}], add_generation_prompt=True, return_dict=False
    )
    ids = prompt + tok("사과는 정말 좋습니다.", add_special_tokens=False)["input_ids"] + [eot]
    x = torch.tensor([ids, ids[:-3] + [pad] * 3])  # right padding: the second row ends earlier
    padded = torch.tensor([ids + [pad] * 4])
    newline = torch.tensor([ids + tok("\n", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        r = model(input_ids=x, attention_mask=(x != pad).long()).logits[:, 0]
        r_pad = model(input_ids=padded, attention_mask=(padded != pad).long()).logits[0, 0]
        r_nl = model(input_ids=newline).logits[0, 0]
        hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state
        at_eot = model.score(hidden)[0, len(ids) - 1, 0]
    assert torch.allclose(r[0], at_eot, atol=1e-5)  # the classifier's score is the head at <end_of_turn>
    assert torch.allclose(r_pad, at_eot, atol=1e-5)  # trailing pads do not move it
    assert not torch.allclose(r_nl, at_eot, atol=1e-3)  # the newline after <end_of_turn> is a different position
    # Every preference response the data stage wrote ends on <end_of_turn>, where PPO rollouts stop.
    import pyarrow.parquet as pq

    rows = pq.read_table(recipe.run_dir / "data" / "preference" / "eval.parquet").to_pylist()
    assert all(r["chosen_ids"][-1] == eot and r["rejected_ids"][-1] == eot for r in rows)


def test_wandb_has_rm_metrics(chain):
    recipe, _ = chain
    runs = sorted((recipe.run_dir / "wandb" / "wandb").glob("offline-run-*"))
    run = read_offline_run(str(runs[-1]))
    keys = set().union(*run["history"])
    for k in (
        "rm/train/loss",
        "rm/train/accuracy",
        "rm/eval/accuracy",
        "rm/final/eval/accuracy",
        "rm/final/eval/length_spearman",
    ):
        assert k in keys, k


def test_quality_gate(chain, tmp_path, capsys):
    from pipeline.core.reward_stats import RewardModelGateError, check_gate

    _, final = chain
    acc = json.loads((final / "reward_stats.json").read_text())["accuracy"]
    assert check_gate(final, 0.6, override=False) == acc
    with pytest.raises(RewardModelGateError, match=r"held-out pairwise accuracy .* below rm.min_accuracy 0.999"):
        check_gate(final, 0.999, override=False) if acc < 0.999 else check_gate(final, 1.01, override=False)
    assert check_gate(final, 1.01, override=True) == acc
    assert "ppo.ignore_rm_gate" in capsys.readouterr().err
    weak = tmp_path / "weak"
    weak.mkdir()
    stats = {"mean": 0.0, "std": 1.0, "accuracy": 0.55, "pairs": 20, "scored_at": "<end_of_turn>"}
    (weak / "reward_stats.json").write_text(json.dumps(stats))
    with pytest.raises(RewardModelGateError, match="0.550, below rm.min_accuracy 0.6"):
        check_gate(weak, 0.6, override=False)
    with pytest.raises(RewardModelGateError, match="no reward_stats.json"):
        check_gate(tmp_path, 0.6, override=False)


def test_loss_options_margin_and_centering(chain, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    recipe, final = chain
    tok = AutoTokenizer.from_pretrained(final)
    from pipeline.rm import pairs_dataset

    ds, _, _ = pairs_dataset(recipe.run_dir / "data" / "preference" / "eval.parquet", use_margin=False)
    ds = ds.select(range(4)).add_column("margin", [0.0, 1.0, 2.0, 0.5])
    model = AutoModelForSequenceClassification.from_pretrained(final)
    trainer = RewardTrainer(
        model=model,
        processing_class=tok,
        train_dataset=ds,
        args=RewardConfig(output_dir=str(tmp_path), center_rewards_coefficient=0.01, use_cpu=True, report_to="none"),
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    c, r = rewards[:4], rewards[4:]
    expected = -torch.nn.functional.logsigmoid(c - r - torch.tensor([0.0, 1.0, 2.0, 0.5])).mean()
    expected = expected + 0.01 * ((c + r) ** 2).mean()
    assert torch.allclose(loss, expected, atol=1e-5)


def test_use_margin_without_margins_is_a_clear_error(chain):
    from pipeline.core.config import ConfigError
    from pipeline.rm import pairs_dataset

    recipe, _ = chain
    with pytest.raises(ConfigError, match="rm.use_margin is set but .* without a margin"):
        pairs_dataset(recipe.run_dir / "data" / "preference" / "eval.parquet", use_margin=True)


def test_lora_reward_model_merges(chain, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from pipeline import rm

    recipe, _ = chain
    shutil.copytree(recipe.run_dir / "data", tmp_path / "tiny_ko" / "data")
    shutil.copytree(recipe.run_dir / "sft" / "final", tmp_path / "tiny_ko" / "sft" / "final")
    final = rm.run(
        _recipe(
            tmp_path,
            "rm.method=lora",
            "rm.lora.r=4",
            "rm.max_steps=4",
            "rm.save_steps=2",
            "rm.eval_steps=2",
            "tracking.mode=disabled",
        )
    )
    assert missing_notices(final) == [] and not (final / "adapter_config.json").exists()
    assert (final / "adapter" / "adapter_config.json").is_file()
    AutoModelForSequenceClassification.from_pretrained(final)


@pytest.mark.slow
def test_resume_after_kill(chain, tmp_path):
    recipe, _ = chain
    shutil.copytree(recipe.run_dir / "data", tmp_path / "tiny_ko" / "data")
    shutil.copytree(recipe.run_dir / "sft" / "final", tmp_path / "tiny_ko" / "sft" / "final")
    kill_and_resume(
        "rm",
        tmp_path,
        [*SFT_FAST, "rm.max_steps=24", "rm.save_steps=8", "rm.eval_steps=100", "rm.logging_steps=4"],
        8,
        24,
    )
