"""What a full checkpoint keeps of the training, so that a run continues exactly where it stopped: its
progress (step, data position, losses), every process's random generators, and whether the disk can hold
the checkpoints. Where and how a checkpoint's files are written is qadapt.run_dir.CheckpointFolder's.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qadapt.errors import QadaptError
from qadapt.files import human_size
from qadapt.recipe import Recipe
from qadapt.run_dir import CheckpointFolder, RunDir


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


def save_checkpoint(run: RunDir, model, optimizer_state: dict, progress: Progress, recipe: Recipe,
                    wrapped: list[str], base: dict, rng_states: list[dict],
                    weights: dict | None = None, task_states: list[dict] | None = None) -> CheckpointFolder:
    """Write the checkpoint of `progress.step` (qadapt.run_dir.CheckpointFolder); a full disk leaves nothing.

    `weights`: the adapter's weights when the model does not hold them whole (FSDP), else taken from it.
    `task_states`: each process's Task.checkpoint_state.
    """
    folder = run.checkpoint(progress.step)
    try:
        folder.write(model, recipe, wrapped, base, optimizer_state, rng_states, dataclasses.asdict(progress), weights,
                     task_states)
    except QadaptError as error:  # only now look for the last good one: that hashes its files
        latest = run.latest_checkpoint(warn=False)
        raise QadaptError(f"{error}; the last complete checkpoint is {latest or 'none'}") from None
    return folder


def read_progress(folder: CheckpointFolder) -> Progress:
    names = {f.name for f in dataclasses.fields(Progress)}
    return Progress(**{key: value for key, value in folder.state().items() if key in names})


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
