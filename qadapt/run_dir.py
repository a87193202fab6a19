"""Run directories describe themselves: eval, merge, export and resume need nothing else.

    <output_dir>/
      recipe.yaml                      the resolved recipe (overrides applied)
      adapter/                         the final adapter
        adapter.safetensors            adapter weights only, fp32, named as in the model
        adapter_config.json            kind, options, wrapped modules, base model
      checkpoints/step-000100/         the same, every train.save_every steps
      metrics.jsonl                    one JSON row per logged step / eval
      summary.json                     the run's figures, written when it finishes

Folders are written under a temporary name and renamed into place, so none is ever half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from qadapt.adapters import adapter_state_dict, attach_adapters, load_adapter_state_dict
from qadapt.errors import QadaptError
from qadapt.recipe import Recipe, load_recipe, save_recipe

RECIPE_FILE = "recipe.yaml"
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def create_run_dir(recipe: Recipe) -> Path:
    """Make the output directory and prove it writable, before any model is loaded."""
    path = Path(recipe.output_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise QadaptError(f"output_dir {path} is not writable: {exc.strerror or exc}") from None
    save_recipe(recipe, path / RECIPE_FILE)
    (path / METRICS_FILE).unlink(missing_ok=True)
    return path


def save_adapter(model: nn.Module, folder: Path, recipe: Recipe, wrapped: list[str]) -> Path:
    """Write adapter weights and config to `folder` atomically (temporary folder, then rename)."""
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".tmp-{folder.name}-"))
    config = {
        **recipe.to_dict()["adapter"],
        "wrapped_modules": wrapped,
        "base_model": recipe.model.name,
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
    }
    save_file(adapter_state_dict(model), tmp / ADAPTER_WEIGHTS)
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    for file in tmp.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    if folder.exists():
        old = folder.with_name(f".old-{folder.name}")
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    else:
        tmp.rename(folder)
    return folder


def load_adapter(model: nn.Module, folder: Path) -> None:
    """Load saved adapter weights into a model that already has the same adapters attached."""
    from safetensors.torch import load_file

    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise QadaptError(f"no adapter weights at {weights}")
    load_adapter_state_dict(model, load_file(weights))


def load_trained_model(run_dir: str | Path, adapter: str = ADAPTER_DIR, compute_dtype: str | None = None):
    """(model, tokenizer, recipe): the run's base, quantized as trained, with its adapter loaded.

    `compute_dtype` overrides the recipe's (e.g. fp32 for answers that do not depend on the batch).
    """
    from qadapt.models import load_base, load_tokenizer
    from qadapt.quant import disable_cpu_weight_repacking

    run_dir = Path(run_dir)
    recipe = load_recipe(run_dir / RECIPE_FILE)
    if compute_dtype:
        recipe.model.compute_dtype = compute_dtype
    tokenizer = load_tokenizer(recipe.model)
    model = load_base(recipe.model)
    disable_cpu_weight_repacking(model)  # the same kernels, so the same numbers, as in training
    attach_adapters(model, recipe.adapter)
    load_adapter(model, run_dir / adapter)
    model.eval()
    return model, tokenizer, recipe


class MetricsLog:
    """Appends one JSON row per call to metrics.jsonl, flushed so a crash keeps what was logged."""

    def __init__(self, run_dir: Path, tensorboard: bool = False):
        self.file = open(run_dir / METRICS_FILE, "a")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise QadaptError("train.tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(run_dir / "tensorboard")

    def log(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()
