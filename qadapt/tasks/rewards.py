"""What a sampled completion earns when a model learns from rewards (GRPO): named rewards, weighted, summed.

    correct          1 when the answer the evaluation reads is the gold answer, else 0: the paper's last
                     number (within 1e-3), or for a multiple-choice problem the letter after "The answer is"
                     (the paper's first capital A–E would reward any sentence that starts with "A")
    format           1 when the completion states its answer the way the evaluator's strict reading finds it
                     ("The answer is 42." / "The answer is (B)."), else 0
    length           −tokens / max_new_tokens: a cost for length, 0 for an empty completion, −1 at the limit
    MODULE:FUNCTION  a function of yours, called as FUNCTION(prompts, completions, answers) with three lists of
                     equal length, returning one number per completion

A function that raises or returns anything but one finite number per completion stops the run with one line
naming it and what went wrong.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Callable

from qadapt.errors import QadaptError
from qadapt.tasks import answers

@dataclass(frozen=True)
class Completion:
    """One sampled completion and what its reward may read."""

    prompt: str
    text: str
    tokens: int
    gold: float | str
    multiple_choice: bool


def correct(completion: Completion, max_new_tokens: int) -> float:
    strict = completion.multiple_choice
    found = answers.extract(completion.text, completion.multiple_choice, strict=strict)
    return float(answers.is_correct(found, completion.gold))


def stated_answer(completion: Completion, max_new_tokens: int) -> float:
    return float(answers.extract(completion.text, completion.multiple_choice, strict=True) is not None)


def length_cost(completion: Completion, max_new_tokens: int) -> float:
    return -completion.tokens / max_new_tokens


_BUILT_IN: dict[str, Callable[[Completion, int], float]] = {
    "correct": correct, "format": stated_answer, "length": length_cost}
BUILT_IN = tuple(_BUILT_IN)


class Reward:
    """One named reward: a built-in one, or `module:function` imported once, when the run starts."""

    def __init__(self, name: str):
        self.name = name
        if name in _BUILT_IN:
            built_in = _BUILT_IN[name]
            self._score = lambda batch, max_new_tokens: [built_in(c, max_new_tokens) for c in batch]
            return
        module_name, sep, function_name = name.partition(":")
        if not sep or not module_name or not function_name:
            raise QadaptError(f"unknown reward {name!r}; choose one of {', '.join(BUILT_IN)}, "
                              "or name a function of yours as module:function")
        try:
            module = importlib.import_module(module_name)
        except Exception as error:  # the user's module, whatever it raises on import
            raise QadaptError(f"reward {name}: cannot import {module_name}: {error}") from None
        function = getattr(module, function_name, None)
        if not callable(function):
            raise QadaptError(f"reward {name}: {module_name} has no function {function_name}")
        self._score = lambda batch, max_new_tokens: function(
            [c.prompt for c in batch], [c.text for c in batch], [c.gold for c in batch])

    def __call__(self, batch: list[Completion], max_new_tokens: int) -> list[float]:
        try:
            scores = self._score(batch, max_new_tokens)
        except Exception as error:  # the user's function, whatever it raises
            raise QadaptError(f"reward {self.name} failed: {type(error).__name__}: {error}") from None
        if not isinstance(scores, (list, tuple)) or len(scores) != len(batch):
            got = f"{len(scores)} values" if isinstance(scores, (list, tuple)) else type(scores).__name__
            raise QadaptError(f"reward {self.name} must return one number per completion ({len(batch)}), got {got}")
        bad = [s for s in scores if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s)]
        if bad:
            raise QadaptError(f"reward {self.name} must return finite numbers, got {bad[0]!r}")
        return [float(s) for s in scores]


def total_rewards(rewards: list[tuple[Reward, float]], batch: list[Completion], max_new_tokens: int
                  ) -> tuple[list[float], dict[str, list[float]]]:
    """Each completion's weighted sum of rewards, and each reward's own scores (for the run's metrics)."""
    each = {reward.name: reward(batch, max_new_tokens) for reward, _ in rewards}
    totals = [sum(weight * each[reward.name][i] for reward, weight in rewards) for i in range(len(batch))]
    return totals, each
