"""Run directories describe themselves: eval, merge, export and resume need nothing else.

`RunDir` is the one owner of a run directory: the only code that knows its layout, and it reads each of
its files once. `AdapterFolder` is an adapter's two files (RUN/adapter, each checkpoint, an imported or
exported adapter). Loading a trained model from a run is qadapt.inference.loader's; what a checkpoint
holds beyond the adapter is qadapt.training.checkpoint's. Folders are written under a temporary name and
renamed into place, so none is ever half-written.

    <output_dir>/
      recipe.yaml                      the resolved recipe (overrides applied)
      chat_template.jinja              the chat template a data.template: chat run trained with
      adapter/                         the final adapter
        adapter.safetensors            adapter weights only, fp32, named as in the model (and a trained head)
        adapter_config.json            kind, options, wrapped modules, base model (and the head's labels)
      checkpoints/step-000100/         a full checkpoint every train.save_every steps
        adapter.safetensors, adapter_config.json, recipe.yaml
        optimizer.pt, rng_state.pt, trainer_state.json
      metrics.jsonl                    one JSON row per logged step / eval loss (the training log)
      summary.json                     the run's figures, written when it finishes
      status.json                      training / finished / interrupted / failed, the process and times
                                       (qadapt.run_state)
      eval/                            scores of the recipe's eval sets, or of `qadapt eval RUN`
        metrics.json, predictions.jsonl
      eval-calculator/                 the same, decoded with `qadapt eval --calculator`
      tensorboard/                     with train.report_to: [tensorboard]

Reading a run imports no torch: the report, the sweep and the tools read runs without loading a model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from functools import cached_property
from pathlib import Path
from typing import Callable

from qadapt.errors import QadaptError
from qadapt.files import atomic_folder, write_errors_reported
from qadapt.recipe import Recipe, load_recipe, save_recipe

EVAL_METRICS_FILE = "metrics.json"  # in an eval folder (RUN/eval, or runs/eval/MODEL-QUANT for a bare model)
PREDICTIONS_FILE = "predictions.jsonl"
CALCULATOR_SUFFIX = "-calculator"  # FOLDER-calculator: decoded with qadapt.decoding.calculator, apart


class AdapterFolder:
    """An adapter's weights and config, side by side in one folder."""

    WEIGHTS = "adapter.safetensors"
    CONFIG = "adapter_config.json"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def weights_file(self) -> Path:
        return self.path / self.WEIGHTS

    @property
    def config_file(self) -> Path:
        return self.path / self.CONFIG

    def has_config(self) -> bool:
        return self.config_file.is_file()

    @cached_property
    def config(self) -> dict:
        """adapter_config.json, read once."""
        if not self.config_file.is_file():
            raise QadaptError(f"no adapter config at {self.config_file}")
        return json.loads(self.config_file.read_text())

    def weights(self) -> dict:
        """The adapter's tensors, by the names they have in the model."""
        from safetensors.torch import load_file

        if not self.weights_file.is_file():
            raise QadaptError(f"no adapter weights at {self.weights_file}")
        return load_file(self.weights_file)

    def write(self, model, recipe: Recipe, wrapped: list[str], base: dict | None, state: dict | None = None) -> None:
        """Adapter weights (`state`, else the model's) and config, written into this existing folder."""
        from safetensors.torch import save_file

        from qadapt.adapters import adapter_state_dict, has_token_classifier

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
        save_file(adapter_state_dict(model) if state is None else state, self.weights_file)
        self.config_file.write_text(json.dumps(config, indent=2))

    def save(self, model, recipe: Recipe, wrapped: list[str], base: dict | None = None,
             state: dict | None = None) -> Path:
        """Write weights and config to this folder atomically."""
        with atomic_folder(self.path) as tmp:
            AdapterFolder(tmp).write(model, recipe, wrapped, base, state)
        return self.path

    def load_into(self, model, base: dict | None = None) -> None:
        """Load the weights into a model that already has the same adapters attached.

        `base` is the identity of the base the model was loaded from; an adapter trained on another is refused.
        """
        from qadapt.adapters import load_adapter_state_dict

        weights = self.weights()
        self.check_base(base)
        load_adapter_state_dict(model, weights)

    def check_base(self, base: dict | None) -> None:
        """Refuse an adapter trained on another base than `base` (the identity the model was loaded with)."""
        from qadapt.base_identity import check_same_base

        if base is not None and self.has_config():
            check_same_base(self.config.get("base_identity"), base, str(self.path))


class CheckpointFolder:
    """checkpoints/step-NNNNNN/: the adapter, the optimizer's state, the random generators, the recipe and
    trainer_state.json (the training's progress and every file's size and sha256), written last.

    A checkpoint is written under a temporary name, synced and renamed into place, and one that does not
    match its own trainer_state.json (cut short, truncated, bit-flipped) is not used.
    """

    OPTIMIZER = "optimizer.pt"  # tensors and numbers only, read with weights_only=True
    RNG = "rng_state.pt"  # one entry per process
    TASK_STATE = "task_state.pt"  # one entry per process: what the task carries from step to step (optional)
    RECIPE = "recipe.yaml"
    STATE = "trainer_state.json"
    FILES = (OPTIMIZER, RNG, RECIPE, AdapterFolder.WEIGHTS, AdapterFolder.CONFIG)

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return str(self.path)

    @property
    def adapter(self) -> AdapterFolder:
        return AdapterFolder(self.path)

    def write(self, model, recipe: Recipe, wrapped: list[str], base: dict, optimizer_state: dict,
              rng_states: list[dict], progress: dict, weights: dict | None = None,
              task_states: list[dict] | None = None) -> None:
        """Write the whole checkpoint atomically; a full disk leaves nothing behind."""
        import torch

        with write_errors_reported(self.path, "nothing half-written was left"), atomic_folder(self.path) as tmp:
            AdapterFolder(tmp).write(model, recipe, wrapped, base, weights)
            torch.save(optimizer_state, tmp / self.OPTIMIZER)
            torch.save(rng_states, tmp / self.RNG)
            if task_states and any(task_states):
                torch.save(task_states, tmp / self.TASK_STATE)
            save_recipe(recipe, tmp / self.RECIPE)
            files = {f.name: {"bytes": f.stat().st_size, "sha256": file_sha256(f)} for f in sorted(tmp.iterdir())}
            (tmp / self.STATE).write_text(json.dumps({**progress, "files": files}, indent=1))

    def problem(self) -> str | None:
        """Why this is not a usable checkpoint, or None when every file matches trainer_state.json."""
        try:
            files = self.state()["files"]
            for name in self.FILES:
                if name not in files:
                    return f"{self.STATE} does not list {name}"
            for name, expected in files.items():
                path = self.path / name
                if not path.is_file():
                    return f"{name} is missing"
                if path.stat().st_size != expected["bytes"]:
                    return f"{name} has {path.stat().st_size} bytes, not {expected['bytes']}"
                if file_sha256(path) != expected["sha256"]:
                    return f"{name} does not match its recorded sha256"
        except FileNotFoundError:
            return f"it has no {self.STATE} (cut short)"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"{self.STATE} is unreadable ({type(exc).__name__}: {exc})"
        return None

    def state(self) -> dict:
        """trainer_state.json: the progress the checkpoint was written at, and its files."""
        return json.loads((self.path / self.STATE).read_text())

    def recipe(self) -> Recipe:
        import yaml

        from qadapt.recipe import recipe_from_dict

        path = self.path / self.RECIPE
        return recipe_from_dict(yaml.safe_load(path.read_text()) or {}, source=str(path))

    def tensors(self, name: str):
        """optimizer.pt, rng_state.pt or task_state.pt: tensors, numbers and containers. Anything else (pickled code) is
        refused, not run."""
        import pickle

        import torch

        path = self.path / name
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            first_line = str(exc).strip().splitlines()[0]
            raise QadaptError(f"{path} holds more than tensors and numbers; refusing to unpickle it "
                              f"({first_line})") from None


class RunDir:
    """One run directory, from its path; each file is read once, on first use."""

    RECIPE = "recipe.yaml"
    CHAT_TEMPLATE = "chat_template.jinja"
    ADAPTER = "adapter"
    CHECKPOINTS = "checkpoints"
    CHECKPOINT_PREFIX = "step-"
    TRAINING_LOG = "metrics.jsonl"
    SUMMARY = "summary.json"
    STATUS = "status.json"
    EVAL = "eval"
    TENSORBOARD = "tensorboard"
    # What a run writes: `train --overwrite` removes these, and nothing else in the folder.
    OUTPUTS = (RECIPE, CHAT_TEMPLATE, ADAPTER, CHECKPOINTS, TRAINING_LOG, SUMMARY, STATUS, EVAL,
               EVAL + CALCULATOR_SUFFIX, TENSORBOARD)

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # --- where things are ---
    @property
    def recipe_file(self) -> Path:
        return self.path / self.RECIPE

    @property
    def chat_template_file(self) -> Path:
        return self.path / self.CHAT_TEMPLATE

    @cached_property
    def adapter(self) -> AdapterFolder:
        return AdapterFolder(self.path / self.ADAPTER)

    @property
    def training_log(self) -> Path:
        return self.path / self.TRAINING_LOG

    @property
    def summary_file(self) -> Path:
        return self.path / self.SUMMARY

    @property
    def status_file(self) -> Path:
        return self.path / self.STATUS

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / self.TENSORBOARD

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / self.CHECKPOINTS

    def eval_dir(self, calculator: bool = False) -> Path:
        """Where the run's scores go: RUN/eval, or RUN/eval-calculator for answers decoded with the calculator."""
        return self.path / (self.EVAL + (CALCULATOR_SUFFIX if calculator else ""))

    def checkpoint(self, step: int) -> CheckpointFolder:
        return CheckpointFolder(self.checkpoints_dir / f"{self.CHECKPOINT_PREFIX}{step:06d}")

    # --- what it is ---
    def is_run(self) -> bool:
        """A run directory (it has its recipe), finished or not."""
        return self.recipe_file.is_file()

    def finished(self) -> bool:
        return self.summary_file.is_file()

    def scores(self, calculator: bool = False) -> dict | None:
        """eval/metrics.json, or None when the run has not been scored."""
        path = self.eval_dir(calculator) / EVAL_METRICS_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    @cached_property
    def recipe(self) -> Recipe:
        """The run's recipe, read once; a clear error for a folder that is not a run."""
        if not self.is_run():
            raise QadaptError(f"{self.path} is not a run directory: it has no {self.RECIPE}")
        return load_recipe(self.recipe_file)

    @property
    def trained_recipe(self) -> Recipe:
        """The recipe of a run that has its adapter (what eval, merge and export load); a clear error else."""
        recipe = self.recipe
        if not self.adapter.weights_file.is_file():
            raise QadaptError(f"run directory {self.path} has no {self.ADAPTER}/ yet: the run has not finished")
        return recipe

    @cached_property
    def summary(self) -> dict:
        return json.loads(self.summary_file.read_text())

    def checkpoints(self) -> list[CheckpointFolder]:
        """The run's checkpoint folders, oldest first (temporary folders of an unfinished save excluded)."""
        steps = {p: p.name.removeprefix(self.CHECKPOINT_PREFIX)
                 for p in self.checkpoints_dir.glob(f"{self.CHECKPOINT_PREFIX}*") if p.is_dir()}
        return [CheckpointFolder(p) for p in sorted((p for p, step in steps.items() if step.isdigit()),
                                                    key=lambda p: int(steps[p]))]

    def has_checkpoints(self) -> bool:
        return any(self.checkpoints_dir.glob(self.CHECKPOINT_PREFIX + "*"))

    def latest_checkpoint(self, warn: bool = True) -> CheckpointFolder | None:
        """The newest complete checkpoint; each newer broken one is skipped with a warning saying why."""
        from qadapt.console import say

        for folder in reversed(self.checkpoints()):
            problem = folder.problem()
            if problem is None:
                return folder
            if warn:
                say(f"skipping checkpoint {folder.path}: {problem}", warning=True)
        return None

    def prune_checkpoints(self, keep: int) -> None:
        """Delete all but the newest `keep` checkpoints, and leftovers of saves a crash cut short."""
        for folder in self.checkpoints()[:-keep]:
            shutil.rmtree(folder.path, ignore_errors=True)
        for leftover in self.checkpoints_dir.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def truncate_training_log(self, step: int) -> None:
        """Drop metrics rows logged after `step`: a resumed run logs those steps again."""
        if not self.training_log.is_file():
            return
        kept = []
        for line in self.training_log.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a row cut short by the crash
        self.training_log.write_text("".join(kept))

    # --- writing ---
    @classmethod
    def create(cls, recipe: Recipe, resuming: bool = False, overwrite: bool = False) -> RunDir:
        """Make the output directory and prove it writable, before any model is loaded.

        A directory holding a run is never overwritten silently: a finished one needs `overwrite`, an
        unfinished one `resume` (continue it) or `overwrite` (start again).
        """
        run = cls(recipe.output_dir)
        if not resuming and not overwrite:
            run._refuse_existing_run()
        if overwrite:
            for name in cls.OUTPUTS:
                target = run.path / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        try:
            run.path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=run.path):
                pass
        except OSError as exc:
            raise QadaptError(f"output_dir {run.path} is not writable: {exc.strerror or exc}") from None
        save_recipe(recipe, run.recipe_file)
        if not resuming:  # rows of an earlier attempt that never reached a checkpoint
            run.training_log.unlink(missing_ok=True)
        return run

    def _refuse_existing_run(self) -> None:
        if self.finished():
            raise QadaptError(f"output_dir {self.path} already holds a finished run ({self.SUMMARY}); choose "
                              "another output_dir, or pass --overwrite to replace it")
        if self.has_checkpoints() or (self.path / self.ADAPTER).is_dir():
            raise QadaptError(f"output_dir {self.path} holds an unfinished run; pass --resume to continue it, or "
                              "--overwrite to start again")


def file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def adapter_folder_of(path: str | Path) -> AdapterFolder:
    """The adapter a path names: a run directory's, or an adapter folder itself."""
    run = RunDir(path)
    return run.adapter if run.adapter.path.is_dir() else AdapterFolder(run.path)


class MetricsLog:
    """Appends one JSON row per call to metrics.jsonl, flushed so a crash keeps what was logged; then
    hands the row to `also` (the experiment trackers, qadapt.training.trackers)."""

    def __init__(self, run_dir: str | Path, also: Callable[[dict], None] | None = None):
        self.file = open(RunDir(run_dir).training_log, "a")
        self.also = also

    def log(self, row: dict) -> None:
        with write_errors_reported(Path(self.file.name), "free some space, then continue with --resume"):
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        if self.also is not None:
            self.also(row)

    def close(self) -> None:
        self.file.close()


def run_of(target: str | Path | RunDir) -> RunDir | None:
    """The run directory a target names (the same object when given one), or None for anything else."""
    if isinstance(target, RunDir):
        return target
    run = RunDir(target)
    return run if run.is_run() else None
