"""The embedded tiny Gemma: deterministic offline build, Gemma's special tokens, loads like a hub checkpoint."""

from __future__ import annotations

import hashlib
import json

import pytest

from data_prep.gemma_format import render
from pipeline.core.embedded import build


def _digest(folder) -> dict:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != "COMPLETE"
    }


@pytest.mark.slow
def test_build_is_deterministic(tmp_path, tiny_dir):
    a = build("tiny-gemma-ko", tmp_path / "a")
    assert _digest(a) == _digest(tiny_dir)


def test_special_tokens_and_automatic_bos(tokenizer):
    ids = {
        t: tokenizer.convert_tokens_to_ids(t)
        for t in ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")
    }
    assert ids == {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start_of_turn>": 4, "<end_of_turn>": 5}
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    enc = tokenizer("안녕하세요")["input_ids"]
    assert enc[0] == tokenizer.bos_token_id and enc.count(tokenizer.bos_token_id) == 1
    assert tokenizer("3 더하기 14")["input_ids"][-2:] == tokenizer("14", add_special_tokens=False)["input_ids"]
    assert len(tokenizer("14", add_special_tokens=False)["input_ids"]) == 2  # every digit its own token


def test_loads_like_a_hub_checkpoint(tiny_dir, tokenizer):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(tiny_dir)
    assert cfg.model_type == "gemma" and cfg.vocab_size >= len(tokenizer) and cfg.vocab_size % 64 == 0
    assert (tiny_dir / "model.safetensors").is_file() and not list(tiny_dir.glob("*.bin"))
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == render(msgs, True)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]
    assert gen["pad_token_id"] == tok.pad_token_id
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model(**ids)
    assert out.logits.shape[-1] == cfg.vocab_size and torch.isfinite(out.logits).all()
