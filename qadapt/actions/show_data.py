"""`qadapt data`: the first training examples as the model sees them, the trained tokens marked.

The rows are the run's own: read, templated, tokenized, masked and split by the recipe's task exactly as
`qadapt train` would, without loading the model. Each example becomes segments of consecutive tokens
that are all trained or all not, decoded; users check their loss masks here before a long run.
"""

from __future__ import annotations

import json

from qadapt.data import IGNORE_INDEX
from qadapt.recipe import Recipe
from qadapt.tasks import task_named

COLOUR = ("\033[32m", "\033[0m")  # trained text in green on a terminal
BRACKETS = ("[[", "]]")  # elsewhere, trained text in double brackets


def show_data(recipe: Recipe, show: int, as_json: bool = False, colour: bool = False) -> str:
    """`qadapt data`: the view as text (or JSON); what reading the data says goes to stderr, beside it."""
    import sys
    from contextlib import redirect_stdout

    with redirect_stdout(sys.stderr):
        view = data_view(recipe, show)
    return to_json(view) if as_json else format_view(view, colour)


def data_view(recipe: Recipe, show: int) -> dict:
    """{"examples": [{"segments": [{"text", "trained"}, ...]}, ...], "counts": {...}} of the first `show`."""
    task = task_named(recipe.task)
    tokenizer = task.run_tokenizer(recipe)
    data = task.training_data(recipe, tokenizer)
    rows = data.train_rows
    sides = [row for row in rows] + [_rejected(row) for row in rows if "rejected_input_ids" in row]
    counts = {
        "examples": len(rows), "held_out": len(data.val_rows),
        "tokens": sum(len(r["input_ids"]) for r in sides),
        "trained_tokens": sum(label != IGNORE_INDEX for r in sides for label in r["labels"]),
        "cut": data.cut, "dropped": data.dropped,
    }
    return {"examples": [_example(row, tokenizer) for row in rows[:show]], "counts": counts}


def _example(row: dict, tokenizer) -> dict:
    """A row's segments; a preference pair's chosen side, and its rejected side beside it."""
    example = {"segments": segments(row["input_ids"], row["labels"], tokenizer)}
    if "rejected_input_ids" in row:
        example["rejected_segments"] = segments(row["rejected_input_ids"], row["rejected_labels"], tokenizer)
    return example


def _rejected(row: dict) -> dict:
    return {"input_ids": row["rejected_input_ids"], "labels": row["rejected_labels"]}


def segments(input_ids: list[int], labels: list[int], tokenizer) -> list[dict]:
    """The tokens in runs of the same trained flag, each run decoded."""
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(input_ids, labels):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(token)
        else:
            runs.append((trained, [token]))
    return [{"text": tokenizer.decode(ids), "trained": trained} for trained, ids in runs]


def format_view(view: dict, colour: bool) -> str:
    start, end = COLOUR if colour else BRACKETS
    blocks = []
    def marked_text(parts: list[dict]) -> str:
        return "".join(f"{start}{s['text']}{end}" if s["trained"] else s["text"] for s in parts)

    for number, example in enumerate(view["examples"], 1):
        if "rejected_segments" in example:  # a preference pair
            blocks.append(f"--- example {number}: chosen ---\n{marked_text(example['segments'])}")
            blocks.append(f"--- example {number}: rejected ---\n{marked_text(example['rejected_segments'])}")
        else:
            blocks.append(f"--- example {number} ---\n{marked_text(example['segments'])}")
    c = view["counts"]
    marked = "green" if colour else f"{start}...{end}"
    blocks.append(f"--- {c['examples']:,} training examples ({c['held_out']:,} held out), {c['tokens']:,} tokens, "
                  f"{c['trained_tokens']:,} trained ({marked}); {c['cut']:,} cut at the cut-off, {c['dropped']:,} "
                  "dropped ---")
    return "\n".join(blocks)


def to_json(view: dict) -> str:
    return json.dumps(view, ensure_ascii=False, indent=1)
