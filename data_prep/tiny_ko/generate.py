"""Generate the embedded Korean data shipped beside this file (deterministic; the files are committed).

    python -m data_prep.tiny_ko.generate          # rewrites sft.jsonl, preference.jsonl, prompts.jsonl, heldout.jsonl,
                                                  # the sums alone: arith_{prompts,heldout}.jsonl
                                                  # and the topic set: topic_{sft,preference,prompts,heldout}.jsonl

Design (what a tiny Gemma can learn on a CPU in minutes, and what a rule can check):
* Varied Korean questions about 60 everyday nouns (4 question templates each, 240 prompts); 40 are held out of
  every training file and used only for evaluation.
* SFT demonstrations answer about 60% in polite Korean (every one ends in ``습니다.`` or ``요.``), the rest in casual
  speech (반말) or English; about 15% carry a system prompt and about 10% are two-turn dialogues.
* Preference pairs put polite Korean over casual speech, English and malformed answers (truncated, missing the
  final period, repeated words, polite-then-English), with phrasings the SFT data never uses, so the reward model
  has to learn the property rather than a few templates.
* Arithmetic items ("3 더하기 4는?") with 40% wrong SFT answers and correct-over-wrong pairs: a second, harder
  measure (a tiny reward model does not generalise it to unseen problems).

The topic set (``topic_*.jsonl``, the real-model demo's data) asks for a rule that needs the prompt: polite Korean
*and* naming the question's subject (``rules.is_polite_and_on_topic``).
* The 60 nouns above train; 20 more (``HELDOUT_NOUNS``) appear only in held-out prompts, so no held-out subject is
  in any training file.
* SFT answers are polite and on topic about half the time; the rest are casual or English, or polite about another
  noun.
* Preference pairs put polite-and-on-topic answers over polite answers about another noun, over on-topic answers
  in casual speech or English, and over malformed ones: a reward model that reads only the style, or only the
  nouns, cannot rank them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from data_prep.tiny_ko import DATA_DIR
from data_prep.tiny_ko.rules import (
    arithmetic_answer,
    is_on_topic,
    is_polite_and_on_topic,
    is_polite_korean,
    prompt_subject,
)

SEED = 1234

NOUNS = [
    ("사과", "apples"),
    ("바나나", "bananas"),
    ("커피", "coffee"),
    ("녹차", "green tea"),
    ("김치", "kimchi"),
    ("비빔밥", "bibimbap"),
    ("불고기", "bulgogi"),
    ("떡볶이", "tteokbokki"),
    ("라면", "ramen"),
    ("우유", "milk"),
    ("빵", "bread"),
    ("치즈", "cheese"),
    ("자전거", "bicycles"),
    ("자동차", "cars"),
    ("기차", "trains"),
    ("비행기", "airplanes"),
    ("지하철", "the subway"),
    ("버스", "buses"),
    ("컴퓨터", "computers"),
    ("스마트폰", "smartphones"),
    ("카메라", "cameras"),
    ("시계", "watches"),
    ("책", "books"),
    ("연필", "pencils"),
    ("공책", "notebooks"),
    ("의자", "chairs"),
    ("책상", "desks"),
    ("창문", "windows"),
    ("우산", "umbrellas"),
    ("가방", "bags"),
    ("신발", "shoes"),
    ("모자", "hats"),
    ("고양이", "cats"),
    ("강아지", "puppies"),
    ("호랑이", "tigers"),
    ("토끼", "rabbits"),
    ("거북이", "turtles"),
    ("바다", "the sea"),
    ("산", "mountains"),
    ("강", "rivers"),
    ("하늘", "the sky"),
    ("구름", "clouds"),
    ("비", "rain"),
    ("눈", "snow"),
    ("바람", "wind"),
    ("태양", "the sun"),
    ("달", "the moon"),
    ("별", "stars"),
    ("음악", "music"),
    ("영화", "movies"),
    ("그림", "paintings"),
    ("축구", "soccer"),
    ("야구", "baseball"),
    ("수영", "swimming"),
    ("등산", "hiking"),
    ("요리", "cooking"),
    ("독서", "reading"),
    ("여행", "travel"),
    ("학교", "school"),
    ("도서관", "libraries"),
]


def batchim(word: str) -> bool:
    """True when the last Hangul syllable has a final consonant (chooses 은/는, 이/가, 을/를)."""
    last = word[-1]
    return "가" <= last <= "힣" and (ord(last) - 0xAC00) % 28 != 0


def josa(word: str, with_final: str, without_final: str) -> str:
    return word + (with_final if batchim(word) else without_final)


def topic(n: str) -> str:
    return josa(n, "은", "는")


def obj(n: str) -> str:
    return josa(n, "을", "를")


def subj(n: str) -> str:
    return josa(n, "이", "가")


QUESTIONS = [
    lambda n: f"{topic(n)} 무엇인가요?",
    lambda n: f"{n}에 대해 알려 주세요.",
    lambda n: f"{n}의 좋은 점은 뭐야?",
    lambda n: f"{obj(n)} 한 문장으로 설명해 줘.",
]

POLITE = [
    lambda n, e: f"{topic(n)} 정말 좋습니다.",
    lambda n, e: f"{topic(n)} 우리 생활에 도움이 많이 돼요.",
    lambda n, e: f"저는 {obj(n)} 아주 좋아해요.",
    lambda n, e: f"{topic(n)} 재미있고 쓸모가 있습니다.",
    lambda n, e: f"{topic(n)} 많은 사람들에게 인기가 많아요.",
    lambda n, e: f"{topic(n)} 누구에게나 소중하다고 믿습니다.",
    lambda n, e: f"{topic(n)} 정말 좋습니다. 한번 경험해 보세요.",
    lambda n, e: f"{n}에 대해 궁금한 점이 있으면 언제든지 물어보세요.",
]
CASUAL = [
    lambda n, e: f"{topic(n)} 정말 재미있어.",
    lambda n, e: f"나는 {obj(n)} 진짜 좋아해.",
    lambda n, e: f"{topic(n)} 꽤 쓸모 있어.",
    lambda n, e: f"{topic(n)} 다들 좋아하는 거야.",
    lambda n, e: f"{n}? 그냥 괜찮은 거야.",
]
ENGLISH = [
    lambda n, e: (
        f"{e[0].upper() + e[1:]} are really nice." if e.endswith("s") else f"{e[0].upper() + e[1:]} is really nice."
    ),
    lambda n, e: f"I like {e} a lot.",
    lambda n, e: f"Many people enjoy {e}.",
    lambda n, e: f"Let me tell you about {e}: it is an interesting topic.",
]
# Preference-only phrasings (never in SFT demonstrations): the reward model must learn the property.
POLITE_EXTRA = [
    lambda n, e: f"{topic(n)} 훌륭하다고 생각해요.",
    lambda n, e: f"{subj(n)} 있어서 참 다행입니다. 정말 고맙습니다.",
    lambda n, e: f"{obj(n)} 좋아하는 분들이 많습니다.",
    lambda n, e: f"제 생각에는 {topic(n)} 꼭 필요해요.",
]
CASUAL_EXTRA = [
    lambda n, e: f"{topic(n)} 별로야.",
    lambda n, e: f"{n} 얘기는 좀 어려워.",
    lambda n, e: f"몰라, {topic(n)} 그냥 그래.",
    lambda n, e: f"{subj(n)} 최고지!",
]
MALFORMED = [
    lambda n, e: f"{topic(n)} 정말 좋",  # truncated
    lambda n, e: f"{topic(n)} 정말 좋습니다",  # no final period
    lambda n, e: f"{n} {n} {n} {n} {n}",  # repeated words
    lambda n, e: f"{topic(n)} 정말 좋습니다. But I am not sure.",  # polite, then English
    lambda n, e: f"{topic(n)} {topic(n)} {topic(n)}",
    lambda n, e: f"{e} {n} good 요",
]
HELDOUT_NOUNS = [  # subjects of the topic set's held-out prompts only
    ("수박", "watermelons"),
    ("딸기", "strawberries"),
    ("만두", "dumplings"),
    ("냉면", "naengmyeon"),
    ("주스", "juice"),
    ("피아노", "pianos"),
    ("기타", "guitars"),
    ("배구", "volleyball"),
    ("농구", "basketball"),
    ("공원", "parks"),
    ("병원", "hospitals"),
    ("시장", "markets"),
    ("호수", "lakes"),
    ("나무", "trees"),
    ("꽃", "flowers"),
    ("사자", "lions"),
    ("코끼리", "elephants"),
    ("펭귄", "penguins"),
    ("안경", "glasses"),
    ("냉장고", "refrigerators"),
]
SYSTEM_PROMPTS = ["당신은 친절한 도우미입니다.", "질문에 짧게 답하세요.", "You are a helpful assistant."]

DIGIT_FINAL = {0: True, 1: True, 2: False, 3: True, 4: False, 5: False, 6: True, 7: True, 8: True, 9: False}


def number_batchim(x: int) -> bool:
    """Whether the Sino-Korean reading of ``x`` (0..99) ends in a consonant (십, 이십 ... end in ㅂ)."""
    return True if x % 10 == 0 and x else DIGIT_FINAL[x % 10]


def arith_polite(c: int) -> str:
    return f"정답은 {c}{'이에요' if number_batchim(c) else '예요'}."


def arith_casual(c: int) -> str:
    return f"답은 {c}{'이야' if number_batchim(c) else '야'}."


def arith_prompt(a: int, b: int) -> str:
    return f"{a} 더하기 {b}{'은' if number_batchim(b) else '는'}?"


def _wrong(rng: random.Random, c: int) -> int:
    return max(0, c + rng.choice([-3, -2, -1, 1, 2, 3])) if c > 3 else c + rng.choice([1, 2, 3])


def build() -> dict[str, list[dict]]:
    rng = random.Random(SEED)
    style_prompts = [(q(n), n, e) for n, e in NOUNS for q in QUESTIONS]
    order = list(range(len(style_prompts)))
    rng.shuffle(order)
    held = set(order[:40])
    train_style = [p for i, p in enumerate(style_prompts) if i not in held]
    held_style = [p for i, p in enumerate(style_prompts) if i in held]

    problems = [(a, b) for a in range(10) for b in range(10)]
    rng.shuffle(problems)
    held_arith, train_arith = problems[:20], problems[20:]

    def answer(style: str, n: str, e: str) -> str:
        bank = {"polite": POLITE, "casual": CASUAL, "english": ENGLISH}[style]
        return rng.choice(bank)(n, e)

    def pick_style() -> str:
        r = rng.random()
        return "polite" if r < 0.6 else ("casual" if r < 0.82 else "english")

    sft: list[dict] = []
    for prompt, n, e in train_style:
        for _ in range(5):
            msgs = []
            if rng.random() < 0.10:  # a two-turn dialogue: an earlier exchange about another training prompt
                p2, n2, e2 = rng.choice(train_style)
                msgs += [
                    {"role": "user", "content": p2},
                    {"role": "assistant", "content": answer(pick_style(), n2, e2)},
                ]
            msgs += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer(pick_style(), n, e)}]
            if rng.random() < 0.15:
                msgs.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
            sft.append({"messages": msgs})
    for a, b in train_arith:
        for _ in range(2):
            c = a + b if rng.random() >= 0.4 else _wrong(rng, a + b)
            sft.append(
                {
                    "messages": [
                        {"role": "user", "content": arith_prompt(a, b)},
                        {"role": "assistant", "content": arith_polite(c)},
                    ]
                }
            )
    rng.shuffle(sft)

    preference: list[dict] = []
    for prompt, n, e in train_style:
        rejected_kinds = ["casual", "casual", "english", "malformed", "malformed"]
        for kind in rejected_kinds:
            chosen = rng.choice(POLITE + POLITE_EXTRA)(n, e)
            bank = {"casual": CASUAL + CASUAL_EXTRA, "english": ENGLISH, "malformed": MALFORMED}[kind]
            preference.append({"prompt": prompt, "chosen": chosen, "rejected": rng.choice(bank)(n, e)})
    for a, b in train_arith:
        c = a + b
        preference.append(
            {"prompt": arith_prompt(a, b), "chosen": arith_polite(c), "rejected": arith_polite(_wrong(rng, c))}
        )
        bad = rng.choice([f"정답은 {c}", arith_casual(c), f"{c} {c} {c} {c}", "정답은"])
        preference.append({"prompt": arith_prompt(a, b), "chosen": arith_polite(c), "rejected": bad})
    rng.shuffle(preference)

    prompts = [{"prompt": p} for p, _, _ in train_style] + [{"prompt": arith_prompt(a, b)} for a, b in train_arith]
    rng.shuffle(prompts)
    heldout = [{"prompt": p, "kind": "style"} for p, _, _ in held_style]
    heldout += [{"prompt": arith_prompt(a, b), "kind": "arithmetic", "answer": a + b} for a, b in held_arith]

    _check(sft, preference, prompts, heldout)
    # The sums alone, with their answers: prompts for a run rewarded by the arithmetic check (the same 80 training and
    # 20 held-out problems as above, in the same order).
    arith_prompts = [{"prompt": arith_prompt(a, b), "answer": a + b} for a, b in train_arith]
    arith_heldout = [r for r in heldout if r["kind"] == "arithmetic"]
    return {
        "sft": sft,
        "preference": preference,
        "prompts": prompts,
        "heldout": heldout,
        "arith_prompts": arith_prompts,
        "arith_heldout": arith_heldout,
    }


def _check(sft: list[dict], preference: list[dict], prompts: list[dict], heldout: list[dict]) -> None:
    for pair in preference:
        assert is_polite_korean(pair["chosen"]) or arithmetic_answer(pair["prompt"]) is not None, pair
        if arithmetic_answer(pair["prompt"]) is None:
            assert not is_polite_korean(pair["rejected"]), pair
    held = {h["prompt"] for h in heldout}
    train_texts = {m["content"] for row in sft for m in row["messages"]}
    train_texts |= {p["prompt"] for p in preference} | {p["prompt"] for p in prompts}
    assert not held & train_texts, "held-out prompts leaked into training data"


def build_topic() -> dict[str, list[dict]]:
    """The topic set: see the module docstring."""
    rng = random.Random(SEED + 1)
    train = [(q(n), n, e) for n, e in NOUNS for q in QUESTIONS]
    others = [n for n, _ in NOUNS]

    def another(n: str) -> tuple[str, str]:
        m = rng.choice([x for x in others if x != n and n not in x and x not in n])
        return m, dict(NOUNS)[m]

    def sft_answer(n: str, e: str) -> str:
        r = rng.random()
        if r < 0.5:
            return rng.choice(POLITE)(n, e)
        if r < 0.7:
            return rng.choice(POLITE)(*another(n))  # polite, about something else
        if r < 0.88:
            return rng.choice(CASUAL)(n, e)
        return rng.choice(ENGLISH)(n, e)

    sft = []
    for prompt, n, e in train:
        for _ in range(3):
            msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": sft_answer(n, e)}]
            if rng.random() < 0.1:
                msgs.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
            sft.append({"messages": msgs})
    rng.shuffle(sft)

    preference = []
    for prompt, n, e in train:
        for kind in ("off_topic", "off_topic", "casual", "english", "malformed"):
            chosen = rng.choice(POLITE + POLITE_EXTRA)(n, e)
            if kind == "off_topic":
                rejected = rng.choice(POLITE + POLITE_EXTRA)(*another(n))
            else:
                bank = {"casual": CASUAL + CASUAL_EXTRA, "english": ENGLISH, "malformed": MALFORMED}[kind]
                rejected = rng.choice(bank)(n, e)
            preference.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    rng.shuffle(preference)

    prompts = [{"prompt": p} for p, _, _ in train]
    rng.shuffle(prompts)
    heldout = [{"prompt": q(n), "kind": "topic"} for n, _ in HELDOUT_NOUNS for q in QUESTIONS[:2]]
    _check_topic(sft, preference, prompts, heldout)
    return {"topic_sft": sft, "topic_preference": preference, "topic_prompts": prompts, "topic_heldout": heldout}


def _check_topic(sft: list[dict], preference: list[dict], prompts: list[dict], heldout: list[dict]) -> None:
    for pair in preference:
        assert is_polite_and_on_topic(pair["prompt"], pair["chosen"]), pair
        assert not is_polite_and_on_topic(pair["prompt"], pair["rejected"]), pair
    kinds = [(is_polite_korean(p["rejected"]), is_on_topic(p["prompt"], p["rejected"])) for p in preference]
    assert (True, False) in kinds and (False, True) in kinds  # both halves of the rule are needed to rank
    held_subjects = {prompt_subject(h["prompt"]) for h in heldout}
    assert None not in held_subjects
    train_texts = [m["content"] for row in sft for m in row["messages"]]
    train_texts += [t for p in preference for t in p.values()] + [p["prompt"] for p in prompts]
    leaked = {s for s in held_subjects for t in train_texts if s in t}
    assert not leaked, f"held-out subjects in training data: {leaked}"


def write(out_dir: Path = DATA_DIR) -> dict[str, int]:
    data = {**build(), **build_topic()}
    counts = {}
    for name, rows in data.items():
        with open(out_dir / f"{name}.jsonl", "w", encoding="utf-8", newline="\n") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        counts[name] = len(rows)
    return counts


if __name__ == "__main__":
    print(write())
