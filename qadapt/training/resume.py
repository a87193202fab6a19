"""Resuming a run: which checkpoint, whether the recipe and data still match it, and restoring its state.

A resumed run continues exactly: the adapter, optimizer moments, random generators and the position in
the seeded data order are those of the uninterrupted run at that step, so every later loss is the same.
"""

from __future__ import annotations

import hashlib
from array import array
from pathlib import Path

from qadapt.console import say
from qadapt.errors import QadaptError
from qadapt.recipe import Recipe, recipe_differences, training_differences
from qadapt.run_dir import CheckpointFolder, RunDir
from qadapt.training import distributed
from qadapt.training.checkpoint import Progress, read_progress, set_rng_state

LATEST = "latest"


def find_checkpoint(run_dir: str | Path, resume: str) -> CheckpointFolder | None:
    """The checkpoint `--resume` means: the latest complete one in `run_dir`, or the folder given.

    None when `run_dir` has none yet: the run starts from step 0 (so `--resume` can always be passed).
    """
    run = RunDir(run_dir)
    if resume != LATEST:
        given = RunDir(resume)
        if given.checkpoints_dir.is_dir():  # a run directory: its latest checkpoint
            return find_checkpoint(given.path, LATEST)
        if not given.path.is_dir():
            raise QadaptError(f"checkpoint not found: {given.path}")
        folder = CheckpointFolder(given.path)
        problem = folder.problem()
        if problem:
            raise QadaptError(f"cannot resume from {folder}: {problem}")
        return folder
    if run.finished():
        raise QadaptError(f"the run in {run.path} has finished ({run.SUMMARY}); nothing to resume. Pass "
                          "--overwrite to train it again, or choose another output_dir")
    found = run.latest_checkpoint()
    if found is None:
        say(f"resume: no complete checkpoint in {run.checkpoints_dir} yet; starting from step 0")
    return found


def check_recipe(folder: CheckpointFolder, recipe: Recipe, allow_changes: bool) -> None:
    """Refuse to resume with a recipe that trains differently from the checkpoint's, unless allowed."""
    trained = folder.recipe()
    changes = recipe_differences(trained, recipe)
    lines = [f"  {key}: {old!r} -> {new!r}" for key, old, new in changes]
    if training_differences(trained, recipe) and not allow_changes:
        raise QadaptError(f"the recipe differs from the one checkpoint {folder} was trained with:\n"
                          + "\n".join(lines) + "\nresuming would not continue the same run; undo the changes, or "
                          "pass --allow-recipe-changes to continue with the new values")
    if changes:
        say(f"resume: recipe changes since {folder.path.name}:\n" + "\n".join(lines))


def restore(folder: CheckpointFolder, model, optimizer, base: dict, train_rows: list[dict], accelerator,
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
        folder.adapter.check_base(base)
        distributed.load_adapter_weights(model, folder.adapter.weights())
    else:
        folder.adapter.load_into(accelerator.unwrap_model(model), base)
    distributed.load_optimizer_state(model, optimizer, folder.tensors(folder.OPTIMIZER))
    rng_states = folder.tensors(folder.RNG)
    if accelerator.process_index < len(rng_states):
        set_rng_state(rng_states[accelerator.process_index])
    progress.data_sha256, progress.num_processes = data_sha256, accelerator.num_processes
    say(f"resume: continuing from {folder} (step {progress.step})")
    return progress


def saved_task_state(folder: CheckpointFolder | None, accelerator) -> dict:
    """This process's Task.checkpoint_state from `folder` (empty when it kept none, or was written before
    checkpoints kept one)."""
    if folder is None or not (folder.path / folder.TASK_STATE).is_file():
        return {}
    states = folder.tensors(folder.TASK_STATE)
    return states[accelerator.process_index] if accelerator.process_index < len(states) else {}


def rows_sha256(rows: list[dict]) -> str:
    """A hash of the tokenized training rows (ids and loss mask, a pair's rejected side too; a problem's gold
    answer when it has one)."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(array("q", row["input_ids"]).tobytes())
        digest.update(array("q", row["labels"]).tobytes())
        for side in ("rejected_input_ids", "rejected_labels"):  # a preference pair's other answer
            if side in row:
                digest.update(array("q", row[side]).tobytes())
        if "answer" in row:
            digest.update(repr(row["answer"]).encode())
    return digest.hexdigest()
