"""One training loop for every adapter kind: setup → loop (accumulate, backward, clip, step, log,
eval, checkpoint) → finish. The model comes from qadapt.training.prepare; a run resumes from its
checkpoints (qadapt.training.resume) and stops cleanly on Ctrl-C / SIGTERM (qadapt.training.stop_signals);
the loss of a step is qadapt.training.loss's, scaled for fp16 by qadapt.training.loss_scale.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from qadapt import data as data_lib
from qadapt import run_state
from qadapt.training import distributed, trackers
from qadapt.adapters import count_parameters
from qadapt.chat_templates import save_run_template
from qadapt.console import say
from qadapt.training.checkpoint import Progress, read_progress, require_disk_space, rng_state, save_checkpoint
from qadapt.devices import peak_memory_mb, start_peak_memory
from qadapt.errors import QadaptError, TrainingStopped
from qadapt.files import atomic_file, write_errors_reported
from qadapt.training.loss import accumulate_gradients, eval_loss
from qadapt.training.loss_scale import fp16_overflow, grad_scaler
from qadapt.machine import describe as describe_machine
from qadapt.models import resolve_compute_dtype
from qadapt.quant import optimizer_class, unpaged_here
from qadapt.recipe import Recipe
from qadapt.training.prepare import prepare_model
from qadapt.training.resume import check_recipe, find_checkpoint, restore, rows_sha256, saved_task_state
from qadapt.run_dir import CheckpointFolder, MetricsLog, RunDir
from qadapt.training.stop_signals import EXIT_CODES, StopSignals
from qadapt.tasks import EvalOptions, LoadedModel, StepSource, Task, TrainingData, task_named


def lr_at(step: int, max_steps: int, warmup_steps: int, peak_lr: float, schedule: str) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine/linear decay to 0.

    transformers' schedules (`get_scheduler`) to the number, as PEFT and TRL runs use them: warm-up gives
    step s the rate s/W × lr, so the first step's is 0 (Adam's moments still take its gradient).
    """
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    if schedule == "constant":
        return peak_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    if schedule == "linear":
        return peak_lr * (1.0 - progress)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class Setup:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    accelerator: object
    tokenizer: object
    train_rows: list[dict]
    val_rows: list[dict]
    task: Task  # what the run learns: its batches, its loss, its scores
    wrapped: list[str]
    base: dict  # the base model's identity, recorded with every adapter saved
    run: RunDir
    metrics: MetricsLog
    max_steps: int
    scaler: torch.amp.GradScaler  # fp16's loss scaling; with bf16 and fp32 it does nothing


def setup(recipe: Recipe, resume_step: int | None = None, overwrite: bool = False) -> Setup:
    """Everything a run needs, in the same order (so the same random numbers) for a fresh and a resumed run.

    `resume_step` is the checkpoint's step when resuming (metrics logged after it are dropped).
    """
    from accelerate.utils import set_seed

    accelerator = _accelerator(trackers.accelerator_options(recipe))
    run, metrics = _open_run_dir(recipe, accelerator, resume_step, overwrite)
    set_seed(recipe.train.seed)
    task = task_named(recipe.task)
    tokenizer = task.run_tokenizer(recipe, run.path)
    if accelerator.is_main_process and recipe.data.template == "chat":
        save_run_template(tokenizer, run.path)  # eval, chat, merge and export prompt as it trained
    data = task.training_data(recipe, tokenizer)
    sharded = distributed.is_fsdp(accelerator)
    model, wrapped, base = prepare_model(recipe, accelerator.device, data.labels, accelerator if sharded else None)
    start_peak_memory(accelerator.device)
    params = [p for p in model.parameters() if p.requires_grad]
    t = recipe.train
    require_disk_space(run.path, sum(p.numel() * p.element_size() for p in params), t.optimizer,
                       t.keep_checkpoints, saving=t.save_every > 0)
    if sharded:
        distributed.wrap_adapters_apart(accelerator, model)
    optimizer = optimizer_class(t.optimizer)(param_groups(model, recipe.adapter.lr_ratio), lr=t.lr,
                                             weight_decay=t.weight_decay)
    if (note := unpaged_here(t.optimizer, accelerator.device)) is not None:
        say(note)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    examples_per_step = t.micro_batch_size * t.grad_accum * accelerator.num_processes
    max_steps = t.max_steps or max(1, math.ceil(t.epochs * len(data.train_rows) / examples_per_step))
    scaler = grad_scaler(resolve_compute_dtype(recipe.model.compute_dtype), accelerator.device, sharded)
    if accelerator.is_main_process:
        run_state.update(run, max_steps=max_steps)
    return Setup(model, optimizer, accelerator, tokenizer, data.train_rows, data.val_rows, task,
                 wrapped, base, run, metrics, max_steps, scaler)


def param_groups(model: torch.nn.Module, lr_ratio: float) -> list[dict]:
    """The optimizer's parameter groups: one, or with LoRA+ the B matrices and the vectors (DoRA's
    magnitude) apart at lr_ratio × the lr, as PEFT's `create_loraplus_optimizer` groups them.

    `lr_scale` is each group's multiple of the scheduled learning rate.
    """
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if lr_ratio == 1:
        return [{"params": [p for _, p in trained], "lr_scale": 1.0}]
    faster = [p for name, p in trained if ".lora_b." in name or p.ndim == 1]
    ids = {id(p) for p in faster}
    rest = [p for _, p in trained if id(p) not in ids]
    return [{"params": rest, "lr_scale": 1.0}, {"params": faster, "lr_scale": lr_ratio}]


def _accelerator(options: dict):
    from accelerate import Accelerator

    try:
        # Without CUDA, cpu=True lets `accelerate launch` / torchrun give each process a gloo rank.
        return Accelerator(cpu=not torch.cuda.is_available(), **options)
    except RuntimeError as exc:
        if "no available devices" not in str(exc):
            raise
        raise QadaptError("this accelerate config shards the model with FSDP, which accelerate runs only on GPUs "
                          "(none found); without GPUs use DDP: accelerate launch --multi_gpu --num_processes N "
                          "-m qadapt train RECIPE") from None


def _open_run_dir(recipe: Recipe, accelerator, resume_step: int | None, overwrite: bool):
    """(run directory, metrics log): only the main process writes; the others check it is there."""
    if accelerator.is_main_process:
        run = RunDir.create(recipe, resuming=resume_step is not None, overwrite=overwrite)
        run_state.start(run)
        if resume_step is not None:
            run.truncate_training_log(resume_step)
        metrics = MetricsLog(run.path, also=lambda row: accelerator.log(trackers.numbers(row), step=row["step"]))
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        run, metrics = RunDir(recipe.output_dir), None
    trackers.start(accelerator, recipe)
    return run, metrics


def prepare_data(recipe: Recipe, tokenizer) -> TrainingData:
    """The run's rows as training sees them (read, tokenized, split), from its task."""
    return task_named(recipe.task).training_data(recipe, tokenizer)


@dataclass
class TrainResult:
    summary: dict  # also written to summary.json
    model: torch.nn.Module  # the trained model, adapters attached


def train(recipe: Recipe, resume: str | None = None, allow_recipe_changes: bool = False, overwrite: bool = False,
          resume_command: str = "qadapt train RECIPE --resume", score: bool = True) -> TrainResult:
    """Train `recipe` end to end; `resume` is `latest` or a checkpoint folder to continue from.

    `score=False` leaves the recipe's eval sets to a later `qadapt eval` (as `qadapt sweep` does).
    """
    if resume and overwrite:
        raise QadaptError("--resume continues a run and --overwrite replaces it: pass one of them")
    checkpoint = find_checkpoint(recipe.output_dir, resume) if resume else None
    if checkpoint:
        check_recipe(checkpoint, recipe, allow_recipe_changes)
    # Resuming with no checkpoint yet starts again (-1: none of the earlier attempt's metrics are kept).
    resume_step = read_progress(checkpoint).step if checkpoint else (-1 if resume else None)
    with run_state.outcome_recorded(RunDir(recipe.output_dir)):
        return _train(recipe, checkpoint, resume_step, overwrite, allow_recipe_changes, resume_command, score)


def _train(recipe: Recipe, checkpoint, resume_step: int | None, overwrite: bool, allow_recipe_changes: bool,
           resume_command: str, score: bool) -> TrainResult:
    """One training attempt, from its setup to its summary (`train` records its outcome)."""
    s = setup(recipe, resume_step, overwrite)
    if checkpoint:
        progress = restore(checkpoint, s.model, s.optimizer, s.base, s.train_rows, s.accelerator, allow_recipe_changes)
        if progress.loss_scale_state and s.scaler.is_enabled():
            s.scaler.load_state_dict(progress.loss_scale_state)
    else:
        progress = Progress(data_sha256=rows_sha256(s.train_rows), num_processes=s.accelerator.num_processes)
    # The task's state first: a held-out loss may read it (a preference run's reference log-probabilities).
    source = StepSource(s.train_rows, s.tokenizer, s.accelerator, s.model, recipe, step=progress.step,
                        val_rows=s.val_rows)
    s.task.restore_state(source, saved_task_state(checkpoint, s.accelerator))
    if not checkpoint and s.val_rows:  # the starting model's held-out loss, for comparison
        progress.eval_loss_before = progress.eval_loss = _log_eval(s, recipe, 0)
    with StopSignals() as stop:
        run_steps(s, recipe, progress, stop, resume_command, source)
    summary = finish(s, recipe, progress, score)
    return TrainResult(summary, s.accelerator.unwrap_model(s.model))


def run_steps(s: Setup, recipe: Recipe, progress: Progress, stop: StopSignals, resume_command: str,
              source: StepSource) -> None:
    """Optimizer steps from `progress.step` to the last; saves checkpoints, and one more when asked to stop.

    `source`: what the task draws each step's batches from, its state restored.
    """
    t, acc = recipe.train, s.accelerator
    order = data_lib.ExampleOrder(len(s.train_rows), seed=t.seed, start=progress.examples_seen)
    started, elapsed_before = time.perf_counter(), progress.elapsed_s
    cpu_started, cpu_before = time.process_time(), progress.cpu_s
    with tqdm(total=s.max_steps, initial=progress.step, desc="train", unit="step",
              disable=not acc.is_main_process) as bar:
        for step in range(progress.step, s.max_steps):
            lr = lr_at(step, s.max_steps, t.warmup_steps, t.lr, t.lr_schedule)
            for group in s.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            source.step = step
            micro_batches = s.task.step_batches(source, t.micro_batch_size, t.grad_accum, order, t.group_by_length)
            loss = accumulate_gradients(s.model, micro_batches, acc, s.task, s.scaler)
            s.scaler.unscale_(s.optimizer)
            grad_norm = _float(acc.clip_grad_norm_(s.model.parameters(), t.max_grad_norm) if t.max_grad_norm else None)
            _refuse_divergence(s, recipe, step + 1, loss, grad_norm)
            s.scaler.step(s.optimizer)  # skipped when fp16 gradients overflowed
            s.scaler.update()
            s.optimizer.zero_grad(set_to_none=True)
            progress.elapsed_s = elapsed_before + time.perf_counter() - started
            progress.cpu_s = cpu_before + time.process_time() - cpu_started
            row = {"loss": loss, "lr": lr, "grad_norm": grad_norm}
            if s.scaler.is_enabled():
                row["loss_scale"] = s.scaler.get_scale()
            progress.examples_seen = order.position
            _record_step(s, recipe, progress, micro_batches, row, bar)
            if progress.step < s.max_steps:
                _checkpoint_or_stop(s, recipe, progress, source, stop.requested(acc), resume_command)


def _record_step(s: Setup, recipe: Recipe, progress: Progress, micro_batches: list[dict], row: dict, bar) -> None:
    """Advance `progress` by the step just taken; log it, and measure the held-out loss when due."""
    t, acc = recipe.train, s.accelerator
    progress.step += 1
    real, computed = (sum(int(f(b["attention_mask"])) for b in micro_batches) for f in (torch.sum, torch.numel))
    progress.tokens_seen += int(acc.reduce(torch.tensor(real, device=acc.device), "sum"))
    row = {**row, "padding_share": 1 - real / computed, **s.task.step_metrics(micro_batches)}
    progress.losses.append(row["loss"])
    tokens_per_s = progress.tokens_seen / progress.elapsed_s
    bar.update(1)
    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{tokens_per_s:.0f}",
                    **{key: f"{row[key]:.3f}" for key in s.task.bar_metrics})
    done, last = progress.step, progress.step == s.max_steps
    if acc.is_main_process and (done % t.log_every == 0 or last):
        s.metrics.log({"step": done, **row, "tokens": progress.tokens_seen, "tokens_per_s": tokens_per_s,
                       "elapsed_s": progress.elapsed_s})
    if s.val_rows and ((t.eval_every and done % t.eval_every == 0) or last):
        progress.eval_loss = _log_eval(s, recipe, done, bar.write)


def _checkpoint_or_stop(s: Setup, recipe: Recipe, progress: Progress, source: StepSource, signal_name: str | None,
                        resume_command: str) -> None:
    """Save a checkpoint when one is due or a signal asked to stop; then stop if asked."""
    due = recipe.train.save_every and progress.step % recipe.train.save_every == 0
    if due or signal_name:
        folder = _save_checkpoint(s, recipe, progress, s.task.checkpoint_state(source))
    if signal_name:
        raise TrainingStopped(f"stopped by {signal_name} after step {progress.step} of {s.max_steps}; checkpoint: "
                              f"{folder}\nresume with: {resume_command}", EXIT_CODES[signal_name])


def _refuse_divergence(s: Setup, recipe: Recipe, step: int, loss: float, grad_norm: float | None) -> None:
    """A NaN/inf loss or gradient stops the run before the optimizer applies it; checkpoints stay good."""
    if math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm) or fp16_overflow(s.scaler)):
        return
    what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {grad_norm}"
    latest = s.run.latest_checkpoint(warn=False)
    raise QadaptError(
        f"training diverged at step {step}: {what}; this step was not applied and the run stops. Last good "
        f"checkpoint: {latest or 'none'}. Lower train.lr (now {recipe.train.lr:g})"
        + (", then continue from it with --resume --allow-recipe-changes" if latest else "")
    )


def _save_checkpoint(s: Setup, recipe: Recipe, progress: Progress, task_state: dict) -> CheckpointFolder:
    """A full checkpoint at `progress.step` (every process contributes its random state and its task's
    state), then pruning."""
    from accelerate.utils import gather_object

    acc = s.accelerator
    progress.loss_scale_state = s.scaler.state_dict() or None
    rng_states = gather_object([rng_state()]) if acc.num_processes > 1 else [rng_state()]
    task_states = gather_object([task_state]) if acc.num_processes > 1 else [task_state]
    weights, optimizer_state = distributed.adapter_weights(s.model), distributed.optimizer_state(s.model, s.optimizer)
    folder = s.run.checkpoint(progress.step)
    if acc.is_main_process:
        save_checkpoint(s.run, acc.unwrap_model(s.model), optimizer_state, progress, recipe, s.wrapped, s.base,
                        rng_states, weights, task_states)
        s.run.prune_checkpoints(recipe.train.keep_checkpoints)
    acc.wait_for_everyone()
    return folder


def finish(s: Setup, recipe: Recipe, progress: Progress, score: bool = True) -> dict:
    trainable, total = count_parameters(s.model)
    adapter = s.run.adapter
    weights = distributed.adapter_weights(s.model)
    if s.accelerator.is_main_process:
        with write_errors_reported(adapter.path, "free some space, then continue from the last checkpoint with --resume"):
            adapter.save(s.accelerator.unwrap_model(s.model), recipe, s.wrapped, s.base, weights)
    summary = {
        "adapter_kind": recipe.adapter.kind,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_share": trainable / total,
        "wrapped_modules": len(s.wrapped),
        "steps": s.max_steps,
        "processes": s.accelerator.num_processes,
        "global_batch": recipe.train.micro_batch_size * recipe.train.grad_accum * s.accelerator.num_processes,
        "tokens_seen": progress.tokens_seen,
        "wall_s": progress.elapsed_s,
        "s_per_step": progress.elapsed_s / s.max_steps,
        "cpu_s": progress.cpu_s,
        "first_loss": progress.losses[0],
        "last_loss": progress.losses[-1],
        "eval_loss_before": progress.eval_loss_before,
        "eval_loss": progress.eval_loss,
        **_peak_memory_figures(s.accelerator.device),
        "machine": describe_machine(),
        "adapter": str(adapter.path),
    }
    if recipe.eval.sets and score and s.accelerator.is_main_process:
        summary[s.task.score_key] = _final_scores(s, recipe)
    if s.accelerator.is_main_process:
        with atomic_file(s.run.summary_file) as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
        s.metrics.close()
        print(format_summary(summary))
    s.accelerator.end_training()  # the trackers' runs end here
    return summary


def format_summary(summary: dict) -> str:
    return "\n".join([
        f"trainable parameters: {summary['trainable_params']:,} of {summary['total_params']:,} "
        f"({100 * summary['trainable_share']:.2f}%) in {summary['wrapped_modules']} modules with "
        f"{summary['adapter_kind']} adapters",
        f"steps: {summary['steps']} of {summary['global_batch']} examples"
        + (f" ({summary['processes']} processes)" if summary["processes"] > 1 else "")
        + f", tokens seen: {summary['tokens_seen']:,}, wall time: {summary['wall_s']:.1f} s "
        f"({summary['s_per_step']:.2f} s/step)",
        f"loss: {summary['first_loss']:.4f} at the first step, {summary['last_loss']:.4f} at the last"
        + ("" if summary["eval_loss"] is None
           else f"; held-out loss {summary['eval_loss_before']:.4f} before training, {summary['eval_loss']:.4f} after"),
        f"peak memory: {summary['peak_memory_mb']:,.0f} MB"
        + (f" allocated, {summary['peak_reserved_mb']:,.0f} MB reserved by torch (nvidia-smi adds the CUDA context)"
           if "peak_reserved_mb" in summary else ""),
        f"adapter: {summary['adapter']}",
    ])


def _final_scores(s: Setup, recipe: Recipe) -> dict[str, float]:
    """Score the trained model on the recipe's eval sets, in memory, as its task scores (accuracy, entity F1).

    Results (metrics.json, predictions.jsonl) go under RUN/eval.
    """
    model = s.accelerator.unwrap_model(s.model)
    model.eval()
    e = recipe.eval
    options = EvalOptions(e.limit, e.batch_size, e.max_new_tokens, e.strict)
    loaded = LoadedModel(model, s.tokenizer, recipe.data.template, recipe.data.cutoff_len)
    metrics = s.task.evaluate(str(s.run.path), e.sets, options, s.run.eval_dir(), load=lambda: loaded)
    return s.task.set_scores(metrics)


def _log_eval(s: Setup, recipe: Recipe, step: int, write=print) -> float:
    val = eval_loss(s.model, s.val_rows, recipe.train.micro_batch_size, s.tokenizer.pad_token_id, s.accelerator.device,
                    s.task, recipe)
    if s.accelerator.is_main_process:
        write(f"step {step}: eval loss {val:.4f}")
        s.metrics.log({"step": step, "eval_loss": val})
    return val


def _peak_memory_figures(device: torch.device) -> dict[str, float]:
    """peak_memory_mb (a GPU: allocated by torch; a CPU: the process's resident set) and, on a GPU,
    peak_reserved_mb (held by torch's caching allocator)."""
    peak = peak_memory_mb(device)
    if "reserved" in peak:
        return {"peak_memory_mb": peak["allocated"], "peak_reserved_mb": peak["reserved"]}
    return {"peak_memory_mb": peak["resident"]}


def _float(value) -> float | None:
    return None if value is None else float(value)
