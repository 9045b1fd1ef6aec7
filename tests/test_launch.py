"""Stages under `accelerate launch` with 2 CPU processes (gloo): DDP, DeepSpeed ZeRO-2 and ZeRO-3, through the
same launcher and configs as `make sft` (the configs are GPU-style; the stage selects gloo on a CPU machine)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from data_prep.build import main as data_main
from pipeline.notices import missing_notices
from tests.conftest import REPO

RECIPE = REPO / "recipes" / "tiny_ko.yaml"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    out = tmp_path_factory.mktemp("launch")
    assert data_main(["--recipe", str(RECIPE), f"run.output_dir={out}"]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("config, kind", [("ddp", "MULTI_CPU"), ("zero2", "DeepSpeed ZeRO-2"),
                                          ("zero3", "DeepSpeed ZeRO-3")])
def test_sft_two_processes(data_root, tiny_dir, config, kind):
    run = f"launch_{config}"
    cmd = [sys.executable, "-m", "pipeline.launch", "sft", "--recipe", str(RECIPE), "--num-processes", "2",
           "--config-file", f"configs/accelerate/{config}.yaml", f"run.output_dir={data_root}", f"run.name={run}",
           "sft.max_steps=6", "sft.save_steps=3", "sft.eval_steps=3", "sft.logging_steps=1", "tracking.mode=disabled"]
    # The data stage output is shared: copy it under this run's name.
    import shutil

    shutil.copytree(data_root / "tiny_ko" / "data", data_root / run / "data", dirs_exist_ok=True)
    res = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
                         timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert f"[sft] 2 process(es), {kind}" in out, out[-4000:]
    final = data_root / run / "sft" / "final"
    assert missing_notices(final) == []
    for ckpt in (final, data_root / run / "sft" / "checkpoints" / "checkpoint-3"):
        assert missing_notices(ckpt) == [], ckpt
    # A full, consolidated checkpoint (under ZeRO-3 too): every tensor has the base model's shape.
    base, saved = load_file(tiny_dir / "model.safetensors"), load_file(final / "model.safetensors")
    assert {k: v.shape for k, v in base.items()} == {k: v.shape for k, v in saved.items() if k in base}
    assert set(base) <= set(saved)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(final)
