"""Pure measures of Korean answers: how much of an answer is Hangul, whether a Korean answer switches script, how
much it repeats itself, and these with the stop rate and length averaged over a batch of answers.

They describe the text, not its quality: a fluent wrong answer scores as well as a right one. PPO logs them every
update and the report shows them for the SFT and PPO models, so a drift the reward model rewards (English creeping
in, a phrase looping) is visible without reading samples.

Definitions (the text is NFC-normalised first, so a syllable spelled as decomposed jamo counts once):

- a *letter* is a character of Unicode general category L* (Lu, Ll, Lt, Lm, Lo); whitespace, digits, punctuation,
  symbols and combining marks are not letters;
- a *Hangul letter* is a letter in a Hangul block: Jamo (U+1100-11FF), Compatibility Jamo (U+3130-318F), Jamo
  Extended-A (U+A960-A97F), Syllables (U+AC00-D7A3), Jamo Extended-B (U+D7B0-D7FF), Halfwidth (U+FFA0-FFDC).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

HANGUL_RANGES = (
    (0x1100, 0x11FF),
    (0x3130, 0x318F),
    (0xA960, 0xA97F),
    (0xAC00, 0xD7A3),
    (0xD7B0, 0xD7FF),
    (0xFFA0, 0xFFDC),
)
REPETITION_N = 3
"""Repetition is measured on character trigrams: Korean answers of a few dozen tokens hold only a handful of words
(a word n-gram rarely has a second chance to repeat), while a looping syllable or phrase ("요요요요", "좋아요 좋아요")
repeats its trigrams at once."""

KEYS = ("korean/hangul_ratio", "korean/script_switch_rate", "korean/repetition", "korean/stop_rate", "korean/length")

_SPACE = re.compile(r"\s+")


def is_hangul(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in HANGUL_RANGES)


def _letters(text: str) -> list[str]:
    return [ch for ch in unicodedata.normalize("NFC", text) if unicodedata.category(ch).startswith("L")]


def hangul_ratio(text: str) -> float | None:
    """Hangul letters / all letters of ``text``; None when it has no letter at all (an answer of digits or
    punctuation only is neither Korean nor anything else)."""
    letters = _letters(text)
    if not letters:
        return None
    return sum(map(is_hangul, letters)) / len(letters)


def switches_script(text: str) -> bool | None:
    """Whether a Korean answer (one with at least one Hangul letter) also has a letter of another script: Latin,
    CJK ideographs (Hanja included), kana, Cyrillic, any letter that is not Hangul. None for an answer without
    Hangul: it did not switch away from Korean inside a Korean answer, it never wrote Korean (``hangul_ratio``
    shows that)."""
    letters = _letters(text)
    hangul = [is_hangul(ch) for ch in letters]
    if not any(hangul):
        return None
    return not all(hangul)


def repetition(text: str, n: int = REPETITION_N) -> float:
    """Share of repeated character n-grams: ``1 - distinct / total`` over the n-grams of ``text`` with every run of
    whitespace collapsed to one space and the ends stripped (spacing does not make a repeat new). 0.0 for text shorter
    than ``n`` characters: with fewer than two n-grams nothing can repeat."""
    s = _SPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()
    grams = [s[i : i + n] for i in range(len(s) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def korean_totals(answers: Iterable[tuple[str, bool, int]]) -> dict[str, tuple[float, int]]:
    """``(sum, count)`` per measure in ``KEYS`` over ``(text, stopped, length)`` answers (text before the stop token,
    whether the answer ended its turn, its length in tokens): the form that pools over processes by summing, so a
    process with fewer (or no) answers of a kind weighs less, not as much as the others. The count of
    ``korean/hangul_ratio`` is the answers with a letter, of ``korean/script_switch_rate`` the Korean answers (with
    Hangul), of the others every answer."""
    rows = list(answers)
    columns = {
        "korean/hangul_ratio": [hangul_ratio(t) for t, _, _ in rows],
        "korean/script_switch_rate": [switches_script(t) for t, _, _ in rows],
        "korean/repetition": [repetition(t) for t, _, _ in rows],
        "korean/stop_rate": [bool(s) for _, s, _ in rows],
        "korean/length": [int(n) for _, _, n in rows],
    }
    out = {}
    for key, values in columns.items():
        kept = [float(v) for v in values if v is not None]
        out[key] = (sum(kept), len(kept))
    return out


def korean_metrics(answers: Iterable[tuple[str, bool, int]]) -> dict[str, float | None]:
    """Means of ``korean_totals`` under the names in ``KEYS``:

    - ``korean/hangul_ratio``: mean ``hangul_ratio`` over the answers that have a letter;
    - ``korean/script_switch_rate``: share of the Korean answers (with Hangul) that also use another script;
    - ``korean/repetition``: mean ``repetition`` over every answer;
    - ``korean/stop_rate``: share of answers that ended their turn;
    - ``korean/length``: mean length in tokens.

    A mean over no answer (no answer with a letter, no Korean answer) is None: not 0.0, which would read as "no
    answer switches script" when no answer is Korean at all."""
    rows = list(answers)
    if not rows:
        raise ValueError("korean_metrics needs at least one answer")
    return {k: (total / n if n else None) for k, (total, n) in korean_totals(rows).items()}
