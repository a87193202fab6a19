"""Built-in arithmetic word problems: the offline default task, a real one a 135M model visibly learns.

Each problem is a short story of one to three steps (add, take away, buy packs, double, share out)
in one of several settings, with a step-by-step rationale ending "The answer is N.", in the
LLM-Adapters record format (instruction, input, output, answer). Generation is deterministic by seed;
a problem belongs to the train or test split by a hash of its text, so the splits never share one.
"""

from __future__ import annotations

import hashlib
import random

NAMES = ["Maya", "Liam", "Ava", "Noah", "Zoe", "Omar", "Lena", "Ravi", "Ines", "Theo", "Mia", "Kofi"]
ITEMS = ["apples", "marbles", "stickers", "books", "cookies", "pencils", "shells", "cards", "stamps"]
PACKS = ["boxes", "bags", "packs", "jars"]
FRIENDS = ["a friend", "a cousin", "a classmate", "a neighbour"]
SETTINGS = ("owner", "container", "money")
TEST_SHARE = 10  # one problem in TEST_SHARE goes to the test split


def problems(split: str, count: int, seed: int = 0, make=None) -> list[dict]:
    """`count` distinct problems of `split` ("train" or "test"), made by `make(rng)` (default: this module's)."""
    make = make or _problem
    if split not in ("train", "test"):
        raise ValueError(f"built-in arithmetic has splits train and test, not {split!r}")
    rng = random.Random(f"{seed}-{split}")
    seen: set[str] = set()
    out: list[dict] = []
    while len(out) < count:
        record = make(rng)
        question = record["instruction"]
        if question in seen or _split_of(question) != split:
            continue
        seen.add(question)
        out.append(record)
    return out


def _split_of(question: str) -> str:
    bucket = int(hashlib.sha256(question.encode()).hexdigest(), 16) % TEST_SHARE
    return "test" if bucket == 0 else "train"


def _problem(rng: random.Random) -> dict:
    setting = rng.choice(SETTINGS)
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(5, 60)
    if setting == "money":
        story, unit = [f"{name} has ${total}."], "dollars"
        reasoning = [f"{name} starts with ${total}."]
    elif setting == "container":
        story, unit = [f"There are {total} {item} in a basket."], item
        reasoning = [f"The basket starts with {total} {item}."]
    else:
        story, unit = [f"{name} has {total} {item}."], item
        reasoning = [f"{name} starts with {total} {item}."]
    steps = rng.randint(1, 3)
    share_parts = None
    for index in range(steps):
        last = index == steps - 1
        kind = rng.choice(["add", "take", "packs", "times"] + (["share"] if last else []))
        if kind == "share":
            divisors = [k for k in range(2, 7) if total % k == 0]
            if not divisors:
                kind = "add"
            else:
                share_parts = rng.choice(divisors)
        total, sentence, why = _step(rng, kind, total, setting, item, share_parts)
        story.append(sentence)
        reasoning.append(why)
    story.append(_question(setting, name, unit, share_parts))
    reasoning.append(f"The answer is {total}.")
    return {"instruction": " ".join(story), "input": "", "output": " ".join(reasoning), "answer": str(total)}


def _step(rng, kind, total, setting, item, share_parts):
    money = setting == "money"
    if kind == "add":
        b = rng.randint(2, 30)
        text = f"Then {'they earn' if money else 'someone adds'} {_amount(b, item, money)}."
        return total + b, text, f"Adding {b} gives {total} + {b} = {total + b}."
    if kind == "take" and total > 2:
        b = rng.randint(1, total - 1)
        text = f"Then {_amount(b, item, money)} {'is spent' if money else 'are given to ' + rng.choice(FRIENDS)}."
        return total - b, text, f"Taking away {b} leaves {total} - {b} = {total - b}."
    if kind == "packs":
        k, b = rng.randint(2, 6), rng.randint(2, 12)
        if money:
            text = f"Then {k} tickets are sold for ${b} each."
        else:
            text = f"Then {k} {rng.choice(PACKS)} with {b} {item} each are added."
        return total + k * b, text, f"That adds {k} x {b} = {k * b}, so {total} + {k * b} = {total + k * b}."
    if kind == "share":
        text = f"Then everything is shared equally among {share_parts} people."
        return total // share_parts, text, f"Each share is {total} / {share_parts} = {total // share_parts}."
    k = rng.choice([2, 3])
    word = {2: "doubles", 3: "triples"}[k]
    return total * k, f"Then the amount {word}.", f"It {word}: {total} x {k} = {total * k}."


def _amount(b: int, item: str, money: bool) -> str:
    return f"${b}" if money else f"{b} {item}"


def _question(setting: str, name: str, unit: str, share_parts: int | None) -> str:
    if share_parts:
        return f"How many {unit} does each person get?"
    if setting == "money":
        return f"How many dollars does {name} have now?"
    if setting == "container":
        return f"How many {unit} are in the basket now?"
    return f"How many {unit} does {name} have now?"
