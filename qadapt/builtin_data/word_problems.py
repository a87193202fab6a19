"""Built-in everyday word problems (`builtin:word-problems`): varied stories whose arithmetic depends on
what the words mean, so that a model learns the arithmetic rather than one story's template.

`builtin:arithmetic` (qadapt.builtin_data.arithmetic) tells every problem the same way ("X starts with N. Then ...");
a small model trained on it learns to add up the numbers of any story in the order they come. Here
each kind of problem (price × quantity, change from a payment, rates, sharing out, comparisons,
"times as many", unit conversions, ...) has several phrasings, the quantities come in different
orders, and the rationale names the operation before it does it, GSM8K-style ("4 * 12 = 48"),
ending "The answer is N." Numbers stay small enough for a small model's arithmetic.
"""

from __future__ import annotations

import random

from qadapt.builtin_data.arithmetic import problems as _split_problems

NAMES = ["Aiko", "Bruno", "Chloe", "Dmitri", "Esther", "Farid", "Greta", "Hugo", "Isla", "Jonah", "Keiko",
         "Luis", "Marta", "Nils", "Olu", "Pia", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wes", "Yara"]
GOODS = [("sandwich", "sandwiches"), ("kite", "kites"), ("mug", "mugs"), ("scarf", "scarves"),
         ("puzzle", "puzzles"), ("candle", "candles"), ("plant", "plants"), ("comic", "comics"),
         ("lamp", "lamps"), ("ball", "balls")]
THINGS = ["beads", "buttons", "seashells", "postcards", "acorns", "coins", "feathers", "pebbles", "ribbons"]


def problems(split: str, count: int, seed: int = 0) -> list[dict]:
    """`count` distinct problems of `split` ("train" or "test"), split by a hash of the question."""
    return _split_problems(split, count, seed, make=_problem)


def _problem(rng: random.Random) -> dict:
    question, steps, answer = rng.choice(KINDS)(rng)
    output = " ".join(steps) + f" The answer is {answer}."
    return {"instruction": question, "input": "", "output": output, "answer": str(answer)}


def _price_total(rng):
    name, (one, many), q, p = rng.choice(NAMES), rng.choice(GOODS), rng.randint(2, 9), rng.randint(2, 25)
    question = rng.choice([
        f"{name} buys {q} {many} at ${p} each. How much does {name} spend?",
        f"One {one} costs ${p}. What is the price of {q} {many}?",
        f"At the market, {many} sell for ${p} apiece. {name} takes {q} of them. What is the bill?",
    ])
    return question, [f"Each {one} costs ${p}, so {q} {many} cost {q} * {p} = ${q * p}."], q * p


def _change(rng):
    name, (one, many), q, p = rng.choice(NAMES), rng.choice(GOODS), rng.randint(2, 6), rng.randint(2, 15)
    paid = rng.choice([n for n in (20, 50, 100) if n > q * p] or [q * p + 10])
    question = rng.choice([
        f"{name} pays for {q} {many} with a ${paid} note. Each {one} is ${p}. How much change should {name} get?",
        f"With ${paid} in hand, {name} buys {q} {many} priced at ${p} each. How much money is left?",
    ])
    steps = [f"The {many} cost {q} * {p} = ${q * p}.", f"The change is {paid} - {q * p} = ${paid - q * p}."]
    return question, steps, paid - q * p


def _rate(rng):
    rate, time = rng.randint(3, 40), rng.randint(2, 9)
    what, unit = rng.choice([("pages", "day"), ("bottles", "minute"), ("kilometers", "hour"), ("bricks", "hour"),
                             ("letters", "day")])
    question = rng.choice([
        f"A worker handles {rate} {what} every {unit}. How many {what} is that in {time} {unit}s?",
        f"In {time} {unit}s, how many {what} are done at a steady {rate} {what} per {unit}?",
    ])
    return question, [f"{rate} {what} per {unit} for {time} {unit}s is {rate} * {time} = {rate * time}."], rate * time


def _share(rng):
    groups, each = rng.randint(2, 9), rng.randint(2, 15)
    total, thing, name = groups * each, rng.choice(THINGS), rng.choice(NAMES)
    question = rng.choice([
        f"{name} splits {total} {thing} evenly among {groups} friends. How many does each friend receive?",
        f"{total} {thing} are packed into {groups} bags with the same number in every bag. How many go in one bag?",
    ])
    return question, [f"Sharing {total} among {groups} gives {total} / {groups} = {each} each."], each


def _more_than(rng):
    a, b = rng.sample(NAMES, 2)
    small, extra, thing = rng.randint(3, 60), rng.randint(2, 40), rng.choice(THINGS)
    big = small + extra
    kind = rng.randrange(3)
    if kind == 0:
        question = f"{a} collected {big} {thing} and {b} collected {small}. How many more {thing} does {a} have?"
        return question, [f"The difference is {big} - {small} = {extra}."], extra
    if kind == 1:
        question = f"{b} owns {small} {thing}. {a} owns {extra} more than {b}. How many {thing} does {a} own?"
        return question, [f"{a} has {extra} more, so {small} + {extra} = {big}."], big
    question = f"{a} has {big} {thing}, which is {extra} more than {b} has. How many {thing} does {b} have?"
    return question, [f"{b} has {extra} fewer, so {big} - {extra} = {small}."], small


def _times_as_many(rng):
    a, b = rng.sample(NAMES, 2)
    x, k, thing = rng.randint(2, 30), rng.randint(2, 5), rng.choice(THINGS)
    word = {2: "twice", 3: "three times", 4: "four times", 5: "five times"}[k]
    if rng.random() < 0.5:
        question = f"{a} found {x} {thing}. {b} found {word} as many. How many {thing} did {b} find?"
        return question, [f"{word.capitalize()} as many as {x} is {k} * {x} = {k * x}."], k * x
    question = f"{a} has {x} {thing} and {b} has {word} as many. How many {thing} do they have together?"
    steps = [f"{b} has {k} * {x} = {k * x}.", f"Together they have {x} + {k * x} = {x + k * x}."]
    return question, steps, x + k * x


def _sold_and_delivered(rng):
    start, sold = rng.randint(20, 90), rng.randint(2, 19)
    arrived, (one, many) = rng.randint(2, 30), rng.choice(GOODS)
    question = rng.choice([
        f"A shop had {start} {many}. It sold {sold} and a delivery brought {arrived} more. How many {many} does it "
        "have?",
        f"After a delivery of {arrived} {many} and a sale of {sold}, how many {many} does a shop hold if it held "
        f"{start} before?",
    ])
    steps = [f"After selling, {start} - {sold} = {start - sold}.",
             f"After the delivery, {start - sold} + {arrived} = {start - sold + arrived}."]
    return question, steps, start - sold + arrived


def _rows(rng):
    rows, per_row = rng.randint(3, 12), rng.randint(4, 15)
    what, where = rng.choice([("trees", "an orchard"), ("seats", "a theater"), ("cars", "a car park"),
                              ("tiles", "a wall"), ("lettuces", "a vegetable bed")])
    question = f"{where.capitalize()} has {rows} rows of {what} with {per_row} in each row. How many {what} are there?"
    return question, [f"{rows} rows of {per_row} make {rows} * {per_row} = {rows * per_row}."], rows * per_row


def _three_days(rng):
    counts, (one, many) = [rng.randint(5, 60) for _ in range(3)], rng.choice(GOODS)
    days = rng.choice([("Friday", "Saturday", "Sunday"), ("Monday", "Tuesday", "Wednesday")])
    question = (f"A stall sold {counts[0]} {many} on {days[0]}, {counts[1]} on {days[1]} and {counts[2]} on "
                f"{days[2]}. How many {many} did it sell over the three days?")
    first = counts[0] + counts[1]
    steps = [f"{counts[0]} + {counts[1]} = {first}.", f"{first} + {counts[2]} = {first + counts[2]}."]
    return question, steps, first + counts[2]


def _ages(rng):
    a, b = rng.sample(NAMES, 2)
    young, gap = rng.randint(4, 30), rng.randint(2, 30)
    if rng.random() < 0.5:
        question = f"{a} is {young + gap} years old and {gap} years older than {b}. How old is {b}?"
        return question, [f"{b} is {young + gap} - {gap} = {young} years old."], young
    question = f"{b} is {young}. {a} was born {gap} years before {b}. How old is {a}?"
    return question, [f"{a} is {young} + {gap} = {young + gap} years old."], young + gap


def _convert(rng):
    big, small, factor = rng.choice([("hours", "minutes", 60), ("weeks", "days", 7), ("dollars", "cents", 100),
                                     ("meters", "centimeters", 100), ("dozen", "eggs", 12)])
    n, extra = rng.randint(2, 9), rng.randint(0, factor - 1)
    if extra and rng.random() < 0.5:
        question = f"How many {small} are there in {n} {big} and {extra} {small}?"
        steps = [f"{n} {big} are {n} * {factor} = {n * factor} {small}.", f"{n * factor} + {extra} = {n * factor + extra}."]
        return question, steps, n * factor + extra
    question = f"How many {small} make {n} {big}?"
    return question, [f"Each of the {n} is {factor} {small}, so {n} * {factor} = {n * factor}."], n * factor


def _saving(rng):
    name, per_week, weeks = rng.choice(NAMES), rng.randint(3, 25), rng.randint(2, 12)
    goal = per_week * weeks
    question = rng.choice([
        f"{name} puts aside ${per_week} every week. How many weeks until {name} has ${goal}?",
        f"To save ${goal} at ${per_week} a week, how many weeks does {name} need?",
    ])
    return question, [f"{goal} / {per_week} = {weeks} weeks."], weeks


def _two_items(rng):
    name = rng.choice(NAMES)
    (one1, many1), (one2, many2) = rng.sample(GOODS, 2)
    q1, p1, q2, p2 = rng.randint(2, 6), rng.randint(2, 12), rng.randint(2, 6), rng.randint(2, 12)
    question = (f"{name} orders {q1} {many1} at ${p1} each and {q2} {many2} at ${p2} each. What is the total "
                "cost?")
    steps = [f"The {many1} cost {q1} * {p1} = ${q1 * p1}.", f"The {many2} cost {q2} * {p2} = ${q2 * p2}.",
             f"In total {q1 * p1} + {q2 * p2} = ${q1 * p1 + q2 * p2}."]
    return question, steps, q1 * p1 + q2 * p2


def _half(rng):
    name, thing, half = rng.choice(NAMES), rng.choice(THINGS), rng.randint(3, 45)
    total = 2 * half
    if rng.random() < 0.5:
        question = f"{name} had {total} {thing} and gave away half of them. How many {thing} are left?"
        return question, [f"Half of {total} is {total} / 2 = {half}, and {total} - {half} = {half} are left."], half
    kept = rng.randint(1, half - 1)
    question = f"{name} gave half of {total} {thing} to a sister and then lost {kept}. How many are left?"
    steps = [f"Half of {total} is {total} / 2 = {half}.", f"After losing {kept}, {half} - {kept} = {half - kept}."]
    return question, steps, half - kept


KINDS = [_price_total, _change, _rate, _share, _more_than, _times_as_many, _sold_and_delivered, _rows,
         _three_days, _ages, _convert, _saving, _two_items, _half]
