"""The derivative notices and the one save path, on a real saved checkpoint of the tiny model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.core.checkpoint import require_checkpoint, save_final
from pipeline.core.notices import (
    NOTICE_LINE,
    Derivation,
    add_safetensors_metadata,
    missing_notices,
    read_safetensors_metadata,
    write_notices,
)
from pipeline.core.rundir import IncompleteError
from tests.helpers.checkpoints import files_naming


def _derivation(**kw) -> Derivation:
    base = dict(
        stage="sft",
        method="full",
        run_name="r",
        base_model="google/gemma-2b",
        base_revision="main",
        parent="google/gemma-2b",
        datasets=["beomi/KoAlpaca-v1.1a", "data/local.jsonl"],
        recipe={"run": {"name": "r"}},
        recipe_hash="ab" * 32,
    )
    return Derivation(**{**base, **kw})


def test_notice_line_is_exact():
    assert NOTICE_LINE == (
        "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms"
    )


def test_safetensors_metadata_is_added_without_touching_tensors(tmp_path):
    path = tmp_path / "w.safetensors"
    tensors = {
        "a": torch.arange(7, dtype=torch.float32),
        "b": torch.ones(3, 5, dtype=torch.bfloat16),
        "c": torch.tensor([1, 2, 3], dtype=torch.int8),
    }
    save_file(tensors, path, metadata={"format": "pt"})
    add_safetensors_metadata(path, {"gemma_notice": NOTICE_LINE, "x": "한국어"})
    assert read_safetensors_metadata(path) == {"format": "pt", "gemma_notice": NOTICE_LINE, "x": "한국어"}
    loaded = load_file(path)
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with open(path, "rb") as fh:
        assert int.from_bytes(fh.read(8), "little") % 8 == 0
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_write_notices_on_a_saved_model(tmp_path, tiny_dir):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, ckpt)
    (ckpt / "COMPLETE").unlink()
    assert "NOTICE" in missing_notices(ckpt)
    write_notices(ckpt, _derivation(metrics={"eval/loss": 1.25}))
    assert missing_notices(ckpt) == []
    card = (ckpt / "README.md").read_text()
    front = card.split("---")[1]
    assert "license: gemma" in front and "base_model: google/gemma-2b" in front
    assert "- beomi/KoAlpaca-v1.1a" in front and "local.jsonl" not in front  # only hub ids in front matter
    assert "`data/local.jsonl`" in card and "revision `main`" in card and "| eval/loss | 1.25 |" in card
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["gemma_derivative"]["modifications"][-1].startswith("Modified by the gemma-rlhf pipeline: SFT (full)")
    # A second stage appends to the config's modification history instead of replacing it.
    write_notices(ckpt, _derivation(stage="rm"))
    mods = json.loads((ckpt / "config.json").read_text())["gemma_derivative"]["modifications"]
    assert len(mods) == 2 and "RM (full)" in mods[1]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(ckpt)  # still loads


def test_save_final_is_atomic_and_refuses_to_finish_without_notices(tmp_path, tiny_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    final = tmp_path / "sft" / "final"
    save_final(final, lambda tmp: model.save_pretrained(tmp), tokenizer, _derivation())
    assert require_checkpoint(final, "the SFT checkpoint") == final
    assert sorted(p.name for p in final.parent.iterdir()) == ["final"]

    def broken(tmp):
        model.save_pretrained(tmp)
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        save_final(final, broken, tokenizer, _derivation(metrics={"new": 1}))
    assert require_checkpoint(final, "the SFT checkpoint") == final  # the previous checkpoint is intact
    assert "new" not in json.loads((final / "lineage.json").read_text())["metrics"]
    assert sorted(p.name for p in final.parent.iterdir()) == ["final"]


def test_next_stage_refuses_incomplete_or_unmarked(tmp_path, tiny_dir):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, ckpt)
    (ckpt / "COMPLETE").unlink()
    with pytest.raises(IncompleteError, match="incomplete"):
        require_checkpoint(ckpt, "the SFT checkpoint")
    (ckpt / "COMPLETE").write_text("{}")
    with pytest.raises(IncompleteError, match="lacks its Gemma derivative notices: NOTICE"):
        require_checkpoint(ckpt, "the SFT checkpoint")


def test_resuming_with_changed_settings_names_each_change(tmp_path, capsys):
    from pipeline.core.checkpoint import changed_since, warn_if_changed
    from pipeline.core.config import load_recipe, to_dict
    from tests.helpers import REPO

    recipe_file = REPO / "recipes" / "tiny_ko.yaml"
    ckpt = tmp_path / "checkpoints" / "checkpoint-10"
    ckpt.mkdir(parents=True)
    (ckpt / "lineage.json").write_text(json.dumps({"recipe": to_dict(load_recipe(recipe_file))}))
    same = load_recipe(recipe_file, ["run.output_dir=/elsewhere", "tracking.mode=disabled"])
    assert changed_since(ckpt, same, ("sft", "model", "data")) == []
    lowered = load_recipe(recipe_file, ["sft.learning_rate=1e-4", "ppo.kl_coef=0.5"])
    old_lr = load_recipe(recipe_file).sft.learning_rate
    assert changed_since(ckpt, lowered, ("sft", "model", "data")) == [f"sft.learning_rate: {old_lr!r} -> 0.0001"]
    warn_if_changed("sft", ckpt, lowered, ("sft",))
    out = capsys.readouterr().out
    assert "[sft] warning: resuming from" in out and "sft.learning_rate" in out and "do not take effect" in out


def test_resuming_notices_a_local_path_moved_to_another_folder(tmp_path):
    """Bug: the lineage holds a path outside the repository by its name alone, so a resumed stage compared
    '/models/v1/gemma' and '/models/v2/gemma' as the same 'gemma' and did not warn."""
    from pipeline.core.checkpoint import changed_since
    from pipeline.core.config import load_recipe, to_dict
    from pipeline.core.locations import portable
    from pipeline.core.provenance import path_digests
    from tests.helpers import REPO

    recipe_file = REPO / "recipes" / "tiny_ko.yaml"
    v1 = load_recipe(recipe_file, [f"run.output_dir={tmp_path}", f"model.name_or_path={tmp_path / 'v1' / 'gemma'}"])
    ckpt = tmp_path / "checkpoint-10"
    ckpt.mkdir()
    raw = to_dict(v1)
    lineage = {"recipe": portable(raw, v1.run_dir), "recipe_path_digests": path_digests(raw, v1.run_dir)}
    assert lineage["recipe"]["model"]["name_or_path"] == "gemma" and str(tmp_path) not in json.dumps(lineage)
    (ckpt / "lineage.json").write_text(json.dumps(lineage))
    assert changed_since(ckpt, v1, ("model",)) == []  # negative control: the same folder
    v2 = load_recipe(recipe_file, [f"run.output_dir={tmp_path}", f"model.name_or_path={tmp_path / 'v2' / 'gemma'}"])
    assert changed_since(ckpt, v2, ("model",)) == ["model.name_or_path: 'gemma' -> 'gemma' (another folder)"]


def test_card_names_the_whole_lineage_and_no_local_path(tmp_path, tiny_dir):
    """Bugs: the PPO card listed only the prompt data (not the SFT and preference data of its lineage), had no
    language, and the card, config.json, lineage, safetensors metadata and PEFT's adapter config carried absolute
    local paths ('Parent checkpoint: /home/.../runs/r/sft/final')."""
    import yaml

    run = tmp_path / "runs" / "r"
    sft, rm, ppo = (run / s / "final" for s in ("sft", "rm", "ppo"))
    sft.mkdir(parents=True)
    rm.mkdir(parents=True)
    sft_lineage = {"stage": "sft", "datasets": ["beomi/KoAlpaca-v1.1a"], "parent": "google/gemma-2b"}
    (sft / "lineage.json").write_text(json.dumps(sft_lineage))
    rm_lineage = {"stage": "rm", "datasets": ["maywell/ko_Ultrafeedback_binarized"], "parent_lineage": sft_lineage}
    (rm / "lineage.json").write_text(json.dumps(rm_lineage))
    shutil.copytree(tiny_dir, ppo)
    (ppo / "COMPLETE").unlink()
    (ppo / "adapter").mkdir()
    (ppo / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(sft)}))
    folder = tmp_path / "elsewhere" / "ko_sft"  # a local dataset folder outside the run and the repository
    (ppo / "adapter" / "README.md").write_text(f"trained on {folder}\n")  # as a library might write it
    d = _derivation(
        stage="ppo",
        parent=str(sft),
        datasets=[str(tmp_path / "elsewhere" / "prompts.jsonl"), str(folder)],
        inputs={"reward model": str(rm)},
        run_root=run,
        language=["ko"],
        tracking_runs={"sft": "https://wandb.ai/e/p/runs/abc123"},
        data_manifest={"inputs": {str(tmp_path / "elsewhere" / "prompts.jsonl"): "0f" * 32}},
        recipe={"run": {"name": "r", "output_dir": str(tmp_path / "runs")}},
    )
    write_notices(ppo, d)
    card = (ppo / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["language"] == ["ko"] and front["base_model"] == "google/gemma-2b"
    assert front["datasets"] == ["beomi/KoAlpaca-v1.1a", "maywell/ko_Ultrafeedback_binarized"]
    for line in ("sft: `beomi/KoAlpaca-v1.1a`", "rm: `maywell/ko_Ultrafeedback_binarized`", "ppo: `prompts.jsonl`"):
        assert line in card
    # the local folder is named by its name alone, which looks like a hub id: it must not enter the front matter
    assert "ppo: `ko_sft`" in card and "ko_sft" not in front["datasets"]
    assert (ppo / "adapter" / "README.md").read_text() == "trained on ko_sft\n"
    assert "- sft: https://wandb.ai/e/p/runs/abc123" in card and "Parent checkpoint:** `sft/final`" in card
    lineage = json.loads((ppo / "lineage.json").read_text())
    assert lineage["parent"] == "sft/final" and lineage["inputs"]["reward model"]["path"] == "rm/final"
    assert lineage["inputs"]["reward model"]["lineage"]["stage"] == "rm"
    assert json.loads((ppo / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == "sft/final"
    assert files_naming(ppo, str(tmp_path)) == []
    # negative control: the scan finds a planted path
    (ppo / "planted.json").write_text(json.dumps({"p": str(sft)}))
    assert files_naming(ppo, str(tmp_path)) == ["planted.json"]


def test_card_without_hub_base_or_runs_has_no_such_entries(tmp_path, tiny_dir):
    """An embedded toy has no hub base model: front matter must not name 'embedded:...' as base_model (the Hub
    rejects it); no W&B URL means no 'Training runs' section."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, ckpt)
    write_notices(ckpt, _derivation(base_model="embedded:tiny-gemma-ko", parent="embedded:tiny-gemma-ko"))
    card = (ckpt / "README.md").read_text()
    assert "base_model:" not in card.split("---")[1] and "## Training runs" not in card
    write_notices(ckpt, _derivation(base_model="embedded:gemma-3-270m", parent="embedded:gemma-3-270m"))
    assert "base_model: google/gemma-3-270m" in (ckpt / "README.md").read_text().split("---")[1]
