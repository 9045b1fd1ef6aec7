"""Write the benchmark's items (deterministic; the files are committed).

    python -m data_prep.ko_bench.generate      # rewrites mc.jsonl, short.jsonl, dev_mc.jsonl, dev_short.jsonl

Every item is written here from templates over the demo data's 80 subjects (``data_prep.tiny_ko.generate``: 60
training nouns and 20 held-out ones) and over sums; none is taken from any dataset.

Multiple choice (``ko_bench_mc``: the choice the model finds most likely after the question):
* ``polite``: asked to answer in 존댓말, the polite sentence against the same sentence in casual speech (해체), in the
  plain written style (해라체), and in English (no choice is the start of another: a sentence cut short would be
  more likely than any whole one).
* ``josa``: the sentence with the particle its noun takes (은/는, 이/가, 을/를 by the final consonant) against the
  other one.
* ``arith``: the sum of two numbers among four near numbers.
* ``word``: the Korean word for an English one among four of the subjects.

Short answer (``ko_bench_short``: generated with the chat template, up to ``<end_of_turn>``):
* ``arith``: a sum, answered with a number; right when the answer's first number is the sum.
* ``word``: the Korean word for an English one; right when the answer's first word, without a polite ending or a
  particle, is that word.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from data_prep.ko_bench import BENCH_DIR
from data_prep.tiny_ko import DATA_DIR
from data_prep.tiny_ko.generate import HELDOUT_NOUNS, NOUNS, batchim, number_batchim, topic

SEED = 20261203
SUBJECTS = NOUNS + HELDOUT_NOUNS  # 80
DEV_SUBJECTS = [("포도", "grapes"), ("기린", "giraffes"), ("버섯", "mushrooms"), ("침대", "beds")]

# (polite, casual, plain written style, English predicate): the same statement in four forms.
FORMS = [
    ("좋은 점이 많습니다.", "좋은 점이 많아.", "좋은 점이 많다.", "there is a lot to like."),
    ("생활에 꼭 필요해요.", "생활에 꼭 필요해.", "생활에 꼭 필요하다.", "we need it every day."),
    (
        "누구나 쉽게 즐길 수 있습니다.",
        "누구나 쉽게 즐길 수 있어.",
        "누구나 쉽게 즐길 수 있다.",
        "anyone can enjoy it.",
    ),
    ("많은 사람이 좋아해요.", "많은 사람이 좋아해.", "많은 사람이 좋아한다.", "many people love it."),
]
# (particle with a final consonant, without one, the rest of the sentence, how the noun is placed)
PARTICLES = [
    ("은", "는", "{n}{p} 정말 유명해요."),
    ("이", "가", "여기에 {n}{p} 있어요."),
    ("을", "를", "저는 {n}{p} 자주 생각해요."),
]


def polite_item(i: int, n: str, e: str) -> dict:
    polite, casual, plain, english = FORMS[i % len(FORMS)]
    return {
        "kind": "polite",
        "question": f"다음 질문에 존댓말로 답하세요.\n질문: {topic(n)} 어떤가요?",
        "choices": [f"{topic(n)} {polite}", f"{topic(n)} {casual}", f"{topic(n)} {plain}", f"About {e}: {english}"],
        "answer": 0,
    }


def josa_item(i: int, n: str) -> dict:
    with_final, without_final, sentence = PARTICLES[i % len(PARTICLES)]
    right = with_final if batchim(n) else without_final
    wrong = without_final if right == with_final else with_final
    return {
        "kind": "josa",
        "question": "다음 중 맞춤법에 맞는 문장은?",
        "choices": [sentence.format(n=n, p=right), sentence.format(n=n, p=wrong)],
        "answer": 0,
    }


def trained_sums() -> set[tuple[int, int]]:
    """Every ``a 더하기 b`` pair the demo's data files ask (the benchmark asks none of them)."""
    pairs = set()
    for f in sorted(DATA_DIR.glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            pairs |= {(int(a), int(b)) for a, b in re.findall(r"(\d+) 더하기 (\d+)", line)}
    return pairs


TRAINED_SUMS = trained_sums()


def arith_numbers(rng: random.Random) -> tuple[int, int]:
    while True:
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        if (a, b) not in TRAINED_SUMS:
            return a, b


def arith_question(a: int, b: int) -> str:
    return f"{a} 더하기 {b}{'은' if number_batchim(b) else '는'} 얼마인가요?"


def arith_mc_item(rng: random.Random) -> dict:
    a, b = arith_numbers(rng)
    c = a + b
    choices = [c, *rng.sample([x for x in (c - 2, c - 1, c + 1, c + 2, c + 10, c - 10) if x > 0], 3)]
    return {"kind": "arith", "question": arith_question(a, b), "choices": [str(x) for x in choices], "answer": 0}


def word_mc_item(rng: random.Random, n: str, e: str, pool: list[tuple[str, str]]) -> dict:
    others = rng.sample([k for k, _ in pool if k != n], 3)
    return {"kind": "word", "question": f"영어 '{e}'를 한국어로 하면?", "choices": [n, *others], "answer": 0}


def shuffled(rng: random.Random, item: dict) -> dict:
    """The item with its choices in a random order (the answer index follows the right choice)."""
    order = list(range(len(item["choices"])))
    rng.shuffle(order)
    return {**item, "choices": [item["choices"][k] for k in order], "answer": order.index(item["answer"])}


def arith_short_item(rng: random.Random) -> dict:
    a, b = arith_numbers(rng)
    return {"kind": "arith", "question": f"{arith_question(a, b)} 숫자로만 답해 주세요.", "answer": str(a + b)}


def word_short_item(n: str, e: str) -> dict:
    return {"kind": "word", "question": f"영어 단어 '{e}'는 한국어로 무엇인가요? 한 단어로 답해 주세요.", "answer": n}


def build() -> dict[str, list[dict]]:
    rng = random.Random(SEED)
    mc = [polite_item(i, n, e) for i, (n, e) in enumerate(SUBJECTS)]
    mc += [josa_item(i, n) for i, (n, _) in enumerate(SUBJECTS)]
    mc += [arith_mc_item(rng) for _ in range(40)]
    mc += [word_mc_item(rng, n, e, SUBJECTS) for n, e in SUBJECTS[0::2]]
    short = [arith_short_item(rng) for _ in range(40)] + [word_short_item(n, e) for n, e in SUBJECTS[1::2]]
    dev_mc = [polite_item(i, n, e) for i, (n, e) in enumerate(DEV_SUBJECTS)]
    dev_mc += [josa_item(i, n) for i, (n, _) in enumerate(DEV_SUBJECTS)]
    dev_mc += [arith_mc_item(rng) for _ in range(2)]
    dev_mc += [word_mc_item(rng, n, e, DEV_SUBJECTS) for n, e in DEV_SUBJECTS[:2]]
    dev_short = [arith_short_item(rng) for _ in range(3)] + [word_short_item(n, e) for n, e in DEV_SUBJECTS[:3]]
    # Items in a random order: ``eval.limit`` (the first N) then takes every kind.
    rng.shuffle(mc)
    rng.shuffle(short)
    return {
        "mc": [shuffled(rng, x) for x in mc],
        "short": short,
        "dev_mc": [shuffled(rng, x) for x in dev_mc],
        "dev_short": dev_short,
    }


def write(out_dir: Path = BENCH_DIR) -> dict[str, int]:
    counts = {}
    for name, rows in build().items():
        with open(out_dir / f"{name}.jsonl", "w", encoding="utf-8", newline="\n") as fh:
            for i, row in enumerate(rows):
                fh.write(json.dumps({"id": f"{name}-{i}", **row}, ensure_ascii=False) + "\n")
        counts[name] = len(rows)
    return counts


if __name__ == "__main__":
    print(write())
