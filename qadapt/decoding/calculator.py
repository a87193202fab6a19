"""A calculator for decoding (`qadapt eval --calculator`): when a rationale has just written an arithmetic
expression and "=", the true result is written next, and the model goes on from there.

The GSM8K paper let a calculator fill in its rationales' annotations (`<<48/2=24>>`) while sampling.
A 135M model sets up many problems right and then slips in the sum ("98 - 93 = 12"); with the calculator,
accuracy measures the set-up alone. It is not the paper's protocol: its scores are reported apart
(`RUN/eval-calculator`, rows "+ calculator"), never mixed with the paper's.

Only + - * / (also x, ×, ÷) on plain numbers and parentheses are evaluated; "$", "," in numbers and spaces
are allowed. Anything else (a variable, a percent, a division by zero) leaves the model's own result.
"""

from __future__ import annotations

import ast
import math
import operator
import re

# The expression right before a final "=": numbers ("1,234.5"), operators, parentheses, "$" and spaces.
# A number cannot be followed by a digit, so the pattern matches one way only (no backtracking blow-up).
_EXPRESSION_BEFORE_EQUALS = re.compile(r"((?:[\s+\-*/x×÷()$]|\d+(?:[.,]\d+)*(?![\d]))+?)(\s*)=$")
_LOOK_BACK = 120  # characters: longer than any expression a rationale writes
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def calculator_result(text: str) -> str | None:
    """What to write after `text` if it ends with "expression =", e.g. " 5" after "98 - 93 =", else None.

    The space after "=" mirrors the space before it ("98-93=" gets "5").
    """
    found = _EXPRESSION_BEFORE_EQUALS.search(text[-_LOOK_BACK:])
    if not found:
        return None
    expression = found.group(1).replace("$", "").replace("×", "*").replace("x", "*").replace("÷", "/")
    expression = expression.replace(",", "").strip().lstrip("+*/").strip()
    if not re.search(r"\d\s*\)*\s*[-+*/]\s*\(*\s*-?\d", expression):  # a bare number is no sum to check
        return None
    value = _evaluate(expression)
    if value is None:
        return None
    return (" " if found.group(2) else "") + format_number(value)


def _evaluate(expression: str) -> float | None:
    try:
        tree = ast.parse(expression, mode="eval").body
        value = _value(tree)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, RecursionError):
        return None
    return value if math.isfinite(value) else None


def _value(node) -> float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return -_value(node.operand) if isinstance(node.op, ast.USub) else _value(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_value(node.left), _value(node.right))
    raise ValueError("not plain arithmetic")


def format_number(value: float) -> str:
    """12.0 -> '12', 13.6000001 -> '13.6', 1/3 -> '0.333333', 0.0004 -> '0.0004' (up to six decimals)."""
    if abs(value - round(value)) < 1e-9:
        return str(int(round(value)))
    return f"{value:.6f}".rstrip("0").rstrip(".")
