"""One job of a sweep, in a process of its own: `python -m qadapt.actions.sweep_job JOB.json`.

The job file names the action and its arguments (train a recipe, or score a run or a bare model); the
process calls the library (qadapt.training.train, qadapt.inference.evaluate) and leaves its outcome in
the job's result file, so the sweep reads a structured result instead of the process's screen:

    {"status": "done"}
    {"status": "failed", "error": "the one-line error"}
    {"status": "stopped", "exit_code": 143}      Ctrl-C / SIGTERM: a checkpoint was saved

A process that dies before it can write one (killed by a signal) leaves none; the sweep names the signal.
"""

from __future__ import annotations

import json
import shlex
import sys
import traceback
from pathlib import Path

from qadapt.errors import QadaptError, TrainingStopped
from qadapt.files import atomic_file


def train_job(job: dict) -> None:
    from qadapt.recipe import load_recipe
    from qadapt.training.train import train

    recipe = load_recipe(job["recipe"], job["overrides"])
    resume_command = shlex.join(["qadapt", "train", job["recipe"], *job["overrides"], "--resume"])
    # Scoring is the sweep's own job (resumable set by set), so training scores nothing.
    train(recipe, "latest" if job["resume"] else None, resume_command=resume_command, score=False)


def eval_job(job: dict) -> None:
    from qadapt.inference.evaluate import run_eval

    run_eval(job["target"], job["sets"], out=Path(job["out"]), resume=True, **job["options"])


ACTIONS = {"train": train_job, "eval": eval_job}


def run_job(job_file: Path) -> int:
    """Do the job; write its result file; return the process's exit code."""
    job = json.loads(job_file.read_text())
    try:
        ACTIONS[job["action"]](job)
        result, code = {"status": "done"}, 0
    except TrainingStopped as stopped:
        print(stopped, file=sys.stderr)
        result, code = {"status": "stopped", "exit_code": stopped.exit_code}, stopped.exit_code
    except KeyboardInterrupt:  # Ctrl-C while scoring: the sets scored so far are kept
        result, code = {"status": "stopped", "exit_code": 130}, 130
    except QadaptError as error:
        print(f"error: {error}", file=sys.stderr)
        result, code = {"status": "failed", "error": str(error)}, 2
    except Exception as bug:  # a bug: its traceback goes to the log, its last line to the sweep
        traceback.print_exc()
        result, code = {"status": "failed", "error": f"{type(bug).__name__}: {bug}"}, 1
    with atomic_file(Path(job["result"])) as tmp:
        tmp.write_text(json.dumps(result) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(run_job(Path(sys.argv[1])))
