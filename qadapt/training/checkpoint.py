"""Full checkpoints: everything a run needs to continue exactly where it stopped.

    checkpoints/step-000100/
      adapter.safetensors, adapter_config.json   the adapter, loadable like RUN/adapter
      optimizer.pt          the optimizer's state: tensors and numbers only, read with weights_only=True
      rng_state.pt          python, numpy, torch (and CUDA) generator states, one entry per process
      recipe.yaml           the resolved recipe the run was trained with
      trainer_state.json    step, data position, losses so far, and every file's size and sha256

A checkpoint is written under a temporary name, synced and renamed into place (qadapt.files), and
trainer_state.json is written last inside it. One that does not match its own trainer_state.json (cut
short, truncated, bit-flipped) is not used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qadapt.console import say
from qadapt.errors import QadaptError
from qadapt.files import atomic_folder, human_size, write_errors_reported
from qadapt.recipe import Recipe, recipe_from_dict, save_recipe
from qadapt.run_dir import write_adapter_files
from qadapt.run_files import CHECKPOINT_PREFIX, CHECKPOINTS_DIR, OPTIMIZER_FILE, RECIPE_FILE, RNG_FILE, STATE_FILE


@dataclass
class Progress:
    """Where a run stands after `step` optimizer steps."""
    step: int = 0
    examples_seen: int = 0  # per process: the position in the seeded data order
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    cpu_s: float = 0.0  # CPU time of the training loop (all threads): unlike wall time, not stretched by other work
    losses: list[float] = field(default_factory=list)
    eval_loss_before: float | None = None
    eval_loss: float | None = None
    data_sha256: str = ""  # the tokenized training rows, so a changed data file is noticed
    num_processes: int = 1
    loss_scale_state: dict | None = None  # fp16's GradScaler (scale, growth tracker); None for bf16 and fp32


def checkpoint_folder(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / f"{CHECKPOINT_PREFIX}{step:06d}"


def save_checkpoint(folder: Path, model, optimizer_state: dict, progress: Progress, recipe: Recipe,
                    wrapped: list[str], base: dict, rng_states: list[dict], weights: dict | None = None) -> Path:
    """Write a complete checkpoint to `folder` atomically; a full disk leaves nothing behind.

    `weights`: the adapter's weights when the model does not hold them whole (FSDP), else taken from it.
    """
    try:
        with write_errors_reported(folder, "nothing half-written was left"), atomic_folder(folder) as tmp:
            write_adapter_files(tmp, model, recipe, wrapped, base, weights)
            torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
            torch.save(rng_states, tmp / RNG_FILE)
            save_recipe(recipe, tmp / RECIPE_FILE)
            files = {f.name: {"bytes": f.stat().st_size, "sha256": _file_sha256(f)} for f in sorted(tmp.iterdir())}
            state = {**dataclasses.asdict(progress), "files": files}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    except QadaptError as error:  # only now look for the last good one: that hashes its files
        latest = latest_checkpoint(folder.parent.parent, warn=False)
        raise QadaptError(f"{error}; the last complete checkpoint is {latest or 'none'}") from None
    return folder


def problem_with(folder: Path) -> str | None:
    """Why `folder` is not a usable checkpoint, or None when every file matches trainer_state.json."""
    try:
        state = json.loads((folder / STATE_FILE).read_text())
        files = state["files"]
        for name in (OPTIMIZER_FILE, RNG_FILE, RECIPE_FILE, "adapter.safetensors", "adapter_config.json"):
            if name not in files:
                return f"{STATE_FILE} does not list {name}"
        for name, expected in files.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != expected["bytes"]:
                return f"{name} has {path.stat().st_size} bytes, not {expected['bytes']}"
            if _file_sha256(path) != expected["sha256"]:
                return f"{name} does not match its recorded sha256"
    except FileNotFoundError:
        return f"it has no {STATE_FILE} (cut short)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{STATE_FILE} is unreadable ({type(exc).__name__}: {exc})"
    return None


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders, oldest first (temporary folders of an unfinished save excluded)."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    steps = {p: p.name.removeprefix(CHECKPOINT_PREFIX) for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()}
    return sorted((p for p, step in steps.items() if step.isdigit()), key=lambda p: int(steps[p]))


def latest_checkpoint(run_dir: Path, warn: bool = True) -> Path | None:
    """The newest complete checkpoint; each newer broken one is skipped with a warning saying why."""
    for folder in reversed(checkpoints(run_dir)):
        problem = problem_with(folder)
        if problem is None:
            return folder
        if warn:
            say(f"skipping checkpoint {folder}: {problem}", warning=True)
    return None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, and leftovers of saves a crash cut short."""
    for folder in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(folder, ignore_errors=True)
    for leftover in (Path(run_dir) / CHECKPOINTS_DIR).glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def read_progress(folder: Path) -> Progress:
    state = json.loads((folder / STATE_FILE).read_text())
    names = {f.name for f in dataclasses.fields(Progress)}
    return Progress(**{key: value for key, value in state.items() if key in names})


def read_recipe(folder: Path) -> Recipe:
    import yaml

    return recipe_from_dict(yaml.safe_load((folder / RECIPE_FILE).read_text()) or {}, source=str(folder / RECIPE_FILE))


def load_tensors(path: Path):
    """A torch file of tensors, numbers and containers. Anything else (pickled code) is refused, not run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise QadaptError(f"{path} holds more than tensors and numbers; refusing to unpickle it "
                          f"({first_line})") from None


def rng_state() -> dict:
    """This process's random generator states: python, numpy, torch CPU and CUDA."""
    _, words, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": [list(words), gauss],
        "numpy": [torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    words, gauss = state["python"]
    random.setstate((3, tuple(words), gauss))
    keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_bytes(trainable_bytes: int, optimizer: str) -> int:
    """Size of one checkpoint: the adapter, and the optimizer's two moments (fp32, or 8-bit + block scales)."""
    moments = 2 * trainable_bytes // 4 if "8bit" in optimizer else 2 * trainable_bytes
    return trainable_bytes + moments + 64 * 1024


def require_disk_space(run_dir: Path, trainable_bytes: int, optimizer: str, keep: int, saving: bool) -> None:
    """Fail before training when the disk cannot hold the checkpoints (one more while a new one is written)."""
    each = checkpoint_bytes(trainable_bytes, optimizer)
    needed = trainable_bytes + ((keep + 1) * each if saving else 0)
    needed += needed // 10 + 16 * 2**20  # metrics, eval outputs and room to breathe
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        what = f"{keep + 1} checkpoints of {human_size(each)} and the adapter" if saving else "the adapter"
        raise QadaptError(
            f"not enough disk space for {run_dir}: {human_size(free)} free, the run needs about {human_size(needed)} "
            f"({what}); free some space, lower train.keep_checkpoints, or choose another output_dir"
        )


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
