"""The shipped Korean data of the embedded default (``generate.py`` writes it; ``rules.py`` is its ground truth)."""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
