"""Five-option copies of numeric training problems (data.multiple_choice)."""

from __future__ import annotations

import re
from collections import Counter

from qadapt import data as D
from qadapt.tasks.answers import extract_letter
from qadapt.choices import LETTERS, multiple_choice_copies


def _records():
    records = D.load_examples(D.BUILTIN_WORD_PROBLEMS, "test")
    records.append({"instruction": "Pick one. Answer Choices: (A) 1 (B) 2", "input": "", "output": "The answer is (B).",
                    "answer": "B"})  # already a letter: never copied
    records.append({"instruction": "What is 0 + 0?", "input": "", "output": "0 + 0 = 0\nThe answer is 0.", "answer": "0"})
    return records


def test_each_copy_lists_five_distinct_options_with_the_answer_once_under_its_letter():
    records = _records()
    copies = multiple_choice_copies(records, 1.0, seed=0)
    assert len(copies) == len(records) - 1
    originals = {r["instruction"]: r for r in records}
    for copy in copies:
        question, _, listed = copy["instruction"].partition(" Answer Choices: ")
        options = re.findall(r"\(([A-E])\) (\S+)", listed)
        assert [letter for letter, _ in options] == list(LETTERS)
        values = [float(value) for _, value in options]
        assert len(set(values)) == 5
        gold = float(originals[question]["answer"])
        assert values.count(gold) == 1 and LETTERS[values.index(gold)] == copy["answer"]
        assert copy["output"].endswith(f"The answer is ({copy['answer']}).")
        assert extract_letter(copy["output"], strict=True) == copy["answer"]
    letters = Counter(copy["answer"] for copy in copies)
    assert set(letters) == set(LETTERS) and max(letters.values()) < 2 * min(letters.values())


def test_copies_are_a_seeded_share():
    records = _records()
    half = multiple_choice_copies(records, 0.5, seed=1)
    assert len(half) == round(0.5 * (len(records) - 1))
    assert half == multiple_choice_copies(records, 0.5, seed=1)
    assert half != multiple_choice_copies(records, 0.5, seed=2)
    assert multiple_choice_copies(records, 0.0, seed=1) == []
