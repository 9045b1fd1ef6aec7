"""What the tests share besides fixtures (those are in ``tests/conftest.py``), one module per concern:

    chain          the tiny data -> SFT -> reward model chain the PPO, DPO, report and publish tests start from,
                   and helpers to run PPO or build its models on it
    launch         stages as subprocesses: ``python -m pipeline.launch`` with 2 processes, kill and resume
    recipes        small recipes and JSONL files written for one test
    checkpoints    what a checkpoint or an export holds: files naming a local folder, the share of weights changed
    fake_hub       a local HTTP server answering the Hugging Face Hub calls of ``pipeline.publish``
    wandb_offline  a W&B offline run read back without network

``REPO`` is the repository root, the folder every test runs its commands from.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent

# The CPU threads everything trained inside the test process uses (set by tests/conftest.py): a float sum depends on
# how it is split across threads, and after 300 SFT steps that moves weights by ~1e-4, past what tests/test_golden.py
# allows. Processes the tests launch get their threads from the launcher, as a user's do.
SUITE_THREADS = 2
