"""The toy chain's numbers, recorded: a change to the stages' code that is meant to keep their behaviour (a refactor)
must keep every logged loss and every trained weight.

Catches: a refactor of SFT, RM, DPO or PPO that changes what they train (a dropped trainer argument, a different
default, a reordered seed, a lost LoRA merge) while every behavioural test still passes within its tolerance.

The recorded values are ``tests/golden/toy_chain.json``. A change that is meant to alter training rewrites them
(``GOLDEN_UPDATE=1 pytest tests/test_golden.py``) and says so in its commit.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest

from tests.helpers.chain import chain_recipe

GOLDEN = Path(__file__).parent / "golden" / "toy_chain.json"
DPO = ["dpo.max_steps=3", "dpo.save_steps=3", "dpo.eval_steps=100", "dpo.logging_steps=1"]
DPO_LORA = ["dpo.method=lora", "dpo.lora.r=4", "dpo.max_steps=2", "dpo.save_steps=2", "dpo.eval_steps=100"]
PPO = ["ppo.total_episodes=64", "ppo.panel_every=0"]  # two updates of 32 rollouts
# What differs between two identical runs: wall-clock time and rates, and where the run lives.
UNSTABLE = re.compile(r"second|time|per_second|_sec|eta|tokens_per|elapsed|date|path")
RTOL, ATOL = 1e-4, 1e-6  # the suite trains on a fixed thread count (tests/conftest.py); a behavioural change moves
# these numbers far more than the ~1e-6 left between two runs


def weight_digest(folder: Path) -> dict[str, list[float]]:
    """Every tensor of every safetensors file under ``folder``: its sum and its sum of absolute values (float64)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        for name, t in load_file(f).items():
            t = t.double()
            out[f"{f.relative_to(folder).as_posix()}:{name}"] = [t.sum().item(), t.abs().sum().item()]
    return out


def numbers(row: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in row.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not UNSTABLE.search(k)
    }


def trainer_losses(ckpt: Path) -> dict[str, float]:
    from pipeline.core.rundir import lineage_metrics

    return numbers(lineage_metrics(ckpt))


def ppo_log(run: Path) -> list[dict[str, float]]:
    rows = [json.loads(x) for x in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    return [numbers(r) for r in rows]


def mismatches(observed, golden, where: str = "") -> list[str]:
    """Every place ``observed`` differs from ``golden`` (keys, lengths, or numbers beyond RTOL/ATOL)."""
    if isinstance(golden, dict):
        if not isinstance(observed, dict) or set(observed) != set(golden):
            extra = sorted(set(observed) ^ set(golden)) if isinstance(observed, dict) else "not a dict"
            return [f"{where}: keys differ ({extra})"]
        return [m for k in golden for m in mismatches(observed[k], golden[k], f"{where}/{k}")]
    if isinstance(golden, list):
        if not isinstance(observed, list) or len(observed) != len(golden):
            return [f"{where}: {len(observed)} entries, recorded {len(golden)}"]
        return [m for i, (o, g) in enumerate(zip(observed, golden)) for m in mismatches(o, g, f"{where}[{i}]")]
    if not math.isclose(observed, golden, rel_tol=RTOL, abs_tol=ATOL):
        return [f"{where}: {observed!r}, recorded {golden!r}"]
    return []


def _copy(chain: Path, out: Path, parts: tuple[str, ...]) -> Path:
    for part in parts:
        shutil.copytree(chain / "tiny_ko" / part, out / "tiny_ko" / part)
    return out


def _dpo(chain: Path, out: Path, *overrides: str) -> Path:
    from pipeline import dpo

    _copy(chain, out, ("data", "sft/final"))
    return dpo.run(chain_recipe(out, *overrides))


@pytest.fixture(scope="module")
def observed(chain, tmp_path_factory) -> dict:
    from pipeline import ppo

    run = chain / "tiny_ko"
    dpo_full = _dpo(chain, tmp_path_factory.mktemp("dpo"), *DPO)
    dpo_lora = _dpo(chain, tmp_path_factory.mktemp("dpo_lora"), *DPO_LORA)
    ppo_out = _copy(chain, tmp_path_factory.mktemp("ppo"), ("data", "sft/final", "rm/final"))
    ppo_final = ppo.run(chain_recipe(ppo_out, *PPO))
    return {
        "sft": {"metrics": trainer_losses(run / "sft" / "final"), "weights": weight_digest(run / "sft" / "final")},
        "rm": {
            "metrics": trainer_losses(run / "rm" / "final"),
            "weights": weight_digest(run / "rm" / "final"),
            "reward_stats": numbers(json.loads((run / "rm" / "final" / "reward_stats.json").read_text())),
        },
        "dpo": {"metrics": trainer_losses(dpo_full), "weights": weight_digest(dpo_full)},
        "dpo_lora": {"metrics": trainer_losses(dpo_lora), "weights": weight_digest(dpo_lora)},
        "ppo": {"log": ppo_log(ppo_out / "tiny_ko"), "weights": weight_digest(ppo_final)},
    }


@pytest.mark.slow
def test_the_toy_chain_trains_what_it_trained_before(observed):
    if os.environ.get("GOLDEN_UPDATE") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(observed, indent=1, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert golden["sft"]["weights"] and golden["ppo"]["log"], "nothing recorded to compare with"
    bad = mismatches(observed, golden)
    assert not bad, "\n".join(bad[:20])


@pytest.mark.slow
def test_negative_control_a_small_change_in_training_is_reported(chain, observed, tmp_path):
    """DPO with beta 0.33 instead of 0.3 for the same three steps: the comparison must see it (the tolerance is
    narrower than the smallest change a refactor could make)."""
    golden = json.loads(GOLDEN.read_text())
    changed = _dpo(chain, tmp_path, *DPO, "dpo.beta=0.33")
    bad = mismatches({"metrics": trainer_losses(changed), "weights": weight_digest(changed)}, golden["dpo"])
    assert any("/metrics/" in m for m in bad) and any("/weights/" in m for m in bad), bad
    nudged = json.loads(json.dumps(observed["sft"]["weights"]))
    name = next(iter(nudged))
    nudged[name][1] *= 1 + 10 * RTOL
    assert mismatches(nudged, golden["sft"]["weights"]) == [
        f"/{name}[1]: {nudged[name][1]!r}, recorded {golden['sft']['weights'][name][1]!r}"
    ]
