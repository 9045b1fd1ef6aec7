"""Ground-truth rules for the embedded Korean data: checked by code, independent of any reward model.

* Politeness (the main measure): the response ends with ``습니다.`` or ``요.``, at least half of its letters are
  Hangul, and the model stopped on its own (the response ended with ``<end_of_turn>``).
* Arithmetic (a second, harder measure): for a prompt ``a 더하기 b는?`` (or ``b은?``) the response states ``a + b``.
"""

from __future__ import annotations

import re

POLITE_ENDINGS = ("습니다.", "요.")
_ARITH_PROMPT = re.compile(r"^(\d+) 더하기 (\d+)[은는]\?$")
_NUMBER = re.compile(r"\d+")


def is_hangul(ch: str) -> bool:
    return "\uac00" <= ch <= "\ud7a3" or "\u3131" <= ch <= "\u318e"


def hangul_ratio(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 0.0
    return sum(is_hangul(c) for c in letters) / len(letters)


def is_polite_korean(response: str, stopped: bool = True) -> bool:
    """True when ``response`` is polite Korean by the rule above (``stopped``: it ended with <end_of_turn>)."""
    text = response.strip()
    return stopped and text.endswith(POLITE_ENDINGS) and hangul_ratio(text) >= 0.5


def arithmetic_answer(prompt: str) -> int | None:
    """The correct answer of an arithmetic prompt, or None when the prompt is not one."""
    m = _ARITH_PROMPT.match(prompt.strip())
    return int(m.group(1)) + int(m.group(2)) if m else None


def is_arithmetic_correct(prompt: str, response: str, stopped: bool = True) -> bool:
    """True when the first number in the response is the sum asked for (and the model stopped)."""
    answer = arithmetic_answer(prompt)
    found = _NUMBER.search(response)
    return stopped and answer is not None and found is not None and int(found.group()) == answer
