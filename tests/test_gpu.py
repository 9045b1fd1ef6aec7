"""The GPU tier (`make test-gpu`): what only a CUDA machine can show, on the real Gemma 3 270M at tiny sizes under
``run.precision=bf16``. One process (single.yaml) runs data, SFT, the reward model and PPO; DeepSpeed ZeRO-2 on every
GPU of the machine (NCCL when there are two or more) runs PPO from the same checkpoints. Checked: every model's
weights stay fp32 (bf16 is autocast compute), the first update's KL is exactly 0 (the policy and the reference run
one function), the sampler's log-probs agree with the forward within docs/ppo.md's figures (CUDA bf16 kernels),
every final carries its notices, and the saved policy stops at ``<end_of_turn>`` under ``model.generate``.

Without CUDA every test here is skipped with that reason; `make test` deselects the tier (``-m "not gpu"``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.core.notices import missing_notices
from tests.helpers import REPO

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU tier runs where one is"),
]

RECIPE = REPO / "recipes" / "gemma3_270m_ko.yaml"
SMALL = [
    "run.precision=bf16",
    "tracking.mode=disabled",
    "sft.method=full",
    "sft.max_steps=2",
    "sft.per_device_train_batch_size=2",
    "sft.save_steps=2",
    "sft.eval_steps=2",
    "sft.prompt_panel=[]",
    "rm.method=full",
    "rm.max_steps=2",
    "rm.per_device_train_batch_size=2",
    "rm.save_steps=2",
    "rm.eval_steps=2",
    "rm.min_accuracy=0.0",
    "ppo.method=full",
    "ppo.total_episodes=8",
    "ppo.per_device_train_batch_size=2",
    "ppo.gradient_accumulation_steps=2",
    "ppo.num_ppo_epochs=1",
    "ppo.response_length=16",
    "ppo.panel_every=0",
]
EOT = 106  # Gemma's <end_of_turn>


def _launch(stage: str, out: Path, config: str, processes: int, *extra: str) -> str:
    cmd = [sys.executable, "-m", "pipeline.launch", stage, "--recipe", str(RECIPE), "--config-file"]
    cmd += [f"configs/accelerate/{config}.yaml", "--num-processes", str(processes), f"run.output_dir={out}"]
    res = subprocess.run(
        [*cmd, *SMALL, *extra],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    out_text = res.stdout + res.stderr
    assert res.returncode == 0, out_text[-4000:]
    return out_text


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    from pipeline.data import main as data_main

    out = tmp_path_factory.mktemp("gpu")
    assert data_main(["--recipe", str(RECIPE), f"run.output_dir={out}"]) == 0
    logs = {stage: _launch(stage, out, "single", 1) for stage in ("sft", "rm", "ppo")}
    return out, logs


def _first_kl(run: Path) -> float:
    return json.loads((run / "ppo" / "metrics.jsonl").read_text().splitlines()[0])["objective/kl"]


def test_one_gpu_chain_in_bf16_keeps_fp32_weights_and_a_first_kl_of_zero(chain):
    out, logs = chain
    run = out / "gemma3_270m_ko"
    assert "[ppo] 1 process(es)" in logs["ppo"] and "; bf16;" in logs["ppo"], logs["ppo"][-3000:]
    assert "weights: policy fp32, value fp32, reference fp32, reward model fp32" in logs["ppo"]
    assert _first_kl(run) == 0.0
    for stage in ("sft", "rm", "ppo"):
        assert missing_notices(run / stage / "final") == [], stage


@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="no CUDA device")
def test_zero2_on_every_gpu_keeps_the_frozen_models_fp32(chain):
    """DeepSpeed ZeRO-2 over every GPU of the machine (NCCL from two on): the frozen models stay fp32 under DeepSpeed
    bf16 and the first KL is exactly 0."""
    import shutil

    out, _ = chain
    zero = out.parent / f"{out.name}-zero2"
    for part in ("data", "sft", "rm"):
        shutil.copytree(out / "gemma3_270m_ko" / part, zero / "gemma3_270m_ko" / part)
    gpus = torch.cuda.device_count()
    log = _launch("ppo", zero, "zero2", gpus)
    assert f"[ppo] {gpus} process(es), DeepSpeed ZeRO-2" in log and "; bf16;" in log, log[-3000:]
    assert "weights: policy fp32, value fp32, reference fp32, reward model fp32" in log
    assert _first_kl(zero / "gemma3_270m_ko") == 0.0
    assert missing_notices(zero / "gemma3_270m_ko" / "ppo" / "final") == []


def test_the_sampler_agrees_with_the_forward_on_cuda(chain):
    """The sampler's log-probs against a full forward of the same responses, on CUDA: fp32 within docs/ppo.md's 4e-5
    (allowing TF32-free CUDA kernels a little more: 1e-3 at most), bf16 within its 0.017 per token on average (0.05)
    and 0.15 at most (0.3)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_prep.gemma_format import GemmaEncoder, stop_token_ids
    from pipeline.core import ppo_math as pm
    from pipeline.core.policy import response_logprobs
    from pipeline.core.sampling import generate, left_pad

    out, _ = chain
    final = out / "gemma3_270m_ko" / "sft" / "final"
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).cuda().eval()
    enc = GemmaEncoder(tok)
    prompts = [
        enc.encode([{"role": "user", "content": q}], add_generation_prompt=True).input_ids
        for q in ("사과는 무엇인가요?", "녹차에 대해 알려 주세요.", "3 더하기 4는?", "라면의 좋은 점은 뭐야?")
    ]
    torch.manual_seed(0)
    for bf16, mean_tol, max_tol in ((False, 1e-3, 1e-3), (True, 0.05, 0.3)):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16), torch.no_grad():
            g = generate(
                model,
                left_pad(prompts, tok.pad_token_id, torch.device("cuda")),
                pad_id=tok.pad_token_id,
                stop_ids=stop_token_ids(tok),
                max_new_tokens=24,
                temperature=0.7,
            )
            seq, mask, pos = g.inputs()
            keep = pm.valid_mask(g.seq_len, g.responses.size(1))
            forward, _ = response_logprobs(model, seq, mask, pos, g.responses, 0.7, valid=keep)
        diff = (g.logprobs - forward).abs()[keep]
        assert diff.mean() < mean_tol and diff.max() < max_tol, (bf16, float(diff.mean()), float(diff.max()))


def test_the_saved_policy_stops_at_end_of_turn_under_generate(chain):
    """The PPO policy as users load it: ``model.generate`` with its saved generation config ends at <end_of_turn>."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out, _ = chain
    final = out / "gemma3_270m_ko" / "ppo" / "final"
    assert EOT in GenerationConfig.from_pretrained(final).eos_token_id
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.bfloat16).cuda().eval()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "사과는 무엇인가요?"}], add_generation_prompt=True, return_dict=False
    )
    ids = torch.tensor([ids]).cuda()

    class ForceEndOfTurn:
        def __call__(self, input_ids, scores):
            if input_ids.size(1) >= ids.size(1) + 2:
                scores = torch.full_like(scores, float("-inf"))
                scores[:, EOT] = 0.0
            return scores

    gen = model.generate(ids, max_new_tokens=20, do_sample=False, logits_processor=[ForceEndOfTurn()])
    new = gen[0, ids.size(1) :].tolist()
    assert new[-1] == EOT and len(new) == 3, new
