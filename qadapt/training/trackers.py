"""Where a run's numbers go besides metrics.jsonl: the experiment trackers accelerate knows.

`train.report_to: [tensorboard, wandb, mlflow, ...]` names them, as every peer's `report_to` does; each
logged row goes to metrics.jsonl first (the source of truth, which resuming trims and the report reads)
and then, from the main process, to every tracker through `Accelerator.log`. The trackers read their
usual settings from the environment: WANDB_MODE=offline, MLFLOW_TRACKING_URI, COMET_API_KEY, ...
TensorBoard writes into the run directory (tensorboard/).
"""

from __future__ import annotations

from pathlib import Path

from qadapt.errors import QadaptError
from qadapt.recipe import Recipe
from qadapt.run_dir import RunDir

PROJECT = "qadapt"  # the W&B project, the MLflow experiment, the TensorBoard subfolder
PACKAGES = {"comet_ml": "comet-ml", "mlflow": "mlflow"}  # pip names that differ from the tracker's


def report_to(recipe: Recipe) -> list[str]:
    """The trackers a run reports to (`train.tensorboard: true`, the older key, means TensorBoard too)."""
    names = list(recipe.train.report_to)
    if recipe.train.tensorboard and "tensorboard" not in names:
        names.append("tensorboard")
    return names


def require_installed(names: list[str]) -> None:
    """A clear error, before anything loads, for a tracker whose package is missing (accelerate would
    leave it out without a word)."""
    from accelerate import utils

    missing = [name for name in names if not getattr(utils, f"is_{name}_available")()]
    if missing:
        packages = " ".join(PACKAGES.get(name, name) for name in missing)
        raise QadaptError(f"train.report_to {', '.join(missing)}: not installed here; pip install {packages}")


def accelerator_options(recipe: Recipe) -> dict:
    """Accelerator(...) keywords that make it report to the recipe's trackers."""
    from accelerate.utils import ProjectConfiguration

    names = report_to(recipe)
    if not names:
        return {}
    require_installed(names)
    run_dir = RunDir(recipe.output_dir).path
    return {"log_with": names, "project_config": ProjectConfiguration(project_dir=str(run_dir),
                                                                       logging_dir=str(RunDir(run_dir).tensorboard_dir))}


def start(accelerator, recipe: Recipe) -> None:
    """Open one tracker run named after the run directory, its recipe as the run's parameters."""
    if not report_to(recipe):
        return
    name = Path(recipe.output_dir).expanduser().resolve().name
    accelerator.init_trackers(PROJECT, config=flat_parameters(recipe.to_dict()),
                              init_kwargs={"wandb": {"name": name}, "mlflow": {"run_name": name},
                                           "comet_ml": {"name": name}})


def flat_parameters(tree: dict, prefix: str = "") -> dict:
    """{'train.lr': 0.001, ...}: numbers, text and flags as they are, lists as text, nulls left out (what
    every tracker's parameters accept)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_parameters(value, f"{prefix}{key}."))
        elif value is not None:
            flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def numbers(row: dict) -> dict:
    """What a tracker plots of a metrics row: its numbers (not the step, which is the x axis)."""
    return {key: value for key, value in row.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}
