"""The decoding calculator: the true result after an arithmetic expression and "=", nothing otherwise."""

from __future__ import annotations

import pytest

from qadapt.decoding.calculator import calculator_result


@pytest.mark.parametrize("text, result", [
    ("So, Sam has 98-93=", "5"),  # no space before "=", none after
    ("So, Sam has 98 - 93 =", " 5"),
    ("Derek adds 6.8 + 6.8 =", " 13.6"),
    ("<<48/2=", "24"),  # GSM8K's calculator annotation
    ("He had 5. 3 + 4 =", " 7"),  # the sentence's full stop is not a decimal point
    ("the 12 x 12=", "144"),
    ("in all 3 × 4 ÷ 2 =", " 6"),
    ("(3 + 4) * 2 =", " 14"),
    ("costs $1,200 / 4 =", " 300"),
    ("-3 + 5 =", " 2"),
    ("1/3 =", " 0.333333"),
    ("0.001 * 0.4 =", " 0.0004"),
    ("3 + 4 = 7 + 2 =", " 9"),  # only the expression after the previous "="
    ("0.1 + 0.2 =", " 0.3"),
])
def test_an_expression_before_equals_gets_its_result(text, result):
    assert calculator_result(text) == result


@pytest.mark.parametrize("text", [
    "Total =",  # no expression
    "The price is 12 =",  # a bare number: nothing to compute
    "5 / 0 =",
    "2 ** 10 =",  # only + - * /
    "3 + =",
    "3 + 4",  # no "=" yet
    "3 + 4 = 7",  # already written
    "a(b) =",
])
def test_anything_else_is_left_to_the_model(text):
    assert calculator_result(text) is None
