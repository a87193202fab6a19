"""Built-in conversations (`builtin:conversations`): a word problem, then follow-up questions about the same
story in later turns, offline, so that the chat recipe and its tests need no hub.

Each conversation opens with one of the everyday problems' stories (a purchase, savings, a trip) and asks
one to two follow-ups that build on the earlier answers ("And if she pays with a $50 note?"); a third of
them start with a system prompt. Every assistant turn is a GSM8K-style rationale ending "The answer is N."
The splits are those of the everyday problems: by a hash of the first question.
"""

from __future__ import annotations

import random

from qadapt.builtin_data.arithmetic import problems as _split_problems
from qadapt.builtin_data.word_problems import GOODS, NAMES

SYSTEM_PROMPTS = [
    "You are a patient math tutor. Work through each question step by step and end with 'The answer is N.'",
    "You help with everyday arithmetic. Show the calculation, then state the answer.",
]


def conversations(split: str, count: int, seed: int = 0) -> list[dict]:
    """`count` distinct conversations of `split` ("train" or "test"), as records {"messages": [...]}."""
    return [{"messages": record["messages"]} for record in _split_problems(split, count, seed, make=_conversation)]


def _conversation(rng: random.Random) -> dict:
    turns = rng.choice(STORIES)(rng)
    messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 1 / 3 else []
    for question, steps, answer in turns[:rng.randint(2, len(turns))]:
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": " ".join(steps) + f" The answer is {answer}."}]
    first = next(m["content"] for m in messages if m["role"] == "user")
    return {"instruction": first, "messages": messages}


def _shopping(rng):
    name, (one, many) = rng.choice(NAMES), rng.choice(GOODS)
    q, p = rng.randint(2, 6), rng.randint(2, 12)
    total = q * p
    paid = next(n for n in (20, 50, 100, 200) if n > total)
    change = paid - total
    return [
        (rng.choice([f"{name} buys {q} {many} at ${p} each. How much does {name} spend?",
                     f"One {one} costs ${p}. What do {q} {many} cost {name}?"]),
         [f"{q} {many} at ${p} each cost {q} * {p} = ${total}."], total),
        (rng.choice([f"And if {name} pays with a ${paid} note, how much change comes back?",
                     f"{name} hands over ${paid}. What is the change?"]),
         [f"The change is {paid} - {total} = ${change}."], change),
        (f"How many more {many} could {name} buy with that change?",
         [f"Each {one} is ${p}, so {change} / {p} = {change // p}" + (" with some money left over."
                                                                     if change % p else ".")], change // p),
    ]


def _saving(rng):
    name, per_week, weeks = rng.choice(NAMES), rng.randint(3, 20), rng.randint(2, 10)
    saved, extra = per_week * weeks, rng.randint(2, 6)
    return [
        (f"{name} saves ${per_week} every week for {weeks} weeks. How much has {name} saved?",
         [f"{per_week} * {weeks} = ${saved}."], saved),
        (f"What if {name} keeps saving for {extra} more weeks?",
         [f"{extra} more weeks add {per_week} * {extra} = ${per_week * extra}.",
          f"In total {saved} + {per_week * extra} = ${saved + per_week * extra}."], saved + per_week * extra),
        (f"{name} then spends half of it on a bike. How much is left?",
         [f"Half of {saved + per_week * extra} is {saved + per_week * extra} / 2 = "
          f"{(saved + per_week * extra) / 2:g}."], f"{(saved + per_week * extra) / 2:g}"),
    ]


def _trip(rng):
    name, speed, hours = rng.choice(NAMES), rng.randint(20, 70), rng.randint(2, 5)
    distance, back = speed * hours, rng.randint(1, hours)
    return [
        (f"{name} drives at {speed} kilometers per hour for {hours} hours. How far does {name} go?",
         [f"{speed} * {hours} = {distance} kilometers."], distance),
        (f"On the way back {name} has driven {back} hours at the same speed. How far is home now?",
         [f"{name} has covered {speed} * {back} = {speed * back} kilometers,",
          f"so {distance} - {speed * back} = {distance - speed * back} kilometers are left."],
         distance - speed * back),
    ]


STORIES = [_shopping, _saving, _trip]
