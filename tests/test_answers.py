"""Answer extraction and scoring follow the LLM-Adapters evaluate.py exactly, quirks included."""

from __future__ import annotations

import pytest

from qadapt.tasks.answers import extract_letter, extract_number, is_correct

# (model output, the paper's extracted number, the strict mode's)
NUMBER_CASES = [
    ("Step 1: 3 + 4 = 7.\nThe answer is 7.", 7.0, 7.0),
    ("The answer is 1,234.", 1234.0, 1234.0),
    ("She pays $1,000,000 in total", 1000000.0, None),
    ("18 apples, then 20 more. The answer is 18.", 18.0, 18.0),  # last number; here also the answer
    ("The answer is 18. Then she buys 20 more.", 20.0, 18.0),  # the paper takes the last number
    ("It is 5.5 dollars", 5.5, None),
    ("It is 18.", 18.0, None),  # the regex keeps the trailing dot; float() accepts it
    ("It dropped to -3 degrees", -3.0, None),
    ("from 5-3 we get", -3.0, None),  # quirk: a hyphen reads as a minus sign
    ("half is 1/2", 2.0, None),  # quirk: a fraction's denominator is the last number
    ("version 2.0.1", 1.0, None),
    ("The answer is: $42", 42.0, 42.0),
    ("the answer is -0.5.", -0.5, -0.5),
    ("no numbers at all", None, None),
    ("", None, None),
]


@pytest.mark.parametrize("output, paper, strict", NUMBER_CASES)
def test_number_extraction(output, paper, strict):
    assert extract_number(output) == paper
    assert extract_number(output, strict=True) == strict


# (model output, the paper's letter: the first capital A-E anywhere, the strict mode's)
LETTER_CASES = [
    ("The answer is C", "C", "C"),
    ("Answer: (B)", "A", None),  # quirk: the A of "Answer" counts
    ("Bob has 5 pens. The answer is (D).", "B", "D"),
    ("  E", "E", None),
    ("the answer is (a)", None, None),
    ("no capitals here", None, None),
]


@pytest.mark.parametrize("output, paper, strict", LETTER_CASES)
def test_letter_extraction(output, paper, strict):
    assert extract_letter(output) == paper
    assert extract_letter(output, strict=True) == strict


@pytest.mark.parametrize("predicted, gold, correct", [
    (18.0, 18.0, True),
    (18.0009, 18.0, True),  # within the paper's 1e-3
    (18.002, 18.0, False),
    (1.8333, 1.8333333333333335, True),
    (None, 18.0, False),  # no answer is wrong, not infinity
    ("A", "A", True),
    ("B", "A", False),
    (None, "A", False),
])
def test_scoring(predicted, gold, correct):
    assert is_correct(predicted, gold) is correct
