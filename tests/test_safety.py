"""Secrets never reach what a run writes; weights load as safetensors only unless the recipe opts in."""

from __future__ import annotations

import shutil

import pytest
import torch

from pipeline.core.config import ModelConfig, load_recipe
from pipeline.core.loading import LoadError, load_causal_lm
from pipeline.data import main as data_main
from tests.conftest import REPO

RECIPE = REPO / "recipes" / "tiny_ko.yaml"
SECRETS = {
    "WANDB_API_KEY": "fake-wandb-secret-5f3a9c",
    "HF_TOKEN": "hf_fakeHubTokenSecret77",
    "HUGGING_FACE_HUB_TOKEN": "hf_fakeHubTokenSecret88",
}


def test_tokens_in_the_environment_never_reach_run_files(tmp_path, monkeypatch):
    from pipeline import sft

    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    assert data_main(["--recipe", str(RECIPE), f"run.output_dir={tmp_path}"]) == 0
    sft.run(
        load_recipe(
            RECIPE,
            [
                f"run.output_dir={tmp_path}",
                "sft.max_steps=4",
                "sft.save_steps=2",
                "sft.eval_steps=2",
                "tracking.mode=offline",
            ],
        )
    )
    scanned = 0
    for path in tmp_path.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            scanned += 1
            for secret in SECRETS.values():
                assert secret.encode() not in data, f"{secret} found in {path}"
    assert scanned > 30  # configs, manifests, cards, lineage, checkpoints and the W&B offline files were read
    assert list((tmp_path / "tiny_ko" / "wandb").rglob("*.wandb"))


def test_pickle_weights_are_refused_unless_the_recipe_opts_in_with_a_warning(tmp_path, tiny_dir, capsys):
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "pickled"
    shutil.copytree(tiny_dir, model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    (model_dir / "model.safetensors").unlink()
    torch.save(model.state_dict(), model_dir / "pytorch_model.bin")
    with pytest.raises(LoadError, match="only safetensors weights are loaded unless model.allow_pickle: true"):
        load_causal_lm(ModelConfig(name_or_path=str(model_dir)))
    assert "allow_pickle" not in capsys.readouterr().err
    loaded = load_causal_lm(ModelConfig(name_or_path=str(model_dir), allow_pickle=True))
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    assert (
        f"warning: model.allow_pickle is on: loading pickle (.bin) weights from {model_dir}" in capsys.readouterr().err
    )
    load_causal_lm(ModelConfig(name_or_path=str(tiny_dir), allow_pickle=True))  # safetensors there: no warning
    assert "allow_pickle" not in capsys.readouterr().err


def test_remote_code_is_off_by_default():
    assert ModelConfig(name_or_path="google/gemma-2b").trust_remote_code is False
    for recipe in sorted((REPO / "recipes").glob("*.yaml")):
        assert load_recipe(recipe).model.trust_remote_code is False
