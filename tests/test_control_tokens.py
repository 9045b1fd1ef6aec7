"""LoRA that also trains the control-token rows (``lora.train_control_tokens``, pipeline/core/trainer_stage.py): the
rows of <start_of_turn> and <end_of_turn>, and only those, learn in the tied embedding and head; the merged
checkpoint holds them; a resume or a reload of the adapter restores them; ``disable_adapter()`` (the LoRA reference
of DPO and PPO) gives the base's rows back; TRL's fused LM head reads the trained rows. On the tiny model, and the
model-dependent parts (ids 105/106, Gemma 3's scaled embedding, its classifier) on the real Gemma 3 270M."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from data_prep.gemma_format import END_OF_TURN, START_OF_TURN
from pipeline.core.config import LoraSettings, load_recipe
from pipeline.core.trainer_stage import control_token_indices, head_bias_visible, with_lora
from tests.helpers import REPO

RECIPE = REPO / "recipes" / "tiny_ko.yaml"
LORA = [
    "tracking.mode=disabled",
    "sft.method=lora",
    "sft.lora.r=4",
    "sft.max_steps=4",
    "sft.save_steps=2",
    "sft.eval_steps=2",
    "sft.learning_rate=1e-2",
    "sft.prompt_panel=[]",
]
EMBED = "model.embed_tokens.weight"
DELTA = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"


def _ids(tokenizer) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in (START_OF_TURN, END_OF_TURN)]


def _peft(model, tokenizer, task_type: str = "CAUSAL_LM", **extra):
    """``model`` with the stages' LoRA config applied (control-token rows on), as the Trainer applies it."""
    from peft import get_peft_model

    _, config = with_lora(model, "lora", LoraSettings(r=4), task_type, None, False, tokenizer=tokenizer, **extra)
    return get_peft_model(model, config)


def _move_rows(peft_model, seed: int = 0) -> torch.Tensor:
    """Shift the trained rows away from the base (LoRA's B is still zero: the rows are the only change)."""
    delta = peft_model.get_input_embeddings().token_adapter.trainable_tokens_delta["default"]
    with torch.no_grad():
        delta.add_(torch.randn(delta.shape, generator=torch.Generator().manual_seed(seed)))
    return delta.detach().clone()


def _tiny(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval()


# --------------------------------------------------------------------------------------------------------------
# The config and PEFT's wrapping (no training)
# --------------------------------------------------------------------------------------------------------------


def test_the_config_names_the_two_control_ids_from_the_tokenizer(tiny_dir, tokenizer):
    """Catches trainable_token_indices missing, naming other ids than the tokenizer's <start_of_turn> and
    <end_of_turn>, or ``modules_to_save`` standing in for it (every row of the vocabulary trained and saved); with
    the field off, or no tokenizer given (a caller not yet passing one), the config is the plain LoRA one."""
    model = _tiny(tiny_dir)
    sot, eot = _ids(tokenizer)
    _, on = with_lora(model, "lora", LoraSettings(), "CAUSAL_LM", None, False, tokenizer=tokenizer)
    assert on.trainable_token_indices == [sot, eot] == control_token_indices(tokenizer)
    assert on.modules_to_save is None
    _, off = with_lora(model, "lora", LoraSettings(train_control_tokens=False), "CAUSAL_LM", None, False, tokenizer)
    _, untold = with_lora(model, "lora", LoraSettings(), "CAUSAL_LM", None, False)
    assert off.trainable_token_indices is None and untold.trainable_token_indices is None


def test_the_tied_head_emits_with_the_trained_rows_and_disable_adapter_gives_the_base_back(tiny_dir, tokenizer):
    """Catches a head left on the base rows while the embedding trains (the model could read <end_of_turn> but
    never learn to emit it), rows other than the two changed, and a ``disable_adapter()`` that keeps the trained
    rows on (DPO's and PPO's LoRA reference would then be the policy itself, KL 0). The head is checked both as a
    module and through ``.weight``, which TRL's fused LM head multiplies by directly."""
    ids = _ids(tokenizer)
    base = _tiny(tiny_dir)
    e0 = base.get_input_embeddings().weight.detach().clone()
    x = torch.tensor([[2, ids[0], 100, 200, ids[1], 6, ids[0], 204]])
    with torch.no_grad():
        base_logits = base(x).logits
    model = _peft(_tiny(tiny_dir), tokenizer)
    rows = _move_rows(model)
    head = model.get_output_embeddings()
    assert head.token_adapter.tied_adapter is model.get_input_embeddings().token_adapter

    h = torch.randn(3, e0.size(1))
    with torch.no_grad():
        on_weight, on_head, on_logits = head.weight.clone(), head(h), model(x).logits
        with model.disable_adapter():
            off_weight, off_head, off_logits = head.weight.clone(), head(h), model(x).logits
    assert torch.equal(on_weight[ids], rows)
    others = torch.ones(e0.size(0), dtype=torch.bool)
    others[ids] = False
    assert torch.equal(on_weight[others], e0[others])
    assert torch.allclose(on_head[:, ids], h @ rows.T, atol=1e-5)
    assert torch.equal(off_weight, e0) and torch.allclose(off_head, h @ e0.T, atol=1e-5)
    assert torch.equal(off_logits, base_logits)
    assert not torch.allclose(on_logits, base_logits, atol=1e-3)  # negative control: the rows do change the model


def test_the_fused_lm_head_trains_the_rows_as_the_plain_forward_does(tiny_dir, tokenizer):
    """Catches TRL's fused LM head (SFT and DPO compute their loss from ``lm_head.weight`` and ``.bias``) failing on
    PEFT's head wrapper, which has no ``bias`` (``head_bias_visible``), or reading the base rows: its loss and the
    rows' gradient equal the plain forward's."""
    from trl.trainer.utils import add_fused_lm_head

    ids = _ids(tokenizer)
    x = torch.tensor([[2, ids[0], 100, 200, ids[1], 6, ids[0], 204, ids[1]]])
    model = _peft(_tiny(tiny_dir), tokenizer)
    _move_rows(model)
    delta = model.get_input_embeddings().token_adapter.trainable_tokens_delta["default"]
    plain = model(input_ids=x, labels=x).loss
    (plain_grad,) = torch.autograd.grad(plain, delta)
    add_fused_lm_head(model.get_base_model(), outputs=("log_probs",))
    with pytest.raises(AttributeError, match="bias"):  # negative control: what head_bias_visible mends
        model(input_ids=x, labels=x, fused_lm_head=True)
    head_bias_visible(model)
    fused = model(input_ids=x, labels=x, fused_lm_head=True).loss
    (fused_grad,) = torch.autograd.grad(fused, delta)
    assert torch.allclose(fused, plain, atol=1e-5)
    assert torch.allclose(fused_grad, plain_grad, atol=1e-5) and plain_grad[1].abs().sum() > 0


def test_a_saved_adapter_restores_the_rows_on_every_reload_path(tiny_dir, tokenizer, tmp_path):
    """Catches an adapter saved without the rows, or a reload that starts them from the base again: the finished-run
    restore (``with_lora(..., done=True)``, ``PeftModel.from_pretrained``), the Trainer's resume and DPO's restore
    (``load_adapter`` into the fresh "default" adapter) all bring back the saved rows, trainable."""
    from safetensors.torch import load_file

    model = _peft(_tiny(tiny_dir), tokenizer)
    rows = _move_rows(model)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert torch.equal(saved[DELTA], rows)
    assert not any("embed_tokens.weight" in k or "lm_head" in k for k in saved)  # two rows, not the matrix

    restored, _ = with_lora(_tiny(tiny_dir), "lora", LoraSettings(r=4), "CAUSAL_LM", tmp_path, True, tokenizer)
    fresh = _peft(_tiny(tiny_dir), tokenizer)
    fresh.load_adapter(str(tmp_path), adapter_name="default", is_trainable=True)
    for m in (restored, fresh):
        delta = m.get_input_embeddings().token_adapter.trainable_tokens_delta["default"]
        assert torch.equal(delta, rows) and delta.requires_grad
        assert m.get_output_embeddings().token_adapter.tied_adapter is m.get_input_embeddings().token_adapter


def test_the_reward_model_trains_the_rows_beside_its_score_head(tiny_dir, tokenizer):
    """Catches the config failing on the sequence-classification task type (the reward model stage, whose
    ``modules_to_save=["score"]`` must not clash with the token rows) or its rows getting no gradient: the
    classifier has no output embedding, so only the input rows train (the score head stays its own)."""
    from transformers import AutoModelForSequenceClassification

    ids = _ids(tokenizer)
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1)
    classifier.config.pad_token_id = tokenizer.pad_token_id
    model = _peft(classifier, tokenizer, "SEQ_CLS", modules_to_save=["score"])
    trained = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trained == {f"{DELTA}.default", "base_model.model.score.modules_to_save.default.weight"}
    x = torch.tensor([[2, ids[0], 100, 200, ids[1], 6, ids[0], 204, ids[1]]])
    model(input_ids=x, labels=torch.tensor([1.0])).loss.backward()
    delta = model.get_input_embeddings().token_adapter.trainable_tokens_delta["default"]
    assert (delta.grad.abs().sum(dim=1) > 0).all()


# --------------------------------------------------------------------------------------------------------------
# The SFT stage on the tiny model
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """Data and a 4-step LoRA SFT run (checkpoints at 2 and 4), control-token rows on."""
    from pipeline import sft
    from pipeline.data import main as data_main

    out = tmp_path_factory.mktemp("ctl")
    assert data_main(["--recipe", str(RECIPE), f"run.output_dir={out}"]) == 0
    final = sft.run(load_recipe(RECIPE, [f"run.output_dir={out}", *LORA]))
    return out, final


def _embedding(folder: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")[EMBED]


def _rerun(lora_run, tmp_path, *removed: str) -> Path:
    """The finished run copied to ``tmp_path`` with ``removed`` (paths under its sft folder) deleted, run again."""
    from pipeline import sft

    out, _ = lora_run
    shutil.copytree(out / "tiny_ko", tmp_path / "tiny_ko")
    for part in removed:
        shutil.rmtree(tmp_path / "tiny_ko" / "sft" / part)
    return sft.run(load_recipe(RECIPE, [f"run.output_dir={tmp_path}", *LORA]))


@pytest.mark.slow
def test_lora_sft_changes_exactly_the_two_rows_and_the_merged_checkpoint_has_them(lora_run, tiny_dir, tokenizer):
    """Catches control-token rows that never reach the merged checkpoint (trained in the adapter, lost at the merge,
    the 0.725 stop rate of the real demo), a merge that unties or rewrites other rows, and a saved head that
    disagrees with the embedding: only the <start_of_turn> and <end_of_turn> rows differ from the base, equal to the
    adapter's rows, and the reloaded model's tied head has them."""
    from peft import PeftModel
    from safetensors.torch import load_file

    _, final = lora_run
    ids = _ids(tokenizer)
    base, merged = _embedding(tiny_dir), _embedding(final)
    changed = (merged != base).any(dim=1).nonzero().flatten().tolist()
    assert changed == sorted(ids)
    adapter = load_file(final / "adapter" / "adapter_model.safetensors")
    assert torch.equal(merged[ids], adapter[DELTA])
    model = _tiny(final)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert torch.equal(model.get_output_embeddings().weight[ids], adapter[DELTA])
    x = torch.tensor([[2, ids[0], 100, 200, ids[1], 6, ids[0], 204]])
    with_adapter = PeftModel.from_pretrained(_tiny(tiny_dir), final / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(model(x).logits, with_adapter(x).logits, atol=1e-5)


@pytest.mark.slow
def test_with_the_field_off_the_embedding_stays_the_base_bitwise(lora_run, tiny_dir, tmp_path):
    """Negative control of the test above: with ``sft.lora.train_control_tokens=false`` the same training leaves
    every row of the embedding (and so of the tied head) bitwise the base's, and the adapter holds no rows."""
    from safetensors.torch import load_file

    from pipeline import sft

    out, _ = lora_run
    shutil.copytree(out / "tiny_ko" / "data", tmp_path / "tiny_ko" / "data")
    final = sft.run(load_recipe(RECIPE, [f"run.output_dir={tmp_path}", *LORA, "sft.lora.train_control_tokens=false"]))
    assert torch.equal(_embedding(final), _embedding(tiny_dir))
    assert not any("trainable_tokens" in k for k in load_file(final / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_a_resume_from_an_intermediate_checkpoint_restores_the_rows(lora_run, tmp_path, tiny_dir, tokenizer):
    """Catches a resume that drops the trained rows (the Trainer reloads the adapter from checkpoint-2; rows
    restarted from the base would end elsewhere): the resumed run ends with the uninterrupted run's rows, bitwise."""
    _, final = lora_run
    resumed = _rerun(lora_run, tmp_path, "final", "checkpoints/checkpoint-4")
    ids = _ids(tokenizer)
    assert torch.equal(_embedding(resumed), _embedding(final))
    assert not torch.equal(_embedding(resumed)[ids], _embedding(tiny_dir)[ids])


@pytest.mark.slow
def test_a_finished_run_restored_from_its_checkpoint_keeps_the_rows(lora_run, tmp_path, capsys):
    """Catches the finished-run restore (``with_lora(..., done=True)``: killed while saving the final checkpoint)
    merging an adapter without its rows: the final saved again equals the first, bitwise."""
    _, final = lora_run
    again = _rerun(lora_run, tmp_path, "final")
    assert "(training was finished)" in capsys.readouterr().out
    assert torch.equal(_embedding(again), _embedding(final))


@pytest.mark.slow
def test_disable_adapter_on_the_trained_adapter_gives_the_base_logits(lora_run, tiny_dir, tokenizer):
    """Catches a LoRA reference that keeps the trained rows (the trained adapter of a real run, not moved rows):
    with the adapter disabled the logits are the base's exactly; enabled, the merged model's."""
    from peft import PeftModel

    _, final = lora_run
    ids = _ids(tokenizer)
    x = torch.tensor([[2, ids[0], 100, 200, ids[1], 6, ids[0], 204]])
    model = PeftModel.from_pretrained(_tiny(tiny_dir), final / "adapter").eval()
    with torch.no_grad():
        base, merged, on = _tiny(tiny_dir)(x).logits, _tiny(final)(x).logits, model(x).logits
        with model.disable_adapter():
            off = model(x).logits
    assert torch.equal(off, base)
    assert torch.allclose(on, merged, atol=1e-5) and not torch.allclose(on, base, atol=1e-3)


# --------------------------------------------------------------------------------------------------------------
# The real Gemma 3 270M: its ids, scaled embedding, tied head and classifier
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_on_the_real_gemma_the_rows_are_105_106_in_the_scaled_embedding_and_the_tied_head():
    """Catches what the toy cannot show: ids other than Gemma's 105/106, the scaled embedding (Gemma multiplies by
    sqrt(hidden)) losing its scale on the trained rows, the tied head of Gemma 3 left unwrapped, and Gemma 3's
    own sequence classifier refusing the rows; ``disable_adapter()`` gives the base's logits back."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from pipeline.core.config import ModelConfig
    from pipeline.core.embedded import resolve_model_path
    from pipeline.core.loading import load_tokenizer

    base_dir = Path(resolve_model_path("embedded:gemma-3-270m"))
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(base_dir)))
    assert control_token_indices(tokenizer) == [105, 106]
    x = torch.tensor([[2, 105, 2364, 107, 236769, 106, 107, 105, 4368, 107]])
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(x).logits
    model = _peft(base, tokenizer)
    rows = _move_rows(model)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert head.token_adapter.tied_adapter is embed.token_adapter
    h = torch.randn(2, rows.size(1))
    with torch.no_grad():
        scale = embed.original_module.embed_scale
        assert torch.allclose(embed(torch.tensor([[105, 106]]))[0], rows * scale, rtol=1e-5)
        assert torch.allclose(head(h)[:, [105, 106]], h @ rows.T, rtol=1e-4, atol=1e-4)
        on = model(x).logits
        with model.disable_adapter():
            off = model(x).logits
    assert torch.equal(off, base_logits) and not torch.allclose(on, base_logits, atol=1e-3)
    del model, base

    classifier = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1, dtype=torch.float32)
    classifier.config.pad_token_id = tokenizer.pad_token_id
    model = _peft(classifier, tokenizer, "SEQ_CLS", modules_to_save=["score"])
    model(input_ids=x, labels=torch.tensor([1.0])).loss.backward()
    assert (model.get_input_embeddings().token_adapter.trainable_tokens_delta["default"].grad.abs().sum(1) > 0).all()
