"""GRPO's rewards (qadapt.tasks.rewards): the built-in ones read answers as the evaluation does, a user's
function is called with the batch, and every way a reward can go wrong is one clear error naming it."""

from __future__ import annotations

import sys

import pytest

from qadapt.errors import QadaptError
from qadapt.tasks.rewards import Completion, Reward, total_rewards


def done(text: str, gold, tokens: int = 10, multiple_choice: bool = False) -> Completion:
    return Completion(prompt="Q", text=text, tokens=tokens, gold=gold, multiple_choice=multiple_choice)


def test_correct_reads_the_answer_as_the_evaluation_does():
    batch = [done("3 * 4 = 12. The answer is 12.", 12.0), done("The answer is 1,200.", 1200.0),
             done("3 + 4 = 7. The answer is 7.", 12.0), done("I do not know.", 12.0),
             done("A: 4 * 3 = 12. The answer is (C).", "C", multiple_choice=True),
             done("A bag holds 12. The answer is (B).", "A", multiple_choice=True)]
    # The last: the paper's first capital would read "A" and reward it; the answer sentence says B.
    assert Reward("correct")(batch, 64) == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]


def test_format_and_length():
    batch = [done("4 * 3 = 12. The answer is 12.", 12.0, tokens=16), done("so 12", 12.0, tokens=64),
             done("The answer is (B).", "B", tokens=0, multiple_choice=True), done("B", "B", multiple_choice=True)]
    assert Reward("format")(batch, 64) == [1.0, 0.0, 1.0, 0.0]
    assert Reward("length")(batch, 64) == [-0.25, -1.0, 0.0, -10 / 64]


def test_rewards_are_weighted_and_summed_and_each_is_kept():
    batch = [done("The answer is 12.", 12.0, tokens=32), done("12", 12.0, tokens=16), done("7", 12.0, tokens=64)]
    rewards = [(Reward("correct"), 1.0), (Reward("format"), 0.5), (Reward("length"), 0.1)]
    totals, each = total_rewards(rewards, batch, 64)
    assert totals == pytest.approx([1 + 0.5 - 0.05, 1 - 0.025, -0.1])
    assert each == {"correct": [1.0, 1.0, 0.0], "format": [1.0, 0.0, 0.0], "length": [-0.5, -0.25, -1.0]}


def test_a_function_of_yours_gets_the_batch(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)  # imported afresh, from tmp_path
    (tmp_path / "my_rewards.py").write_text(
        "def short_and_right(prompts, completions, answers):\n"
        "    return [float(str(int(a)) in c) - len(c) / 100 for p, c, a in zip(prompts, completions, answers)]\n"
        "def broken(prompts, completions, answers):\n"
        "    return 1 / 0\n"
        "def one_short(prompts, completions, answers):\n"
        "    return [1.0] * (len(completions) - 1)\n"
        "def not_a_number(prompts, completions, answers):\n"
        "    return [float('nan')] * len(completions)\n"
        "LIMIT = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    batch = [done("12", 12.0), done("seven", 12.0)]
    assert Reward("my_rewards:short_and_right")(batch, 64) == pytest.approx([1 - 0.02, -0.05])
    with pytest.raises(QadaptError, match=r"^reward my_rewards:broken failed: ZeroDivisionError: division by zero$"):
        Reward("my_rewards:broken")(batch, 64)
    with pytest.raises(QadaptError, match=r"one number per completion \(2\), got 1 values"):
        Reward("my_rewards:one_short")(batch, 64)
    with pytest.raises(QadaptError, match="must return finite numbers, got nan"):
        Reward("my_rewards:not_a_number")(batch, 64)
    with pytest.raises(QadaptError, match="reward my_rewards:LIMIT: my_rewards has no function LIMIT"):
        Reward("my_rewards:LIMIT")


def test_a_reward_that_cannot_be_found_is_named_with_the_choices():
    with pytest.raises(QadaptError, match="unknown reward 'corect'; choose one of correct, format, length, or name"):
        Reward("corect")
    with pytest.raises(QadaptError, match="reward no_such_module:f: cannot import no_such_module: No module named"):
        Reward("no_such_module:f")
