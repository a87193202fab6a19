"""A run's small result files, kept apart from its weights where they can be committed (docs/results/).

A run directory holds an adapter and checkpoints (megabytes to gigabytes); what a table needs is a few
kilobytes: its recipe, summary, training log and scores (each set's per-problem outcomes included, for
paired tests). `keep_results` copies those into `INTO/<run name>/`, laid out as a run directory, so
`qadapt report` reads the copy as it reads the run, and a sweep given `--results INTO` counts a run whose
kept copy is finished, scored on every set and trained by the same recipe as done, on any machine: a table
grows across sessions and machines without its weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from qadapt.files import atomic_folder
from qadapt.run_dir import EVAL_METRICS_FILE, RunDir

KEPT_FILES = (RunDir.RECIPE, RunDir.SUMMARY, RunDir.TRAINING_LOG, f"{RunDir.EVAL}/{EVAL_METRICS_FILE}")


def keep_results(run_dir: Path, into: Path) -> Path:
    """Copy the run's (or a scored base's) result files that exist into `into/<its name>`, replacing an
    earlier copy whole; return the copy."""
    run_dir = Path(run_dir)
    dest = Path(into) / run_dir.name
    with atomic_folder(dest) as tmp:
        for name in KEPT_FILES:
            if (run_dir / name).is_file():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(run_dir / name, tmp / name)
    return dest
