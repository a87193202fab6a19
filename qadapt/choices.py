"""Multiple-choice copies of numeric training problems, in AQuA's format (`data.multiple_choice`).

A model trained only on numeric rationales (GSM8K) answers AQuA's five-option questions with a number
and no letter, and scores below the untrained base. A copy of a training problem with its answer among
four wrong options, its question ending "Answer Choices: (A) 18 (B) 72 ...", and its rationale ending
"The answer is (B)." (the paper's math_10k format) teaches the letter without any AQuA data.

The wrong options are what a solver gets wrong: the rationale's intermediate results first, then near
misses of the answer (±1, ±10%, ×2, ÷2), so the letter cannot be found by the size of the numbers.
"""

from __future__ import annotations

import itertools
import random
import re

from qadapt.decoding.calculator import format_number

LETTERS = "ABCDE"
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_FINAL_ANSWER = re.compile(r"The answer is [^\n]*\.?\s*$")


def multiple_choice_copies(records: list[dict], share: float, seed: int) -> list[dict]:
    """Five-option copies of a seeded `share` of the records whose answer is a number."""
    rng = random.Random(seed)
    numeric = [r for r in records  # conversations have no single answer
               if _as_number(r.get("answer")) is not None and _FINAL_ANSWER.search(r["output"])]
    chosen = rng.sample(numeric, round(share * len(numeric)))
    return [_with_choices(record, rng) for record in chosen]


def _with_choices(record: dict, rng: random.Random) -> dict:
    gold = _as_number(record["answer"])
    options = [gold] + _wrong_options(gold, record["output"], rng)
    rng.shuffle(options)
    letter = LETTERS[options.index(gold)]
    listed = " ".join(f"({LETTERS[i]}) {format_number(value)}" for i, value in enumerate(options))
    question = record["instruction"].rstrip() + f" Answer Choices: {listed}"
    output = _FINAL_ANSWER.sub(f"The answer is ({letter}).", record["output"])
    return {"instruction": question, "input": record["input"], "output": output, "answer": letter}


def _wrong_options(gold: float, rationale: str, rng: random.Random) -> list[float]:
    """Four distinct wrong answers: the rationale's other numbers, then near misses of the answer."""
    seen = {gold}
    from_rationale = [v for v in map(float, _NUMBER.findall(rationale)) if v not in seen]
    rng.shuffle(from_rationale)
    step = max(1.0, round(abs(gold) * 0.1))
    near = [gold + 1, gold - 1, gold + step, gold - step, gold * 2, gold / 2, gold + 10, gold * 3]
    rng.shuffle(near)  # always ±1 would make the answer the middle one of three neighbours
    wrong = []
    for value in itertools.chain(from_rationale[:2], near, (gold + k for k in itertools.count(2))):
        if len(wrong) == 4:
            break
        value = round(value, 2)
        if value not in seen and (value >= 0 or gold < 0):
            seen.add(value)
            wrong.append(value)
    return wrong


def _as_number(text: str) -> float | None:
    try:
        return float(str(text).replace(",", "").strip())
    except ValueError:
        return None
