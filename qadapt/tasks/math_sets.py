"""Math sets scored as the LLM-Adapters paper scores them: the causal-LM task's evaluation.

Each set is decoded greedily in batches (qadapt.decoding.generation) and scored by qadapt.tasks.answers. Results:
`metrics.json` (accuracy per set) and `predictions.jsonl` (one line per problem), written after each set;
with `resume`, the sets already scored in the output folder with the same settings are kept.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qadapt.conversations import end_of_turn
from qadapt.data import BUILTIN_ARITHMETIC, conversation_template, load_examples, prompt_text
from qadapt.decoding.calculator import calculator_result
from qadapt.decoding.generation import greedy_generate
from qadapt.errors import QadaptError
from qadapt.run_dir import EVAL_METRICS_FILE, PREDICTIONS_FILE
from qadapt.scores import outcomes_text, set_name, split_first, write_results
from qadapt.tasks import answers
from qadapt.text_templates import is_text_template

# Where a model starts a new Alpaca turn, the answer is over (the paper's template has no stop marker).
ALPACA_STOPS = ("### Instruction", "### Input", "### Response")


@dataclass
class EvalSet:
    name: str
    records: list[dict]  # instruction, input, output, answer
    golds: list[float | str]
    multiple_choice: bool


def load_eval_set(spec: str, limit: int | None = None, split: str = "test") -> EvalSet:
    """The first `limit` problems of a set (the `split` of a built-in or hub set); a spec 'PATH@N' takes its
    first N (the fewer of the two)."""
    path, first = split_first(spec)
    if first is not None:
        limit = first if limit is None else min(limit, first)
    records = load_examples(path, split=split)[:limit]
    if any("chosen" in r for r in records):
        raise QadaptError(f"{spec} is a set of preference pairs, not of problems with an answer; score on single "
                          "questions (builtin:word-problems, a GSM8K or LLM-Adapters file)")
    if any("messages" in r for r in records):
        raise QadaptError(f"{spec} is a set of conversations, not of problems with an answer; score on single "
                          "questions (builtin:word-problems, a GSM8K or LLM-Adapters file)")
    raw = [r["answer"].strip() for r in records]
    multiple_choice = all(len(a) == 1 and a in "ABCDE" for a in raw)
    golds: list[float | str] = []
    for index, answer in enumerate(raw, 1):
        if multiple_choice:
            golds.append(answer)
            continue
        try:
            golds.append(float(answer.replace(",", "")))
        except ValueError:
            raise QadaptError(f"{spec}: problem {index} has answer {answer!r}, not a number or a letter A-E") from None
    return EvalSet(set_name(spec), records, golds, multiple_choice)


def decode_prompts(model, tokenizer, template: str, prompts: list[str], max_new_tokens: int, batch_size: int,
            on_done=None, calculator: bool = False) -> list[str]:
    # The chat template writes its own special tokens; a text template gets the tokenizer's, as in training.
    return greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size,
                           stop_strings=stop_strings(template, tokenizer),
                           add_special_tokens=is_text_template(template), on_done=on_done,
                           calculator=calculator_result if calculator else None)


def stop_strings(template: str, tokenizer) -> tuple[str, ...]:
    """Where an answer is over: a new Alpaca turn, or the chat template's end of turn when that is not the
    EOS the decoder stops at anyway (llama3's <|eot_id|>, or a marker the tokenizer writes as text)."""
    if is_text_template(template):
        return ALPACA_STOPS
    mark = end_of_turn(tokenizer, conversation_template(template, tokenizer)[0])
    return (mark,) if mark and mark != tokenizer.eos_token else ()


def evaluate_set(model, tokenizer, template: str, eval_set: EvalSet, batch_size: int, max_new_tokens: int,
                 strict: bool = False, on_done=None, calculator: bool = False) -> tuple[dict, list[dict]]:
    """(accuracy row, prediction rows) of one set."""
    prompts = [prompt_text(r, template, tokenizer) for r in eval_set.records]
    outputs = decode_prompts(model, tokenizer, template, prompts, max_new_tokens, batch_size, on_done, calculator)
    predictions = []
    for prompt, output, gold in zip(prompts, outputs, eval_set.golds):
        extracted = answers.extract(output, eval_set.multiple_choice, strict)
        predictions.append({"set": eval_set.name, "prompt": prompt, "output": output, "extracted": extracted,
                            "gold": gold, "correct": answers.is_correct(extracted, gold)})
    correct = sum(p["correct"] for p in predictions)
    row = {"correct": correct, "total": len(predictions),
           "accuracy": correct / len(predictions) if predictions else 0.0,
           "no_answer": sum(p["extracted"] is None for p in predictions),
           "outcomes": outcomes_text([p["correct"] for p in predictions])}
    return row, predictions


def format_table(sets: dict[str, dict]) -> str:
    lines = ["| set | correct / total | accuracy | no answer |", "|---|---|---|---|"]
    for name, row in sets.items():
        accuracy = f"{100 * row['accuracy']:.1f}%"
        lines.append(f"| {name} | {row['correct']} / {row['total']} | {accuracy} | {row['no_answer']} |")
    return "\n".join(lines)


def require_sets(specs: list[str]) -> None:
    if not specs:
        raise QadaptError("name at least one evaluation set with --data (a .json/.jsonl file, a hub id, or "
                          f"{BUILTIN_ARITHMETIC})")


def score_math_sets(target: str, specs: list[str], options, out_dir: Path, load: Callable) -> dict:
    """Accuracy of the model `load()` gives on every set; `options` is a qadapt.tasks.EvalOptions."""
    from tqdm import tqdm

    require_sets(specs)
    sets = [load_eval_set(spec, options.limit) for spec in specs]  # every set read before the model loads
    settings = {"strict": options.strict, "max_new_tokens": options.max_new_tokens,
                "compute_dtype": options.compute_dtype, "calculator": options.calculator}
    results, predictions = _earlier_results(out_dir, settings, options.limit) if options.resume else ({}, [])
    # A set scored on another number of its problems (another '@N') is scored again.
    todo = [s for s in sets if results.get(s.name, {}).get("total") != len(s.records)]
    predictions = [p for p in predictions if p["set"] not in {s.name for s in todo}]
    if not todo:
        print(f"every set is already scored in {out_dir}")
    else:
        loaded = load()
        with tqdm(total=sum(len(s.records) for s in todo), desc="eval", unit="problem") as bar:
            for eval_set in todo:
                bar.set_postfix_str(eval_set.name)
                started, cpu_started = time.perf_counter(), time.process_time()
                row, rows = evaluate_set(loaded.model, loaded.tokenizer, loaded.template, eval_set,
                                         options.batch_size, options.max_new_tokens, options.strict,
                                         on_done=bar.update, calculator=options.calculator)
                row |= {"seconds": time.perf_counter() - started, "cpu_s": time.process_time() - cpu_started}
                results[eval_set.name] = row
                predictions += rows
                metrics = {"target": target, "template": loaded.template, **settings, "limit": options.limit,
                           "sets": results}
                write_results(out_dir, metrics, predictions)
    metrics = json.loads((out_dir / EVAL_METRICS_FILE).read_text())
    print(format_table(results))
    print(f"metrics and predictions: {out_dir}")
    return metrics


def _earlier_results(out_dir: Path, settings: dict, limit: int | None) -> tuple[dict, list[dict]]:
    """(set rows, predictions) already in `out_dir` from an evaluation with the same settings."""
    metrics_file, predictions_file = out_dir / EVAL_METRICS_FILE, out_dir / PREDICTIONS_FILE
    if not (metrics_file.is_file() and predictions_file.is_file()):
        return {}, []
    earlier = {"calculator": False} | json.loads(metrics_file.read_text())  # files from before the calculator
    if any(earlier.get(key) != value for key, value in {**settings, "limit": limit}.items()):
        return {}, []  # scored differently: score again
    rows = [json.loads(line) for line in predictions_file.read_text().splitlines() if line.strip()]
    return earlier["sets"], rows
