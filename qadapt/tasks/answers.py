"""Answer extraction and scoring of the LLM-Adapters math evaluation (its `evaluate.py`), exactly.

    numeric sets   the last number in the output, commas removed (`-?\\d+\\.?\\d*`); right when it is
                   within 1e-3 of the gold answer
    AQuA           the first capital A-E anywhere in the output (the paper's regex, quirks included:
                   the "A" of "Answer" counts); right when it equals the gold letter

Where the paper's code scores a missing number as infinity, we record "no answer" (None) and count it
wrong. `strict` reads only what follows "The answer is", the sentence every training target ends with.
"""

from __future__ import annotations

import re

TOLERANCE = 1e-3  # the paper's `miss`
_NUMBER = re.compile(r"-?\d+\.?\d*")
_LETTER = re.compile(r"A|B|C|D|E")
_STRICT_NUMBER = re.compile(r"answer is\s*:?\s*\$?\s*(-?[\d,]*\.?\d+)", re.IGNORECASE)
_STRICT_LETTER = re.compile(r"answer is\s*:?\s*\(?([A-E])\b")


def extract_number(output: str, strict: bool = False) -> float | None:
    if strict:
        found = _STRICT_NUMBER.findall(output)
        return float(found[-1].replace(",", "")) if found else None
    found = _NUMBER.findall(output.replace(",", ""))
    return float(found[-1]) if found else None


def extract_letter(output: str, strict: bool = False) -> str | None:
    found = (_STRICT_LETTER if strict else _LETTER).findall(output if strict else output.strip())
    if not found:
        return None
    return found[-1] if strict else found[0]


def extract(output: str, multiple_choice: bool, strict: bool = False) -> float | str | None:
    return extract_letter(output, strict) if multiple_choice else extract_number(output, strict)


def is_correct(predicted: float | str | None, gold: float | str) -> bool:
    if predicted is None:
        return False
    if isinstance(gold, str):
        return predicted == gold
    return abs(gold - predicted) <= TOLERANCE
