"""`qadapt eval`: score a run directory or a bare model on eval sets, as the run's task scores them.

A causal-LM target (a run, a merged folder, the embedded model, a hub id) gets the LLM-Adapters paper's
accuracies (qadapt.tasks.math_sets); a token-classification run gets entity F1. The model is loaded by
qadapt.inference.loader only once the sets have been read (and, with `resume`, only if a set is left to score).
Results: `metrics.json` and `predictions.jsonl` under the output folder.
"""

from __future__ import annotations

from pathlib import Path

from qadapt.run_dir import CALCULATOR_SUFFIX, RunDir, run_of
from qadapt.tasks import EvalOptions, task_of_target


def run_eval(target: str, data: list[str], *, limit: int | None = None, batch_size: int = 64,
             max_new_tokens: int = 256, strict: bool = False, out: Path | None = None, quant: str = "nf4",
             template: str | None = None, compute_dtype: str | None = None, resume: bool = False,
             calculator: bool = False) -> dict:
    """Evaluate `target` on every set in `data`; print the table; write metrics and predictions.

    Results are written after each set. `resume` keeps the sets already scored in the output folder
    with the same settings and scores only the others, so an interrupted evaluation continues.
    `calculator` writes the true results of the rationales' sums (qadapt.decoding.calculator); its results go to
    a folder of their own (RUN/eval-calculator), never beside the paper protocol's.
    """
    from qadapt.inference.loader import load_for_scoring

    run = run_of(target)  # read once: its recipe and adapter config serve the task, the loader and the output
    task = task_of_target(run or target)
    options = EvalOptions(limit, batch_size, max_new_tokens, strict, compute_dtype, calculator, resume)
    # Known before loading, so that --resume finds earlier scores in the default folder too.
    out_dir = Path(out) if out else default_output(run or target, quant, calculator)
    return task.evaluate(target, data, options, out_dir,
                         load=lambda: load_for_scoring(run or target, quant, template, compute_dtype))


def default_output(target: str | RunDir, quant: str = "nf4", calculator: bool = False) -> Path:
    """Where scores go without --out: RUN/eval (RUN/eval-calculator), or runs/eval/MODEL-QUANT for a bare model."""
    run = run_of(target)
    if run is not None:
        return run.eval_dir(calculator)
    path = Path(target).expanduser()
    folder = Path("runs") / RunDir.EVAL / f"{path.name or target}-{quant}"
    # FOLDER-calculator for scores decoded with the calculator, never FOLDER itself.
    return folder.with_name(folder.name + CALCULATOR_SUFFIX) if calculator else folder
