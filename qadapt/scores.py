"""Scores, for every task: a set's name, a proportion's interval, a paired comparison, and a scoring's
metrics.json and predictions.jsonl on disk."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from qadapt.files import atomic_file
from qadapt.run_dir import EVAL_METRICS_FILE, PREDICTIONS_FILE

Z_95 = 1.959964  # two-sided 95% normal quantile


def split_first(spec: str) -> tuple[str, int | None]:
    """('../math-eval/AddSub/test.json', 150) from '../math-eval/AddSub/test.json@150' (its first 150
    problems); (spec, None) without '@N'."""
    match = re.fullmatch(r"(.+)@(\d+)", spec)
    return (match[1], int(match[2])) if match else (spec, None)


def set_name(spec: str) -> str:
    """'../math-eval/AQuA/test.json' -> 'AQuA'; 'gsm8k/test.jsonl' -> 'gsm8k'; 'builtin:arithmetic' -> 'arithmetic';
    a set's first N ('AddSub/test.json@150') keeps the set's name."""
    spec, _ = split_first(spec)
    if spec.startswith("builtin:"):
        return spec.partition(":")[2]
    path = Path(spec)
    if path.suffix in (".json", ".jsonl"):
        split_file = path.stem in ("test", "train", "dev", "validation") and path.parent.name
        return path.parent.name if split_file else path.stem
    return spec.split("/")[-1].split(":")[0]


def write_results(out_dir: Path, metrics: dict, predictions: list[dict]) -> None:
    """metrics.json and predictions.jsonl, each written to a temporary name then renamed into place
    (predictions first: metrics.json never names a set whose predictions are missing)."""
    for name, text in [(PREDICTIONS_FILE, "".join(json.dumps(p) + "\n" for p in predictions)),
                       (EVAL_METRICS_FILE, json.dumps(metrics, indent=2))]:
        with atomic_file(out_dir / name) as tmp:
            tmp.write_text(text)


def wilson_interval(correct: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (good at 0 and at small n, unlike p ± z·se)."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def outcomes_text(correct: list[bool]) -> str:
    """Per-problem outcomes in set order as one string of 0 and 1: what a paired test needs, a byte a problem."""
    return "".join("1" if c else "0" for c in correct)


def mcnemar_p(first: str, second: str) -> tuple[int, int, float]:
    """(problems only `first` got right, only `second` got right, the exact two-sided McNemar p) over the same
    problems (outcome strings of equal length)."""
    if len(first) != len(second):
        raise ValueError(f"outcomes of {len(first)} and {len(second)} problems: not the same problems")
    gained = sum(a == "1" and b == "0" for a, b in zip(first, second))
    lost = sum(a == "0" and b == "1" for a, b in zip(first, second))
    n = gained + lost
    if n == 0:
        return 0, 0, 1.0
    tail = sum(math.comb(n, k) for k in range(min(gained, lost) + 1)) / 2**n
    return gained, lost, min(1.0, 2 * tail)
