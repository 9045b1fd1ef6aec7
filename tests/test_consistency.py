"""The cross-stage gate: RM and PPO refuse inputs whose tokenizer, chat template, pad id or scoring token differ
from the data stage's, naming what differs."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.core.consistency import ConsistencyError, check_inputs
from pipeline.data import main as data_main
from tests.helpers import REPO

# Every test here reads a run folder with a trained SFT checkpoint (seconds to minutes to build).
pytestmark = pytest.mark.slow

RECIPE = REPO / "recipes" / "tiny_ko.yaml"
FAST = ["sft.max_steps=4", "sft.save_steps=100", "sft.eval_steps=100", "tracking.mode=disabled"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from pipeline import sft
    from pipeline.core.config import load_recipe

    out = tmp_path_factory.mktemp("gate")
    assert data_main(["--recipe", str(RECIPE), f"run.output_dir={out}"]) == 0
    sft.run(load_recipe(RECIPE, [f"run.output_dir={out}", *FAST]))
    return out / "tiny_ko"


def _copy(run_dir, tmp_path):
    ckpt = tmp_path / "sft"
    shutil.copytree(run_dir / "sft" / "final", ckpt)
    return ckpt


def test_consistent_inputs_pass(run_dir):
    check_inputs(run_dir / "data", {"the SFT checkpoint": run_dir / "sft" / "final"})


def test_changed_chat_template_is_named(run_dir, tmp_path):
    ckpt = _copy(run_dir, tmp_path)
    (ckpt / "chat_template.jinja").write_text("{{ messages }}")
    with pytest.raises(ConsistencyError, match=r"the SFT checkpoint .*: tokenizer chat_template_hash is"):
        check_inputs(run_dir / "data", {"the SFT checkpoint": ckpt})


def test_changed_pad_id_and_scoring_token_are_named(run_dir, tmp_path):
    ckpt = _copy(run_dir, tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["pad_token_id"] = 1
    (ckpt / "config.json").write_text(json.dumps(cfg))
    stats = {"mean": 0.0, "std": 1.0, "accuracy": 1.0, "pairs": 1, "scored_at": "\n"}
    (ckpt / "reward_stats.json").write_text(json.dumps(stats))
    with pytest.raises(ConsistencyError) as e:
        check_inputs(run_dir / "data", {"the reward model": ckpt})
    assert "config pad_token_id 1 is not the tokenizer's pad id 0" in str(e.value)
    assert "scores at '\\n', but rollouts stop at '<end_of_turn>'" in str(e.value)


def test_reward_stage_refuses_an_inconsistent_sft_checkpoint(run_dir, tmp_path, capsys):
    from pipeline import rm

    out = tmp_path / "runs"
    shutil.copytree(run_dir / "data", out / "tiny_ko" / "data")
    ckpt = _copy(run_dir, tmp_path)
    shutil.copytree(ckpt, out / "tiny_ko" / "sft" / "final")
    tok_cfg = out / "tiny_ko" / "sft" / "final" / "chat_template.jinja"
    tok_cfg.write_text(tok_cfg.read_text().replace("model", "assistant"))
    assert rm.main(["--recipe", str(RECIPE), f"run.output_dir={out}", *FAST]) == 2
    err = capsys.readouterr().err
    assert "stage inputs are inconsistent" in err and "chat_template_hash" in err
    assert not (out / "tiny_ko" / "rm").exists()
