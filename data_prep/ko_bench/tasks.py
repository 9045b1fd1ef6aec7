"""What the benchmark's task files (``ko_bench_*.yaml``) call: the items from the JSONL files beside this file, and
the short answers' scoring. Both work from any working directory, and a copy of the folder reads its own files (the
paths are this file's own)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
_NUMBER = re.compile(r"-?\d+")
_WORD_END = re.compile(r"[\s.,!?。·:;\"'()\[\]]+")
# Endings a one-word Korean answer may carry after the word itself ("사과입니다.", "비예요", "바나나요").
ENDINGS = ("입니다", "이에요", "예요", "이요", "요", "이다", "다", "은", "는", "이", "가", "을", "를")


def _load(files: dict[str, str], **_: Any) -> Any:
    import datasets

    return datasets.load_dataset("json", data_files={k: str(HERE / v) for k, v in files.items()})


def load_mc(**kwargs: Any) -> Any:
    """The multiple-choice items: ``test`` (240) and ``dev`` (the few-shot examples)."""
    return _load({"test": "mc.jsonl", "dev": "dev_mc.jsonl"}, **kwargs)


def load_short(**kwargs: Any) -> Any:
    """The short-answer items: ``test`` (80) and ``dev``."""
    return _load({"test": "short.jsonl", "dev": "dev_short.jsonl"}, **kwargs)


def first_word(text: str) -> str:
    """The answer's first word, without punctuation around it."""
    words = [w for w in _WORD_END.split(text.strip()) if w]
    return words[0] if words else ""


def is_right(item: dict, response: str) -> bool:
    """A sum is right when the answer's first number is the sum; a word when the answer's first word is the word,
    alone or with a polite ending or particle ("바나나입니다." and "고양이요" are right, "비행기" is not "비")."""
    if item["kind"] == "arith":
        found = _NUMBER.search(response)
        return bool(found) and found.group() == item["answer"]
    word, answer = first_word(response), item["answer"]
    return word == answer or (word.startswith(answer) and word[len(answer) :] in ENDINGS)


def score_short(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval's ``process_results`` for the short answers: ``exact_match`` 1.0 or 0.0."""
    return {"exact_match": float(is_right(doc, results[0]))}
