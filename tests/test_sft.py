"""SFT stage on the tiny model: learns, saves a notice-carrying checkpoint that reloads and stops on
<end_of_turn>, logs to W&B, masks survive packing, LoRA merges into a full checkpoint, resume after kill -9."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.core.config import load_recipe
from pipeline.core.notices import NOTICE_LINE, TERMS_FILE, missing_notices, read_safetensors_metadata
from pipeline.data import main as data_main
from tests.helpers import REPO
from tests.helpers.checkpoints import changed_fraction
from tests.helpers.launch import kill_and_resume
from tests.helpers.wandb_offline import read_offline_run

# Every test here trains SFT on the tiny model or reads a trained run.
pytestmark = pytest.mark.slow

RECIPE = REPO / "recipes" / "tiny_ko.yaml"
FAST = [
    "sft.logging_steps=5",
    "sft.eval_steps=20",
    "sft.save_steps=20",
    "sft.max_steps=40",
    "sft.per_device_eval_batch_size=64",
]


def _recipe(out: Path, *overrides: str):
    return load_recipe(RECIPE, [f"run.output_dir={out}", *FAST, *overrides])


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    from pipeline import sft

    out = tmp_path_factory.mktemp("sft")
    assert data_main(["--recipe", str(RECIPE), f"run.output_dir={out}"]) == 0
    recipe = _recipe(out, "tracking.mode=offline")
    final = sft.run(recipe)
    return recipe, final


def test_loss_falls_and_weights_change(sft_run, tiny_dir):
    from safetensors.torch import load_file

    recipe, final = sft_run
    state = json.loads((recipe.run_dir / "sft" / "checkpoints" / "checkpoint-40" / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert state["global_step"] == 40 and losses[-1] < 0.5 * losses[0]
    before, after = load_file(tiny_dir / "model.safetensors"), load_file(final / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(not torch.equal(before[k], after[k]) for k in before if "norm" not in k)


def test_final_reloads_and_answers_in_gemma_format(sft_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, final = sft_run
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    held = [json.loads(line)["prompt"] for line in (REPO / "data_prep/tiny_ko/heldout.jsonl").open()][:4]
    for prompt in held:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        assert tok.decode(ids["input_ids"][0]).endswith("<start_of_turn>model\n")
        out = model.generate(
            **ids, max_new_tokens=32, do_sample=False, eos_token_id=eot, pad_token_id=tok.pad_token_id
        )
        new = out[0, ids["input_ids"].shape[1] :].tolist()
        assert eot in new, f"no <end_of_turn> for {prompt!r}: {tok.decode(new)!r}"


def test_every_checkpoint_carries_its_notices(sft_run):
    recipe, final = sft_run
    ckpts = sorted((recipe.run_dir / "sft" / "checkpoints").glob("checkpoint-*"))
    assert [c.name for c in ckpts] == ["checkpoint-20", "checkpoint-40"]
    for ckpt in [final, *ckpts]:
        assert missing_notices(ckpt) == [], ckpt
        assert (ckpt / "NOTICE").read_text() == NOTICE_LINE + "\n"
        assert (ckpt / "COMPLETE").is_file()
        card = (ckpt / "README.md").read_text()
        front = card.split("---")[1]
        # the toy has no hub base model, and the Hub refuses a base_model that is not a hub id
        assert "license: gemma" in front and "base_model:" not in front and "- ko" in front
        assert "## Modifications" in card and "Prohibited Use Policy" in card and "binding on recipients" in card
        assert "Recipe hash" in card and "Parent checkpoint" in card and "data_prep/tiny_ko/sft.jsonl" in card
        meta = read_safetensors_metadata(ckpt / "model.safetensors")
        assert meta["gemma_notice"] == NOTICE_LINE and "SFT (full)" in meta["modification"]
        cfg = json.loads((ckpt / "config.json").read_text())
        assert cfg["gemma_derivative"]["notice"] == NOTICE_LINE
        lineage = json.loads((ckpt / "lineage.json").read_text())
        assert lineage["base_model"]["id"] == "embedded:tiny-gemma-ko" and lineage["stage"] == "sft"
        assert lineage["data_manifest"]["fingerprint"] and lineage["git_commit"]
        assert lineage["recipe"]["run"]["name"] == "tiny_ko"
    assert json.loads((final / "lineage.json").read_text())["metrics"]["eval/loss"] > 0
    assert not (final / "training_args.bin").exists()
    assert not list(final.parent.glob(".final.*"))  # no staging debris


def test_wandb_offline_run_has_the_metrics(sft_run):
    recipe, _ = sft_run
    runs = sorted((recipe.run_dir / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run = read_offline_run(str(runs[0]))
    keys = set().union(*run["history"])
    for k in (
        "sft/train/loss",
        "sft/train/learning_rate",
        "sft/train/grad_norm",
        "sft/train/tokens_per_second",
        "sft/train/mean_token_accuracy",
        "sft/eval/loss",
        "sft/eval/mean_token_accuracy",
    ):
        assert k in keys, k
    assert run["config"]["recipe"]["run"]["name"] == "tiny_ko" and run["config"]["git_commit"]
    panel = run["tables"]["sft/panel"]
    assert panel["columns"] == ["step", "prompt", "answer", "stopped"] and len(panel["data"]) == 2


def test_finished_stage_is_skipped(sft_run, capsys):
    from pipeline import sft

    recipe, final = sft_run
    stamp = (final / "COMPLETE").read_text()
    sft.run(recipe)
    assert "already finished" in capsys.readouterr().out and (final / "COMPLETE").read_text() == stamp


@pytest.mark.parametrize("packing", [False, True])
def test_labels_cover_exactly_the_masked_tokens(sft_run, packing, tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    recipe, final = sft_run
    data = recipe.run_dir / "data"
    ds = datasets.Dataset.from_parquet(str(data / "sft" / "train.parquet")).select(range(64))
    tok = AutoTokenizer.from_pretrained(data / "tokenizer")
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(final),
        processing_class=tok,
        train_dataset=ds.select_columns(["input_ids", "assistant_masks"]),
        args=SFTConfig(
            output_dir=str(tmp_path),
            packing=packing,
            max_length=128,
            report_to="none",
            use_cpu=True,
            per_device_train_batch_size=8,
        ),
    )
    prepared = trainer.train_dataset
    n_trained = sum(sum(1 for x in row["labels"] if x != -100) for row in prepared)
    assert n_trained == sum(sum(m) for m in ds["assistant_masks"])
    if packing:
        assert len(prepared) < len(ds)
    batch = trainer.data_collator([prepared[i] for i in range(4)])
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    labels = batch["labels"][batch["labels"] != -100]
    assert (labels == eot).sum() >= 4  # every model turn's <end_of_turn> is trained


def test_lora_exports_a_merged_full_checkpoint_and_copies_the_terms(tmp_path, tiny_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipeline import sft

    base = tmp_path / "base"
    shutil.copytree(tiny_dir, base)
    (base / "GEMMA_TERMS_OF_USE.md").write_text("Gemma Terms of Use (test copy)\n")
    overrides = [
        f"model.name_or_path={base}",
        "sft.method=lora",
        "sft.lora.r=4",
        "sft.max_steps=6",
        "sft.save_steps=3",
        "sft.eval_steps=3",
        "sft.learning_rate=1e-2",
        "tracking.mode=disabled",
    ]
    assert data_main(["--recipe", str(RECIPE), f"run.output_dir={tmp_path}", *overrides]) == 0
    final = sft.run(_recipe(tmp_path, *overrides))
    assert missing_notices(final) == []
    assert not (final / "adapter_config.json").exists()  # a plain full checkpoint
    assert (final / "adapter" / "adapter_config.json").is_file()
    assert read_safetensors_metadata(final / "adapter" / "adapter_model.safetensors")["gemma_notice"] == NOTICE_LINE
    assert (final / TERMS_FILE).read_text() == "Gemma Terms of Use (test copy)\n"
    assert "lora" in (final / "README.md").read_text().split("---")[1]
    merged = AutoModelForCausalLM.from_pretrained(final).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), final / "adapter").eval()
    original = AutoModelForCausalLM.from_pretrained(base).eval()
    x = torch.tensor([[2, 4, 100, 200, 5, 204]])
    with torch.no_grad():
        a, b, c = merged(x).logits, with_adapter(x).logits, original(x).logits
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, c, atol=1e-3)


@pytest.mark.slow
def test_resume_after_kill_reaches_the_same_step(tmp_path):
    assert data_main(["--recipe", str(RECIPE), f"run.output_dir={tmp_path}"]) == 0
    kill_and_resume("sft", tmp_path, [*FAST, "sft.max_steps=30", "sft.save_steps=10", "sft.eval_steps=100"], 10, 30)


def test_non_finite_loss_stops_with_the_step_and_no_final(sft_run, tmp_path, capsys):
    from pipeline import sft

    recipe, _ = sft_run
    shutil.copytree(recipe.run_dir / "data", tmp_path / "tiny_ko" / "data")
    rc = sft.main(
        [
            "--recipe",
            str(RECIPE),
            f"run.output_dir={tmp_path}",
            "sft.learning_rate=1e8",
            "sft.max_grad_norm=1e30",
            "sft.max_steps=20",
            "sft.logging_steps=1",
            "sft.save_steps=1",
            "tracking.mode=disabled",
        ]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "non-finite grad_norm (nan) at step 2" in err and "last good checkpoint" in err
    ckpts = tmp_path / "tiny_ko" / "sft" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("checkpoint-*")) == ["checkpoint-1"]
    assert (ckpts / "checkpoint-1" / "COMPLETE").is_file()
    assert not (tmp_path / "tiny_ko" / "sft" / "final").exists()


def test_sft_under_bf16_steps_fp32_master_weights(chain, tmp_path, tiny_dir, fresh_accelerator_state, capsys):
    """Catches SFT (and RM, which shares the loading) stepping bf16 weights: the model must load in fp32 and the
    Trainer autocast, so a small learning rate still moves nearly every weight."""
    from safetensors.torch import load_file

    from pipeline import sft

    out = tmp_path
    shutil.copytree(chain / "tiny_ko" / "data", out / "tiny_ko" / "data")
    final = sft.run(
        load_recipe(
            RECIPE,
            [
                f"run.output_dir={out}",
                "run.precision=bf16",
                "tracking.mode=disabled",
                "sft.max_steps=3",
                "sft.learning_rate=3e-6",
                "sft.warmup_ratio=0",
                "sft.lr_scheduler_type=constant",
                "sft.eval_steps=1000",
                "sft.save_steps=1000",
            ],
        )
    )
    assert "; bf16" in capsys.readouterr().out
    base, got = load_file(tiny_dir / "model.safetensors"), load_file(final / "model.safetensors")
    assert {v.dtype for v in got.values()} == {torch.float32}
    assert changed_fraction(base, {k: got[k] for k in base}) > 0.9
