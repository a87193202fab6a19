"""The tasks a run can learn, by the name a recipe's `task:` gives.

This registry is the one place a task name is looked up; everything else asks the task object
(qadapt.tasks.base.Task). Adding a task is one new module with a Task subclass and one line in TASKS
(and its name in the recipe schema's `Task`).
"""

from __future__ import annotations

from qadapt.errors import QadaptError
from qadapt.tasks.base import EvalOptions, LoadedModel, StepSource, Task, TrainingData
from qadapt.tasks.causal_lm import CausalLM
from qadapt.tasks.grpo import GRPO
from qadapt.tasks.preference import Preference
from qadapt.tasks.token_classification import TokenClassification

TASKS: dict[str, Task] = {task.name: task for task in (CausalLM(), TokenClassification(), GRPO(), Preference())}
# A bare model, and an adapter saved before adapters recorded their task, answer prompts.
DEFAULT_TASK = TASKS[CausalLM.name]


def task_named(name: str) -> Task:
    if name not in TASKS:
        raise QadaptError(f"task {name!r} is not one of {', '.join(TASKS)}")
    return TASKS[name]


def task_of_adapter(config: dict) -> Task:
    """The task an adapter_config.json was trained for."""
    return task_named(config["task"]) if config.get("task") else DEFAULT_TASK


def task_of_target(target) -> Task:
    """The task of a run directory (its recipe's; a path or a qadapt.run_dir.RunDir); a bare model is a
    causal LM."""
    from qadapt.run_dir import run_of

    run = run_of(target)
    return task_named(run.trained_recipe.task) if run is not None else DEFAULT_TASK


__all__ = ["DEFAULT_TASK", "EvalOptions", "LoadedModel", "StepSource", "TASKS", "Task", "TrainingData", "task_named",
           "task_of_adapter", "task_of_target"]
