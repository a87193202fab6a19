"""Run directories describe themselves: eval, merge, export and resume need nothing else.

Creating one, saving and loading its adapter, reading its recipe, and its training log; loading a
trained model from one is qadapt.inference.loader's. The names of its files and folders are
qadapt.run_files'. Folders are written under a temporary name and renamed into place, so none is ever
half-written.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from qadapt.adapters import adapter_state_dict, has_token_classifier, load_adapter_state_dict
from qadapt.base_identity import check_same_base
from qadapt.errors import QadaptError
from qadapt.files import atomic_folder, write_errors_reported
from qadapt.recipe import Recipe, load_recipe, save_recipe
from qadapt.run_files import (ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_WEIGHTS, CHECKPOINT_PREFIX, CHECKPOINTS_DIR,
                              QADAPT_OUTPUTS, RECIPE_FILE, SUMMARY_FILE, TRAINING_LOG)

def create_run_dir(recipe: Recipe, resuming: bool = False, overwrite: bool = False) -> Path:
    """Make the output directory and prove it writable, before any model is loaded.

    A directory holding a run is never overwritten silently: a finished one needs `overwrite`, an
    unfinished one `resume` (continue it) or `overwrite` (start again).
    """
    path = Path(recipe.output_dir).expanduser()
    if not resuming and not overwrite:
        _refuse_existing_run(path)
    if overwrite:
        for name in QADAPT_OUTPUTS:
            target = path / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise QadaptError(f"output_dir {path} is not writable: {exc.strerror or exc}") from None
    save_recipe(recipe, path / RECIPE_FILE)
    if not resuming:  # rows of an earlier attempt that never reached a checkpoint
        (path / TRAINING_LOG).unlink(missing_ok=True)
    return path


def _refuse_existing_run(path: Path) -> None:
    if (path / SUMMARY_FILE).is_file():
        raise QadaptError(f"output_dir {path} already holds a finished run ({SUMMARY_FILE}); choose another "
                          "output_dir, or pass --overwrite to replace it")
    if any((path / CHECKPOINTS_DIR).glob(CHECKPOINT_PREFIX + "*")) or (path / ADAPTER_DIR).is_dir():
        raise QadaptError(f"output_dir {path} holds an unfinished run; pass --resume to continue it, or "
                          "--overwrite to start again")


def write_adapter_files(folder: Path, model: nn.Module, recipe: Recipe, wrapped: list[str],
                        base: dict | None, state: dict[str, torch.Tensor] | None = None) -> None:
    """Adapter weights (`state`, else the model's) and config, written into an existing folder."""
    from safetensors.torch import save_file

    config = {
        **recipe.to_dict()["adapter"],
        "wrapped_modules": wrapped,
        "base_model": recipe.model.name,
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "base_identity": base,
        "task": recipe.task,
    }
    if has_token_classifier(model):  # the head's outputs, in order: what each logit means
        config["labels"] = [model.config.id2label[i] for i in range(model.config.num_labels)]
    save_file(adapter_state_dict(model) if state is None else state, folder / ADAPTER_WEIGHTS)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))


def save_adapter(model: nn.Module, folder: Path, recipe: Recipe, wrapped: list[str], base: dict | None = None,
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write adapter weights and config to `folder` atomically."""
    with atomic_folder(folder) as tmp:
        write_adapter_files(tmp, model, recipe, wrapped, base, state)
    return folder


def load_adapter(model: nn.Module, folder: Path, base: dict | None = None) -> None:
    """Load saved adapter weights into a model that already has the same adapters attached.

    `base` is the identity of the base the model was loaded from; an adapter trained on another is refused.
    """
    from safetensors.torch import load_file

    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise QadaptError(f"no adapter weights at {weights}")
    if base is not None and (folder / ADAPTER_CONFIG).is_file():
        check_same_base(read_adapter_config(folder).get("base_identity"), base, str(folder))
    load_adapter_state_dict(model, load_file(weights))


def read_adapter_config(folder: Path) -> dict:
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise QadaptError(f"no adapter config at {path}")
    return json.loads(path.read_text())


def load_run_recipe(run_dir: Path) -> Recipe:
    """The recipe of a finished run; a clear error for a folder that is not one."""
    if not (run_dir / RECIPE_FILE).is_file():
        raise QadaptError(f"{run_dir} is not a run directory: it has no {RECIPE_FILE}")
    if not (run_dir / ADAPTER_DIR / ADAPTER_WEIGHTS).is_file():
        raise QadaptError(f"run directory {run_dir} has no {ADAPTER_DIR}/ yet: the run has not finished")
    return load_recipe(run_dir / RECIPE_FILE)


class MetricsLog:
    """Appends one JSON row per call to metrics.jsonl, flushed so a crash keeps what was logged; then
    hands the row to `also` (the experiment trackers, qadapt.training.trackers)."""

    def __init__(self, run_dir: Path, also: Callable[[dict], None] | None = None):
        self.file = open(run_dir / TRAINING_LOG, "a")
        self.also = also

    def log(self, row: dict) -> None:
        with write_errors_reported(Path(self.file.name), "free some space, then continue with --resume"):
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        if self.also is not None:
            self.also(row)

    def close(self) -> None:
        self.file.close()
