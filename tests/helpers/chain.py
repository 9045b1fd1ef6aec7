"""The tiny chain PPO tests start from (data, SFT, reward model; built once per session by the ``chain`` fixture in
tests/conftest.py), and helpers to run PPO or build its models on it."""

from __future__ import annotations

import json
import shutil

import torch

from pipeline.core.config import load_recipe
from tests.helpers import REPO, SUITE_THREADS

RECIPE = REPO / "recipes" / "tiny_ko.yaml"
BASE = ["sft.max_steps=300", "sft.eval_steps=1000", "sft.save_steps=1000", "tracking.mode=disabled"]


def chain_recipe(out, *overrides):
    """The embedded recipe at the chain's settings, writing runs under ``out``, with ``overrides`` applied last."""
    return load_recipe(RECIPE, [f"run.output_dir={out}", *BASE, *overrides])


def build_chain(out):
    """Data, SFT and the reward model of the embedded recipe under ``out``, in this process."""
    from pipeline import rm, sft
    from pipeline.data import main as data_main

    assert data_main(["--recipe", str(RECIPE), f"run.output_dir={out}"]) == 0
    recipe = chain_recipe(out)
    sft.run(recipe)
    rm.run(recipe)
    return out


# What the chain is built from: a kept chain (TEST_CHAIN_DIR) is reused only while these are unchanged.
CHAIN_SOURCES = (
    "recipes/tiny_ko.yaml",
    "tests/helpers/chain.py",
    "pipeline/data.py",
    "pipeline/sft.py",
    "pipeline/rm.py",
    "pipeline/core/trainer_stage.py",
    "pipeline/core/loading.py",
    "pipeline/core/embedded.py",
    "data_prep",
)


def chain_key() -> str:
    """A digest of the chain's sources (``CHAIN_SOURCES``)."""
    import hashlib

    h = hashlib.sha256(f"threads={SUITE_THREADS}".encode())
    for name in CHAIN_SOURCES:
        path = REPO / name
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def reusable_chain(root):
    """The chain under ``root/<key>``, built there first unless a complete chain of the same sources is there (a
    marker written last says it is complete; paths recorded inside the checkpoints stay true)."""
    done = root / chain_key()
    marker = done / ".complete"
    if not marker.exists():
        shutil.rmtree(done, ignore_errors=True)
        done.mkdir(parents=True)
        build_chain(done)
        marker.touch()
    return done


def fresh_run(chain, tmp_path):
    """A run folder with the chain's data, SFT and RM (so each test's PPO starts from scratch)."""
    for part in ("data", "sft/final", "rm/final"):
        shutil.copytree(chain / "tiny_ko" / part, tmp_path / "tiny_ko" / part)
    return tmp_path


def ppo_metrics(out) -> list[dict]:
    """The PPO stage's metrics.jsonl under ``out``, one dict per update."""
    lines = (out / "tiny_ko" / "ppo" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


def ppo_setup(chain, *overrides):
    """The PPO models as the stage builds them, in this process."""
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    from pipeline.ppo import build_setup

    recipe = chain_recipe(chain, *overrides)
    run = chain / "tiny_ko"
    tok = AutoTokenizer.from_pretrained(run / "data" / "tokenizer")
    value = run / "rm" / "final" if recipe.ppo.estimator == "gae" else None  # critic-free: no value model
    s, _ = build_setup(recipe, Accelerator(cpu=True), run / "sft" / "final", run / "rm" / "final", value, tok, 10)
    return s, tok


def rule_rate(model_dir, n=4) -> float:
    """The held-out polite rate of a model: the style prompts of data_prep/tiny_ko/heldout.jsonl, ``n`` samples each
    at temperature 1 (seed 0, at most 16 tokens, stopping at <end_of_turn>), checked by data_prep/tiny_ko/rules.py
    (independently of the reward model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_prep.tiny_ko.rules import is_polite_korean

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    held = [json.loads(x) for x in (REPO / "data_prep/tiny_ko/heldout.jsonl").open()]
    torch.manual_seed(0)
    ok = []
    for h in (h for h in held if h["kind"] == "style"):
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": h["prompt"]}], add_generation_prompt=True, return_dict=False
        )
        x = torch.tensor([prompt] * n)
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=16,
            eos_token_id=eot,
            pad_token_id=tok.pad_token_id,
        )
        for row in out[:, x.size(1) :].tolist():
            stopped = eot in row
            text = tok.decode(row[: row.index(eot)] if stopped else row, skip_special_tokens=True)
            ok.append(is_polite_korean(text, stopped))
    return sum(ok) / len(ok)
