"""`qadapt eval`: accuracy on math sets, scored as the LLM-Adapters paper scores them.

A target is a run directory (its base, quantized as trained, with its adapter and its prompt
template), or a bare model (the embedded one, a hub id, a folder, a merged model) for the baseline.
A 4-bit base is unpacked for decoding when memory allows (unpack_for_decoding): the same numbers, faster.
Each set is decoded greedily in batches (qadapt.generation) and scored by qadapt.answers. Results:
`metrics.json` (accuracy per set) and `predictions.jsonl` (one line per problem) under the output folder.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from qadapt import answers
from qadapt.calculator import calculator_result
from qadapt.data import BUILTIN_ARITHMETIC, load_examples, prompt_text
from qadapt.errors import QadaptError
from qadapt.generation import greedy_generate
from qadapt.recipe import DType, ModelConfig, Quant, Template
from qadapt.run_files import (ADAPTER_DIR, CALCULATOR_SUFFIX, EVAL_DIR, EVAL_METRICS_FILE, PREDICTIONS_FILE,
                              RECIPE_FILE, eval_dir)
from qadapt.scores import set_name, write_results

# Where a model starts a new Alpaca turn, the answer is over (the paper's template has no stop marker).
ALPACA_STOPS = ("### Instruction", "### Input", "### Response")


@dataclass
class EvalSet:
    name: str
    records: list[dict]  # instruction, input, output, answer
    golds: list[float | str]
    multiple_choice: bool


def load_eval_set(spec: str, limit: int | None = None) -> EvalSet:
    """The first `limit` problems of a set (the test split of a built-in or hub set)."""
    records = load_examples(spec, split="test")[:limit]
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


def answer_prompts(model, tokenizer, template: str, instructions: list[str], max_new_tokens: int = 256,
                   batch_size: int = 64, on_done=None) -> list[str]:
    """Greedy answers to instructions, templated as in training, cut where a new turn would start."""
    prompts = [prompt_text({"instruction": i, "input": ""}, template, tokenizer) for i in instructions]
    return _decode(model, tokenizer, template, prompts, max_new_tokens, batch_size, on_done)


def _decode(model, tokenizer, template: str, prompts: list[str], max_new_tokens: int, batch_size: int,
            on_done=None, calculator: bool = False) -> list[str]:
    # The chat template writes its own special tokens; the Alpaca text gets the tokenizer's, as in training.
    return greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size,
                           stop_strings=ALPACA_STOPS if template == "alpaca" else (),
                           add_special_tokens=template == "alpaca", on_done=on_done,
                           calculator=calculator_result if calculator else None)


def evaluate_set(model, tokenizer, template: str, eval_set: EvalSet, batch_size: int, max_new_tokens: int,
                 strict: bool = False, on_done=None, calculator: bool = False) -> tuple[dict, list[dict]]:
    """(accuracy row, prediction rows) of one set."""
    prompts = [prompt_text(r, template, tokenizer) for r in eval_set.records]
    outputs = _decode(model, tokenizer, template, prompts, max_new_tokens, batch_size, on_done, calculator)
    predictions = []
    for prompt, output, gold in zip(prompts, outputs, eval_set.golds):
        extracted = answers.extract(output, eval_set.multiple_choice, strict)
        predictions.append({"set": eval_set.name, "prompt": prompt, "output": output, "extracted": extracted,
                            "gold": gold, "correct": answers.is_correct(extracted, gold)})
    correct = sum(p["correct"] for p in predictions)
    row = {"correct": correct, "total": len(predictions),
           "accuracy": correct / len(predictions) if predictions else 0.0,
           "no_answer": sum(p["extracted"] is None for p in predictions)}
    return row, predictions


def format_table(sets: dict[str, dict]) -> str:
    lines = ["| set | correct / total | accuracy | no answer |", "|---|---|---|---|"]
    for name, row in sets.items():
        accuracy = f"{100 * row['accuracy']:.1f}%"
        lines.append(f"| {name} | {row['correct']} / {row['total']} | {accuracy} | {row['no_answer']} |")
    return "\n".join(lines)


def run_task(target: str) -> str:
    """The task a run directory was trained for; a bare model is evaluated as a causal LM."""
    from qadapt.run_dir import load_run_recipe

    path = Path(target).expanduser()
    return load_run_recipe(path).task if (path / RECIPE_FILE).is_file() else "causal-lm"


def load_target(target: str, quant: str = "nf4", template: str | None = None, compute_dtype: str | None = None,
                unpack: bool = True):
    """(model, tokenizer, template, default output folder) of a run directory or a bare model.

    `unpack`: unpack a 4-bit base for decoding when memory allows (unpack_for_decoding).

    bf16 matmuls give slightly different results for different batch shapes, so a bf16 model's
    greedy answers can depend on which problems share its batch; compute_dtype fp32 avoids that.
    """
    from qadapt.models import load_base, load_tokenizer
    from qadapt.quant import disable_cpu_weight_repacking
    from qadapt.run_dir import load_trained_model

    for option, value, allowed in [("--quant", quant, Quant), ("--template", template, Template),
                                   ("--compute-dtype", compute_dtype, DType)]:
        if value is not None and value not in get_args(allowed):
            raise QadaptError(f"{option} {value!r} is not one of {', '.join(get_args(allowed))}")
    path = Path(target).expanduser()
    if (path / RECIPE_FILE).is_file():
        if not (path / ADAPTER_DIR).is_dir():
            raise QadaptError(f"run directory {path} has no {ADAPTER_DIR}/ yet: the run has not finished")
        task = run_task(target)
        if task != "causal-lm":
            raise QadaptError(f"{path} is a {task} run: it tags words and does not answer prompts; "
                              "score it with qadapt eval RUN_DIR --data CONLL_FILE")
        model, tokenizer, recipe = load_trained_model(path, compute_dtype=compute_dtype)
        if unpack:
            unpack_for_decoding(model)
        return model, tokenizer, template or recipe.data.template, default_output(target, quant)
    cfg = ModelConfig(name=target, quant=quant, compute_dtype=compute_dtype or "auto")
    tokenizer = load_tokenizer(cfg)
    model = load_base(cfg)
    disable_cpu_weight_repacking(model)  # the kernels training uses, so a baseline compares like with like
    model.eval()
    if unpack:
        unpack_for_decoding(model)
    return model, tokenizer, template or "alpaca", default_output(target, quant)


def default_output(target: str, quant: str = "nf4", calculator: bool = False) -> Path:
    """Where scores go without --out: RUN/eval (RUN/eval-calculator), or runs/eval/MODEL-QUANT for a bare model."""
    path = Path(target).expanduser()
    if (path / RECIPE_FILE).is_file():
        return eval_dir(path, calculator)
    return _calculator_apart(Path("runs") / EVAL_DIR / f"{path.name or target}-{quant}", calculator)


def _calculator_apart(folder: Path, calculator: bool) -> Path:
    """FOLDER-calculator for scores decoded with the calculator, never FOLDER itself."""
    return folder.with_name(folder.name + CALCULATOR_SUFFIX) if calculator else folder


def unpack_for_decoding(model, free_bytes: float | None = None) -> bool:
    """Unpack the 4-bit base (same numbers, faster decoding) when that fits in half the free memory.

    `free_bytes` defaults to what the model's device has free now. Returns whether it unpacked.
    """
    from qadapt.plan import free_memory
    from qadapt.quant import unpack_quantized_layers, unpacked_bytes

    need = unpacked_bytes(model)
    if not need:
        return False
    free = free_memory(next(model.parameters()).device) if free_bytes is None else free_bytes
    if need > free / 2:
        print(f"decoding from the packed 4-bit weights: unpacking them needs {need / 2**20:,.0f} MB, "
              f"more than half the {free / 2**20:,.0f} MB free", file=sys.stderr)
        return False
    unpack_quantized_layers(model)
    print(f"decoding with the 4-bit weights unpacked (+{need / 2**20:,.0f} MB): the same numbers, faster",
          file=sys.stderr)
    return True


def run_eval(target: str, data: list[str], limit: int | None = None, batch_size: int = 64,
             max_new_tokens: int = 256, strict: bool = False, out: Path | None = None, quant: str = "nf4",
             template: str | None = None, compute_dtype: str | None = None, loaded=None,
             resume: bool = False, calculator: bool = False) -> dict:
    """Evaluate `target` on every set in `data`; print the table; write metrics and predictions.

    Results are written after each set. `resume` keeps the sets already scored in the output folder
    with the same settings and scores only the others, so an interrupted evaluation continues.
    `calculator` writes the true results of the rationales' sums (qadapt.calculator); its results go to
    a folder of their own (RUN/eval-calculator), never beside the paper protocol's.
    A token-classification run is scored by entity F1 instead (qadapt.tagging_eval).
    """
    from tqdm import tqdm

    if loaded is None and run_task(target) == "token-classification":
        from qadapt.tagging_eval import run_tagging_eval

        return run_tagging_eval(target, data, limit, batch_size, out, compute_dtype)
    if not data:
        raise QadaptError("name at least one evaluation set with --data (a .json/.jsonl file, a hub id, or "
                          f"{BUILTIN_ARITHMETIC})")
    sets = [load_eval_set(spec, limit) for spec in data]  # read every set before loading the model
    settings = {"strict": strict, "max_new_tokens": max_new_tokens, "compute_dtype": compute_dtype,
                "calculator": calculator}
    # Known before loading, so that --resume finds earlier scores in the default folder too.
    out_dir = Path(out) if out else default_output(target, quant, calculator) if loaded is None else None
    results, predictions = _earlier_results(out_dir, settings, limit) if resume and out_dir else ({}, [])
    todo = [s for s in sets if s.name not in results]
    if not todo:
        print(f"every set is already scored in {out_dir}")
    else:
        model, tokenizer, template, default_out = loaded or load_target(target, quant, template, compute_dtype)
        if out_dir is None:  # scoring a model in memory: the folder its loader named
            out_dir = _calculator_apart(default_out, calculator)
        with tqdm(total=sum(len(s.records) for s in todo), desc="eval", unit="problem") as bar:
            for eval_set in todo:
                bar.set_postfix_str(eval_set.name)
                started, cpu_started = time.perf_counter(), time.process_time()
                row, rows = evaluate_set(model, tokenizer, template, eval_set, batch_size, max_new_tokens, strict,
                                         on_done=bar.update, calculator=calculator)
                row |= {"seconds": time.perf_counter() - started, "cpu_s": time.process_time() - cpu_started}
                results[eval_set.name] = row
                predictions += rows
                metrics = {"target": target, "template": template, **settings, "limit": limit, "sets": results}
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
