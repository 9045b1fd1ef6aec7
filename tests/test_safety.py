"""Secrets never reach what a run writes; weights load as safetensors only unless the recipe opts in."""

from __future__ import annotations

import shutil

import pytest
import torch

from pipeline.core.config import ModelConfig, load_recipe
from pipeline.core.loading import LoadError, load_causal_lm
from pipeline.data import main as data_main
from tests.helpers import REPO

RECIPE = REPO / "recipes" / "tiny_ko.yaml"
SECRETS = {
    "WANDB_API_KEY": "fake-wandb-secret-5f3a9c",
    "HF_TOKEN": "hf_fakeHubTokenSecret77",
    "HUGGING_FACE_HUB_TOKEN": "hf_fakeHubTokenSecret88",
}


@pytest.mark.slow
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


def _gated_error(repo: str) -> OSError:
    """What transformers raises for a gated hub repository without an accepted licence and token (its own wording,
    chained from huggingface_hub's GatedRepoError)."""
    import httpx2
    from huggingface_hub.errors import GatedRepoError

    url = f"https://huggingface.co/{repo}/resolve/main/tokenizer_config.json"
    response = httpx2.Response(401, request=httpx2.Request("GET", url))
    cause = GatedRepoError(f"401 Client Error. Cannot access gated repo for url {url}.", response=response)
    try:
        raise OSError(
            f"You are trying to access a gated repo.\nMake sure to have access to it at https://huggingface.co/{repo}."
        ) from cause
    except OSError as e:
        return e


@pytest.mark.parametrize("gated", [True, False])
def test_a_gated_hub_model_without_a_token_is_one_clear_message(tmp_path, monkeypatch, capsys, gated):
    """Every google/gemma-* repository is gated: with no token (or an unaccepted licence) the data stage stops in one
    line that says so, where to accept the licence and how to give a token, and never prints the token. A repository
    that is merely missing must not be called gated (the negative control)."""
    from transformers import AutoTokenizer

    from tests.helpers.recipes import write_recipe

    monkeypatch.setenv("HF_TOKEN", SECRETS["HF_TOKEN"])

    def refuse(*args, **kwargs):
        if gated:
            raise _gated_error("google/gemma-3-270m")
        raise OSError("google/gemma-3-270m is not a local folder and is not a valid model identifier")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", refuse)
    recipe = write_recipe(tmp_path, {"sft": {"train": [{"path": str(REPO / "data_prep/tiny_ko/sft.jsonl")}]}})
    text = recipe.read_text().replace("embedded:tiny-gemma-ko", "google/gemma-3-270m")
    recipe.write_text(text)
    assert data_main(["--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and SECRETS["HF_TOKEN"] not in err
    said_gated = all(
        s in err for s in ("gated model", "https://huggingface.co/google/gemma-3-270m", "HF_TOKEN", "hf auth login")
    )
    assert said_gated == gated, err
