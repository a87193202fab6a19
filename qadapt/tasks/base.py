"""What every task tells the rest of qadapt: the interface a task module implements.

The training loop, the evaluator, the loader and the exporters ask a run's task (qadapt.tasks.TASKS)
instead of comparing its name. A task answers:
- how its tokenizer is set up and how its training rows are read and tokenized (`training_data`);
- the model it trains: the transformers auto class, and the labels of a head it adds;
- the batches of an optimizer step (`step_batches`: rows of a data file by default; a task that makes its
  batches from rollouts of the model overrides it) and their loss (`summed_loss` over `loss_targets`);
- how a model in memory is scored on eval sets (`evaluate`), and which number the run's summary keeps;
- which exports of a trained run make sense (`exports`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from qadapt import data as data_lib
from qadapt.console import say
from qadapt.errors import QadaptError


@dataclass
class TrainingData:
    train_rows: list[dict]
    val_rows: list[dict]  # held out for the eval loss
    labels: list[str] | None  # the outputs of a head the task adds (token classification), else None
    cut: int = 0  # examples cut at data.cutoff_len
    dropped: int = 0  # examples left with nothing to learn from


@dataclass
class EvalOptions:
    """How `qadapt eval` (or the end of a run) scores: the CLI's options, for whichever task reads them."""
    limit: int | None = None
    batch_size: int = 64
    max_new_tokens: int = 256
    strict: bool = False
    compute_dtype: str | None = None
    calculator: bool = False
    resume: bool = False


@dataclass
class StepSource:
    """What a task draws an optimizer step's batches from: the run's rows, tokenizer, processes and model.

    Training builds one per run; a task that makes its batches from the model's own answers samples with
    `model`.
    """
    train_rows: list[dict]
    tokenizer: object
    accelerator: object  # accelerate's Accelerator: this process's index, the count, the device
    model: torch.nn.Module
    recipe: object  # the run's qadapt.recipe.Recipe
    step: int = 0  # the optimizer step about to be taken (0-based); the loop sets it
    val_rows: list[dict] = field(default_factory=list)  # held out for the eval loss
    state: dict = field(default_factory=dict)  # what a task keeps from step to step of one run


@dataclass
class LoadedModel:
    """A model ready to score, with what its task needs beside it."""
    model: torch.nn.Module
    tokenizer: object
    template: str  # the prompt template (a causal LM)
    cutoff_len: int | None  # the training cut-off (token classification reads sentences with it)


class Task:
    """The interface; each task module subclasses it and the registry (qadapt.tasks) names one instance."""

    name: str
    score_key: str  # the key of the final scores in summary.json: accuracy, entity_f1
    exports: frozenset[str] = frozenset()  # of "merge", "peft", "gguf"
    generates: bool  # answers prompts (qadapt generate / chat) rather than labelling tokens
    bar_metrics: tuple[str, ...] = ()  # keys of `step_metrics` the progress bar shows beside the loss

    # --- the model ---
    def load_tokenizer(self, cfg):
        raise NotImplementedError

    def run_tokenizer(self, recipe, run_dir: Path | None = None):
        """The tokenizer a run trains and answers with (`run_dir`: the run's, once it has trained)."""
        return self.load_tokenizer(recipe.model)

    def auto_class(self):
        """The transformers auto class of the model this task trains."""
        raise NotImplementedError

    def logits_head(self, model: torch.nn.Module) -> torch.nn.Module:
        """The layer that writes the logits (its width is the loss's)."""
        raise NotImplementedError

    def head_labels(self, adapter_config: dict, where: str) -> list[str] | None:
        """The labels of the head an adapter carries (in logit order), or None when the task adds none."""
        return None

    # --- training ---
    def training_data(self, recipe, tokenizer) -> TrainingData:
        raise NotImplementedError

    def step_batches(self, s: StepSource, size: int, count: int, order, group_by_length: bool = False) -> list[dict]:
        """This process's micro-batches for the next optimizer step, drawn from `s.train_rows`.

        Every process walks the same seeded order; a step takes size × count × processes examples of it
        and process r gets the r-th share, so N processes train on the batches one process would.
        """
        acc = s.accelerator
        share = size * count
        step_rows = [next(order) for _ in range(share * acc.num_processes)]
        mine = step_rows[acc.process_index * share:(acc.process_index + 1) * share]
        if group_by_length:  # longest first, so the first micro-batch shows the step's peak memory at once
            mine.sort(key=lambda i: len(s.train_rows[i]["input_ids"]), reverse=True)
        settings = self.loss_settings(s.recipe)
        return [{**to_device(self.collate([s.train_rows[i] for i in mine[k:k + size]], s.tokenizer.pad_token_id),
                             acc.device), **settings}
                for k in range(0, share, size)]

    def collate(self, rows: list[dict], pad_id: int) -> dict:
        """A micro-batch of training rows, padded (a task whose rows hold more than one sequence lays them out)."""
        return data_lib.collate(rows, pad_id)

    def loss_settings(self, recipe) -> dict:
        """What `summed_loss` reads from the recipe beside a batch's tensors (put in every training and held-out
        batch). Nothing by default."""
        return {}

    def micro_batch_shape(self, recipe) -> tuple[int, int]:
        """(rows, tokens per row) of the largest micro-batch a recipe trains on: what memory is planned for."""
        return recipe.train.micro_batch_size, recipe.data.cutoff_len

    def summed_loss(self, model, batch: dict) -> torch.Tensor:
        """The loss summed over the batch's targets, in fp32."""
        raise NotImplementedError

    def loss_targets(self, batch: dict) -> int:
        """How many targets `summed_loss` sums over."""
        raise NotImplementedError

    def step_metrics(self, micro_batches: list[dict]) -> dict:
        """What the step just trained on tells beside its loss (logged with it in metrics.jsonl)."""
        return {}

    def checkpoint_state(self, s: StepSource) -> dict:
        """What of `s.state` this process's checkpoint keeps, so that a resumed run takes the uninterrupted
        run's next steps: CPU tensors, numbers, strings and containers of them. Nothing by default."""
        return {}

    def restore_state(self, s: StepSource, saved: dict) -> None:
        """Put back into `s.state` what `checkpoint_state` kept (an empty dict from a checkpoint without it)."""
        s.state.update(saved)

    # --- scoring ---
    def evaluate(self, target: str, specs: list[str], options: EvalOptions, out: Path | None,
                 load: Callable[[], LoadedModel]) -> dict:
        """Score the model `load()` gives on every set; print the table, write metrics and predictions.

        `load` is called only once there is something to score (the sets are read first).
        """
        raise NotImplementedError

    def set_scores(self, metrics: dict) -> dict[str, float]:
        """The one number per set that a run's summary keeps (under `score_key`)."""
        raise NotImplementedError

    def set_size(self, spec: str, limit: int | None) -> int | None:
        """How many items (problems, sentences) scoring `spec` under `limit` counts: a scored set's `total`
        (or `sentences`) must equal it (None: not known without scoring it)."""
        return None

    def refuse_export(self, export: str, action: str) -> None:
        """A clear error when `export` (merge, peft, gguf; asked as `action`) does not apply to this task's runs."""
        if export not in self.exports:
            raise QadaptError(f"cannot {action} a {self.name} run: merging and export make causal language models. "
                              "Use its adapter/ folder with the base (qadapt eval RUN_DIR, load_trained_model, or "
                              "qadapt.inference.adapter_bank)")


def read_sources(sources: list[str], read) -> list:
    """The examples of every source in turn; with several, say how many each gave."""
    parts = [read(source) for source in sources]
    if len(parts) > 1:
        say("data: " + " + ".join(f"{len(part):,} from {source}" for source, part in zip(sources, parts)))
    return [example for part in parts for example in part]


def split_rows(recipe, rows: list[dict], labels: list[str] | None, cut: str, counts: tuple[int, int]) -> TrainingData:
    """Hold out the eval-loss rows, apply data.max_examples, and say what the data gave (`cut`, and as
    `counts` the examples cut and dropped)."""
    d = recipe.data
    train_rows, val_rows = data_lib.split_held_out(rows, d.val_size, seed=recipe.train.seed)
    if d.max_examples:
        train_rows = train_rows[:d.max_examples]
    if not train_rows:
        raise QadaptError(f"no training examples left in {', '.join(d.sources)} after holding out {len(val_rows)}")
    say(f"data: {len(train_rows)} training examples, {len(val_rows)} held out for eval loss; {cut}"
        + (f"; {len(labels)} labels: {', '.join(labels)}" if labels else ""))
    return TrainingData(train_rows, val_rows, labels, *counts)


def to_device(batch: dict, device) -> dict:
    return {key: value.to(device) for key, value in batch.items()}
