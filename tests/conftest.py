"""Shared fixtures: the embedded tiny Gemma tokenizer, built offline, and the tiny chain the PPO tests start from.
Helpers that are not fixtures live in ``tests/helpers/``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    """The same thread count on every machine (``SUITE_THREADS``)."""
    import torch

    from tests.helpers import SUITE_THREADS

    torch.set_num_threads(SUITE_THREADS)


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    from pipeline.core.embedded import resolve_model_path

    return Path(resolve_model_path("embedded:tiny-gemma-ko"))


@pytest.fixture(scope="session")
def chain(tmp_path_factory):
    """A tiny run folder with data, SFT and reward model for the PPO tests (tests/helpers/chain.py).

    ``TEST_CHAIN_DIR`` (the inner loop only: CI and ``make test`` never set it) keeps the chain in that folder and
    reuses it while its code has not changed: a chain built from other code is built again."""
    from tests.helpers.chain import build_chain, reusable_chain

    if kept := os.environ.get("TEST_CHAIN_DIR"):
        return reusable_chain(Path(kept))
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


@pytest.fixture()
def fresh_accelerator_state():
    """accelerate keeps one process-wide state; a stage with another mixed precision needs a fresh one (a stage
    normally runs in its own process)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
