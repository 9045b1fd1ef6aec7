"""Shared fixtures: the embedded tiny Gemma tokenizer, built offline, and helpers to write small recipes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    from pipeline.core.embedded import resolve_model_path

    return Path(resolve_model_path("embedded:tiny-gemma-ko"))


@pytest.fixture(scope="session")
def chain(tmp_path_factory):
    """A tiny run folder with data, SFT and reward model for the PPO tests (tests/ppo_chain.py)."""
    from tests.ppo_chain import build_chain

    return build_chain(tmp_path_factory.mktemp("ppo"))


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    from pipeline.core.config import ModelConfig
    from pipeline.core.loading import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=str(tiny_dir)))


@pytest.fixture()
def encoder(tokenizer):
    from data_prep.gemma_format import GemmaEncoder

    return GemmaEncoder(tokenizer)


def files_naming(folder: Path, root: str) -> list[str]:
    """Files under ``folder`` (relative, posix) whose text, or safetensors header, contains ``root``: the check that
    nothing a checkpoint or an export carries names a local folder."""
    from pipeline.core.notices import read_safetensors_metadata

    hits = []
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            blob = (
                json.dumps(read_safetensors_metadata(f))
                if f.suffix == ".safetensors"
                else f.read_text("utf-8", "replace")
            )
            if root in blob:
                hits.append(f.relative_to(folder).as_posix())
    return hits


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return path


def write_recipe(tmp_path: Path, data: dict, name: str = "t", extra: dict | None = None) -> Path:
    """A recipe on the embedded model with the given data section, writing runs under tmp_path."""
    import yaml

    recipe = {
        "run": {"name": name, "output_dir": str(tmp_path / "runs")},
        "model": {"name_or_path": "embedded:tiny-gemma-ko"},
        "data": data,
        **(extra or {}),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    return path


def launch_command(stage: str, config: str, *args: str) -> list[str]:
    """``python -m pipeline.launch <stage>`` on the embedded recipe with 2 processes and an accelerate config."""
    import sys

    return [
        sys.executable,
        "-m",
        "pipeline.launch",
        stage,
        "--recipe",
        str(REPO / "recipes" / "tiny_ko.yaml"),
        "--num-processes",
        "2",
        "--config-file",
        f"configs/accelerate/{config}.yaml",
        *args,
    ]


def kill_and_resume(stage: str, out: Path, overrides: list[str], kill_at: int, final_step: int) -> None:
    """Run ``stage`` as a subprocess, SIGKILL it once checkpoint ``kill_at`` is complete, run the same command
    again and check it resumes and ends at ``final_step``; a third run must skip the finished stage. The same
    command, uninterrupted, on a copy of the run folder must log the same losses and end with identical weights
    (same data position and RNG streams after the resume)."""
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        f"pipeline.{stage}",
        "--recipe",
        str(REPO / "recipes" / "tiny_ko.yaml"),
        f"run.output_dir={out}",
        "tracking.mode=disabled",
        *overrides,
    ]
    ckpts = out / "tiny_ko" / stage / "checkpoints"
    ref = out.parent / f"{out.name}-uninterrupted"
    shutil.copytree(out / "tiny_ko", ref / "tiny_ko")  # the inputs: data (and the SFT model for the RM)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (ckpts / f"checkpoint-{kill_at}" / "COMPLETE").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before the checkpoint to kill at"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "tiny_ko" / stage / "final").exists()
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming from" in second.stdout
    state = json.loads((ckpts / f"checkpoint-{final_step}" / "trainer_state.json").read_text())
    assert state["global_step"] == final_step
    lineage = json.loads((out / "tiny_ko" / stage / "final" / "lineage.json").read_text())
    assert lineage["metrics"]["steps"] == final_step
    third = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0 and "already finished" in third.stdout

    plain = subprocess.run(
        [a.replace(f"run.output_dir={out}", f"run.output_dir={ref}") for a in cmd],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert plain.returncode == 0, plain.stderr[-3000:]

    def history(root: Path) -> list:
        state = json.loads(
            (root / "tiny_ko" / stage / "checkpoints" / f"checkpoint-{final_step}" / "trainer_state.json").read_text()
        )
        return [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h]

    assert history(out) == history(ref) and len(history(out)) > 1
    resumed = load_file(out / "tiny_ko" / stage / "final" / "model.safetensors")
    uninterrupted = load_file(ref / "tiny_ko" / stage / "final" / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert all(bool((resumed[k] == uninterrupted[k]).all()) for k in resumed), "resumed weights differ"
