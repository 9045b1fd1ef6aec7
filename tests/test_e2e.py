"""The whole chain through the Makefile on the embedded default: data -> SFT -> RM -> PPO -> report, then a re-run
that skips every finished stage. Asserts learning by a measure the reward model cannot fake."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.core.notices import missing_notices
from tests.helpers import REPO
from tests.helpers.checkpoints import files_naming

# Fake tokens in the environment of the whole chain: none may reach a file the run writes or its console output.
SECRETS = {
    "WANDB_API_KEY": "fake-wandb-secret-e2e-41d7",
    "HF_TOKEN": "hf_fakeHubTokenSecretE2E",
    "HUGGING_FACE_HUB_TOKEN": "hf_fakeHubTokenSecretE2E2",
}


def _make(out, target: str, tracking: str = "disabled", *variables: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **SECRETS}
    return subprocess.run(
        [
            "make",
            target,
            "RECIPE=recipes/tiny_ko.yaml",
            f"OVERRIDES=run.output_dir={out} tracking.mode={tracking}",
            *variables,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )


@pytest.mark.slow
def test_chain_learns_and_every_checkpoint_carries_its_notices(tmp_path):
    res = _make(tmp_path, "report", tracking="offline")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    run = tmp_path / "tiny_ko"
    files = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()]
    assert len(list(run.rglob("*.wandb"))) >= 3, "each training stage keeps its W&B offline run"
    for blob, where in [(p.read_bytes(), str(p)) for p in files] + [((res.stdout + res.stderr).encode(), "console")]:
        for secret in SECRETS.values():
            assert secret.encode() not in blob, f"a token from the environment reached {where}"
    report = json.loads((run / "report.json").read_text())
    assert report["rm_accuracy"] >= 0.9
    assert report["ppo_accuracy"] >= report["sft_accuracy"] + 0.15, report
    assert report["ppo_rm_score"] > report["sft_rm_score"]
    assert 0 < report["ppo_kl"] < 5
    assert set(report["stage_seconds"]) == {"data", "sft", "rm", "ppo"}
    md = (run / "report.md").read_text()
    assert "ground-truth rate" in md and "![ppo.png](report/ppo.png)" in md
    assert all((run / "report" / f).is_file() for f in ("sft_loss.png", "rm_loss.png", "ppo.png"))
    ckpts = [run / s / "final" for s in ("sft", "rm", "ppo")] + sorted(run.glob("*/checkpoints/checkpoint-*"))
    assert len(ckpts) >= 6
    for ckpt in ckpts:
        assert missing_notices(ckpt) == [], ckpt
    card = (run / "ppo" / "final" / "README.md").read_text()
    assert "## How this model was made" in card and "eos_token_id=stop" in card
    assert card.count("## Evaluation on held-out prompts") == 1 and "ground-truth rate" in card

    again = _make(tmp_path, "report")
    assert again.returncode == 0
    assert again.stdout.count("already finished") == 3 and "up to date" in again.stdout

    # Nothing any final checkpoint carries names a local folder (the run directory, the repository, the home).
    for ckpt in [run / s / "final" for s in ("sft", "rm", "ppo")]:
        for root in (str(tmp_path), str(REPO), os.path.expanduser("~")):
            assert files_naming(ckpt, root) == [], f"{ckpt} names {root}"

    # The publish export of the finished chain: what a plain upload would have published, cleaned and checked.
    pub = _make(tmp_path, "publish", "disabled", "REPO_ID=someone/tiny-ko", "PUBLISH_ARGS=--dry-run")
    assert pub.returncode == 0, pub.stdout[-3000:] + pub.stderr[-3000:]
    out = run / "publish"
    assert "dry run: nothing uploaded" in pub.stdout and not (out / "value").exists()
    assert missing_notices(out, lineage=False) == []
    for root in (str(tmp_path), str(REPO), os.path.expanduser("~")):
        assert files_naming(out, root) == []
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["language"] == ["ko"]
    for stage, data in (("sft", "sft.jsonl"), ("rm", "preference.jsonl"), ("ppo", "prompts.jsonl")):
        assert f"{stage}: `data_prep/tiny_ko/{data}`" in card, f"the card does not name the {stage} data"
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "사과의 좋은 점은 뭐야?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    answer = model.generate(**ids, do_sample=False, max_new_tokens=48)[0, ids["input_ids"].shape[1] :].tolist()
    assert answer[-1] == tok.convert_tokens_to_ids("<end_of_turn>") and len(answer) < 48, tok.decode(answer)
