"""Preference rows in TRL's formats become two records of the supervised path, or one clear problem."""

from __future__ import annotations

import pytest

from qadapt.preference_pairs import is_pair_row, to_pair


def test_an_explicit_text_pair_is_two_instruction_records():
    pair, problem = to_pair({"prompt": "What is 2 + 3?", "chosen": "2 + 3 = 5. The answer is 5.",
                             "rejected": "The answer is 6."})
    assert problem is None
    assert pair["chosen"] == {"instruction": "What is 2 + 3?", "input": "", "output": "2 + 3 = 5. The answer is 5.",
                              "answer": ""}
    assert pair["rejected"]["output"] == "The answer is 6." and pair["rejected"]["instruction"] == "What is 2 + 3?"


def test_a_conversational_pair_is_two_conversations_sharing_the_prompt():
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 3?"}]
    pair, problem = to_pair({"prompt": prompt, "chosen": [{"role": "assistant", "content": "5"}],
                             "rejected": "6"})  # a side given as text is one assistant turn
    assert problem is None
    assert pair["chosen"]["messages"] == prompt + [{"role": "assistant", "content": "5"}]
    assert pair["rejected"]["messages"] == prompt + [{"role": "assistant", "content": "6"}]


def test_an_implicit_prompt_is_what_the_two_sides_share():
    pair, problem = to_pair({"chosen": "Q: 2 + 3? A: 5", "rejected": "Q: 2 + 3? A: 6"})
    assert problem is None and pair["chosen"]["instruction"] == "Q: 2 + 3? A:"
    assert (pair["chosen"]["output"], pair["rejected"]["output"]) == (" 5", " 6")  # TRL's split: the space goes along
    user = {"role": "user", "content": "2 + 3?"}
    pair, problem = to_pair({"chosen": [user, {"role": "assistant", "content": "5"}],
                             "rejected": [user, {"role": "assistant", "content": "6"}]})
    assert problem is None and pair["chosen"]["messages"][0] == user and pair["rejected"]["messages"][-1]["content"] == "6"


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "chosen": "a"}, "the pair has no rejected answer"),
    ({"prompt": "p", "chosen": "a", "rejected": "a"}, "chosen and rejected are the same answer"),
    ({"chosen": "Q: a", "rejected": [{"role": "assistant", "content": "b"}]},
     "without a prompt, chosen and rejected must both be texts or both be message lists"),
    ({"prompt": "p", "chosen": 5, "rejected": "b"}, "chosen and rejected must each be a text or a message list"),
    ({"prompt": "p", "chosen": "a", "rejected": "  "}, "an answer is empty"),
    ({"chosen": "yes", "rejected": "no"}, "chosen and rejected share no beginning to take as the prompt"),
    ({"prompt": [{"role": "user", "content": "p"}],
      "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "and?"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "chosen: the conversation does not end with the answer"),
    ({"prompt": [{"role": "robot", "content": "p"}], "chosen": "a", "rejected": "b"},
     "chosen: messages[1] has role 'robot'"),
])
def test_a_bad_pair_says_what_is_wrong(row, message):
    pair, problem = to_pair(row)
    assert pair is None and problem.startswith(message)


def test_pair_rows_are_told_from_other_rows():
    assert is_pair_row({"prompt": "p", "chosen": "a", "rejected": "b"}) and is_pair_row({"rejected": "b"})
    assert not is_pair_row({"prompt": "p", "completion": "c"}) and not is_pair_row(["chosen"])
