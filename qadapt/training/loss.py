"""The loss of an optimizer step, the same for every adapter kind and task.

The loss of a step is the mean over all its target tokens: each micro-batch contributes its summed
token losses divided by the step's total target-token count (summed over processes under
`accelerate launch`), so gradient accumulation and N processes give the gradient of one large batch.
The task says what a target is and what its summed loss is (qadapt.tasks): the next token of a
response (causal LM) or a word's first sub-word piece (token classification).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from qadapt.tasks import DEFAULT_TASK, Task
from qadapt.tasks.base import to_device


def accumulate_gradients(model, micro_batches: list[dict], accelerator, task: Task = DEFAULT_TASK,
                         scaler: torch.amp.GradScaler | None = None) -> float:
    """Backward over one optimizer step's micro-batches; returns the step's mean token loss.

    `scaler` scales what is backpropagated (fp16's loss scaling, qadapt.training.loss_scale).
    """
    local_tokens = torch.tensor(sum(task.loss_targets(b) for b in micro_batches), device=accelerator.device)
    step_tokens = accelerator.reduce(local_tokens, "sum").item()
    # DDP averages gradients over processes; scaling by their number turns that into a sum.
    scale = accelerator.num_processes / step_tokens
    loss_sum = 0.0
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        with nullcontext() if last else accelerator.no_sync(model):
            loss = task.summed_loss(model, batch)
            accelerator.backward(scaler.scale(loss * scale) if scaler is not None else loss * scale)
        loss_sum += loss.item()
    total = accelerator.reduce(torch.tensor(loss_sum, device=accelerator.device), "sum").item()
    return total / step_tokens


@torch.no_grad()
def eval_loss(model, rows: list[dict], micro_batch_size: int, pad_id: int, device,
              task: Task = DEFAULT_TASK, recipe=None) -> float:
    """Mean loss per target on held-out rows (laid out and weighed as `task` trains: `recipe`'s settings); the
    model is left in the mode it came in."""
    was_training = model.training
    model.eval()
    settings = task.loss_settings(recipe) if recipe is not None else {}
    loss_sum, tokens = 0.0, 0
    for start in range(0, len(rows), micro_batch_size):
        batch = {**to_device(task.collate(rows[start:start + micro_batch_size], pad_id), device), **settings}
        loss_sum += task.summed_loss(model, batch).item()
        tokens += task.loss_targets(batch)
    model.train(was_training)
    return loss_sum / max(tokens, 1)
