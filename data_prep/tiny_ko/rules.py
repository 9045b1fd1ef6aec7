"""Ground-truth rules for the embedded Korean data: checked by code, independent of any reward model.

* Politeness (the main measure): the response ends with ``습니다.`` or ``요.``, at least half of its letters are
  Hangul, and the model stopped on its own (the response ended with ``<end_of_turn>``).
* Arithmetic (a second, harder measure): for a prompt ``a 더하기 b는?`` (or ``b은?``) the response states ``a + b``.
* On topic (needs the prompt): the response names the prompt's subject, the noun the question asks about
  (``사과는 무엇인가요?`` asks about 사과). ``is_polite_and_on_topic`` is the conjunction: the rule the real-model
  demo reports, which a reward model cannot satisfy by learning style alone.

Each rule is also a reward function (``polite_reward``, ``polite_on_topic_reward``, ``arithmetic_reward``) that a
recipe names in ``ppo.reward_functions``: the report judges with the same logic GRPO then optimises.
"""

from __future__ import annotations

import re

POLITE_ENDINGS = ("습니다.", "요.")
_ARITH_PROMPT = re.compile(r"^(\d+) 더하기 (\d+)[은는]\?$")
_NUMBER = re.compile(r"\d+")
# The question templates of the generated data (generate.QUESTIONS), each with the subject as its first group.
_SUBJECT = [
    re.compile(r"^(.+?)[은는] 무엇인가요\?$"),
    re.compile(r"^(.+?)에 대해 알려 주세요\.$"),
    re.compile(r"^(.+?)의 좋은 점은 뭐야\?$"),
    re.compile(r"^(.+?)[을를] 한 문장으로 설명해 줘\.$"),
]


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


def prompt_subject(prompt: str) -> str | None:
    """The noun a generated question asks about, or None when the prompt is not one of the question templates."""
    for pattern in _SUBJECT:
        m = pattern.match(prompt.strip())
        if m:
            return m.group(1)
    return None


def is_on_topic(prompt: str, response: str, stopped: bool = True) -> bool:
    """True when the response names the prompt's subject (and the model stopped)."""
    subject = prompt_subject(prompt)
    return stopped and subject is not None and subject in response


def is_polite_and_on_topic(prompt: str, response: str, stopped: bool = True) -> bool:
    """Polite Korean (``is_polite_korean``) and on topic (``is_on_topic``)."""
    return is_polite_korean(response, stopped) and is_on_topic(prompt, response, stopped)


# Reward functions (``ppo.reward_functions``, pipeline/core/rewards.py): the rules above, 1.0 where an answer passes
# and 0.0 where it fails, for GRPO/RLOO/PPO with a verifiable reward instead of, or beside, a reward model.


def polite_reward(prompts: list[str], responses: list[str], ended: list[bool], **columns) -> list[float]:
    """1.0 for polite Korean that ended its turn (``is_polite_korean``), else 0.0."""
    return [float(is_polite_korean(r, e)) for r, e in zip(responses, ended)]


def polite_on_topic_reward(prompts: list[str], responses: list[str], ended: list[bool], **columns) -> list[float]:
    """1.0 for polite Korean naming the question's subject that ended its turn (``is_polite_and_on_topic``)."""
    return [float(is_polite_and_on_topic(p, r, e)) for p, r, e in zip(prompts, responses, ended)]


def arithmetic_reward(prompts: list[str], responses: list[str], ended: list[bool], **columns) -> list[float]:
    """1.0 when the first number of an answer that ended its turn is the sum asked for (``is_arithmetic_correct``).
    A row with an ``answer`` column is checked against that instead, so any question with a numeric answer works."""
    answers = columns.get("answer") or [None] * len(prompts)
    out = []
    for p, r, e, a in zip(prompts, responses, ended, answers):
        if a is None:
            out.append(float(is_arithmetic_correct(p, r, e)))
        else:
            found = _NUMBER.search(r)
            out.append(float(e and found is not None and int(found.group()) == int(a)))
    return out
