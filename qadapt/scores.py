"""Scores, for every task: a set's name, a proportion's interval, and a scoring's metrics.json and
predictions.jsonl on disk."""

from __future__ import annotations

import json
import math
from pathlib import Path

from qadapt.files import atomic_file
from qadapt.run_files import EVAL_METRICS_FILE, PREDICTIONS_FILE

Z_95 = 1.959964  # two-sided 95% normal quantile


def set_name(spec: str) -> str:
    """'../math-eval/AQuA/test.json' -> 'AQuA'; 'gsm8k/test.jsonl' -> 'gsm8k'; 'builtin:arithmetic' -> 'arithmetic'."""
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
