"""Resuming a run: which checkpoint, whether the recipe and data still match it, and restoring its state.

A resumed run continues exactly: the adapter, optimizer moments, random generators and the position in
the seeded data order are those of the uninterrupted run at that step, so every later loss is the same.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from pathlib import Path

from safetensors.torch import load_file

from qadapt.training import distributed
from qadapt.base_identity import check_same_base
from qadapt.training.checkpoint import (
    OPTIMIZER_FILE,
    RNG_FILE,
    Progress,
    latest_checkpoint,
    load_tensors,
    problem_with,
    read_progress,
    read_recipe,
    set_rng_state,
)
from qadapt.console import say
from qadapt.errors import QadaptError
from qadapt.recipe import Recipe, recipe_differences, training_differences
from qadapt.run_dir import load_adapter, read_adapter_config
from qadapt.run_files import ADAPTER_WEIGHTS, CHECKPOINTS_DIR, SUMMARY_FILE, TRAINING_LOG

LATEST = "latest"
# Keys that change what is logged, saved or scored, never a number the training computes.


def find_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint `--resume` means: the latest complete one in `run_dir`, or the folder given.

    None when `run_dir` has none yet: the run starts from step 0 (so `--resume` can always be passed).
    """
    if resume != LATEST:
        folder = Path(resume).expanduser()
        if (folder / CHECKPOINTS_DIR).is_dir():  # a run directory: its latest checkpoint
            return find_checkpoint(folder, LATEST)
        if not folder.is_dir():
            raise QadaptError(f"checkpoint not found: {folder}")
        problem = problem_with(folder)
        if problem:
            raise QadaptError(f"cannot resume from {folder}: {problem}")
        return folder
    if (run_dir / SUMMARY_FILE).is_file():
        raise QadaptError(f"the run in {run_dir} has finished ({SUMMARY_FILE}); nothing to resume. Pass "
                          "--overwrite to train it again, or choose another output_dir")
    found = latest_checkpoint(run_dir)
    if found is None:
        say(f"resume: no complete checkpoint in {run_dir / CHECKPOINTS_DIR} yet; starting from step 0")
    return found


def check_recipe(folder: Path, recipe: Recipe, allow_changes: bool) -> None:
    """Refuse to resume with a recipe that trains differently from the checkpoint's, unless allowed."""
    trained = read_recipe(folder)
    changes = recipe_differences(trained, recipe)
    lines = [f"  {key}: {old!r} -> {new!r}" for key, old, new in changes]
    if training_differences(trained, recipe) and not allow_changes:
        raise QadaptError(f"the recipe differs from the one checkpoint {folder} was trained with:\n"
                          + "\n".join(lines) + "\nresuming would not continue the same run; undo the changes, or "
                          "pass --allow-recipe-changes to continue with the new values")
    if changes:
        say(f"resume: recipe changes since {folder.name}:\n" + "\n".join(lines))


def restore(folder: Path, model, optimizer, base: dict, train_rows: list[dict], accelerator,
            allow_changes: bool) -> Progress:
    """Load the checkpoint's adapter, optimizer and random state into a freshly set-up run."""
    progress = read_progress(folder)
    data_sha256 = rows_sha256(train_rows)
    if progress.data_sha256 != data_sha256 and not allow_changes:
        raise QadaptError(f"the training data differs from what checkpoint {folder} was trained on (was the "
                          "data file changed?); pass --allow-recipe-changes to continue on the new data")
    if progress.num_processes != accelerator.num_processes and not allow_changes:
        raise QadaptError(f"checkpoint {folder} was written by {progress.num_processes} processes, this run has "
                          f"{accelerator.num_processes}: the data order would differ; pass --allow-recipe-changes "
                          "to continue anyway")
    if distributed.is_sharded(model):
        check_same_base(read_adapter_config(folder).get("base_identity"), base, str(folder))
        distributed.load_adapter_weights(model, load_file(folder / ADAPTER_WEIGHTS))
    else:
        load_adapter(accelerator.unwrap_model(model), folder, base)
    distributed.load_optimizer_state(model, optimizer, load_tensors(folder / OPTIMIZER_FILE))
    rng_states = load_tensors(folder / RNG_FILE)
    if accelerator.process_index < len(rng_states):
        set_rng_state(rng_states[accelerator.process_index])
    progress.data_sha256, progress.num_processes = data_sha256, accelerator.num_processes
    say(f"resume: continuing from {folder} (step {progress.step})")
    return progress


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics rows logged after `step`: the resumed run logs those steps again."""
    path = run_dir / TRAINING_LOG
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a row cut short by the crash
    path.write_text("".join(kept))


def rows_sha256(rows: list[dict]) -> str:
    """A hash of the tokenized training rows (ids and loss mask)."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(array("q", row["input_ids"]).tobytes())
        digest.update(array("q", row["labels"]).tobytes())
    return digest.hexdigest()
