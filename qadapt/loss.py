"""The loss of an optimizer step, the same for every adapter kind and task.

The loss of a step is the mean over all its target tokens: each micro-batch contributes its summed
token losses divided by the step's total target-token count (summed over processes under
`accelerate launch`), so gradient accumulation and N processes give the gradient of one large batch.
A task says what a target token is: the next token of a response (causal LM) or a word's first
sub-word piece (token classification).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from qadapt import data as data_lib
from qadapt.adapters import FAMILIES


LOSS_CHUNK_TOKENS = 128  # positions whose logits exist at once: 128 × a 49k vocabulary is 25 MB in fp32


def summed_token_loss(model, batch: dict) -> torch.Tensor:
    """Cross-entropy summed over target tokens (next-token prediction), computed in fp32.

    A model of a known family computes its logits a chunk of positions at a time, each chunk checkpointed,
    so the (tokens × vocabulary) logits, their fp32 copy and their gradient never exist whole. A model
    wrapped for several processes (DDP/FSDP) runs its plain forward, which its gradient hooks need.
    """
    labels = batch["labels"][:, 1:].flatten()
    if not isinstance(model, PreTrainedModel) or model.config.model_type not in FAMILIES:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels,
                               ignore_index=data_lib.IGNORE_INDEX, reduction="sum")
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    hidden, head = hidden[:, :-1].flatten(0, 1), model.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, labels.numel(), LOSS_CHUNK_TOKENS):
        rows = slice(start, start + LOSS_CHUNK_TOKENS)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, head, hidden[rows], labels[rows], use_reentrant=False)
        else:
            total = total + _chunk_loss(head, hidden[rows], labels[rows])
    return total


def _chunk_loss(head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), labels, ignore_index=data_lib.IGNORE_INDEX, reduction="sum")


def target_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != data_lib.IGNORE_INDEX).sum())


def summed_tag_loss(model, batch: dict) -> torch.Tensor:
    """Cross-entropy summed over labelled positions (each word's first piece), computed in fp32."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(),
                           ignore_index=data_lib.IGNORE_INDEX, reduction="sum")


def tagged_tokens(batch: dict) -> int:
    return int((batch["labels"] != data_lib.IGNORE_INDEX).sum())


@dataclass(frozen=True)
class TaskLoss:
    summed: Callable[..., torch.Tensor]  # (model, batch) -> the loss summed over the batch's targets
    targets: Callable[[dict], int]  # batch -> how many targets that sum covers


CAUSAL_LM = TaskLoss(summed_token_loss, target_tokens)
TASK_LOSSES = {"causal-lm": CAUSAL_LM, "token-classification": TaskLoss(summed_tag_loss, tagged_tokens)}


def accumulate_gradients(model, micro_batches: list[dict], accelerator, task: TaskLoss = CAUSAL_LM) -> float:
    """Backward over one optimizer step's micro-batches; returns the step's mean token loss."""
    local_tokens = torch.tensor(sum(task.targets(b) for b in micro_batches), device=accelerator.device)
    step_tokens = accelerator.reduce(local_tokens, "sum").item()
    # DDP averages gradients over processes; scaling by their number turns that into a sum.
    scale = accelerator.num_processes / step_tokens
    loss_sum = 0.0
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        with nullcontext() if last else accelerator.no_sync(model):
            loss = task.summed(model, batch)
            accelerator.backward(loss * scale)
        loss_sum += loss.item()
    total = accelerator.reduce(torch.tensor(loss_sum, device=accelerator.device), "sum").item()
    return total / step_tokens


@torch.no_grad()
def eval_loss(model, rows: list[dict], micro_batch_size: int, pad_id: int, device,
              task: TaskLoss = CAUSAL_LM) -> float:
    """Mean token loss on held-out rows; the model is left in the mode it came in."""
    was_training = model.training
    model.eval()
    loss_sum, tokens = 0.0, 0
    for start in range(0, len(rows), micro_batch_size):
        batch = to_device(data_lib.collate(rows[start:start + micro_batch_size], pad_id), device)
        loss_sum += task.summed(model, batch).item()
        tokens += task.targets(batch)
    model.train(was_training)
    return loss_sum / max(tokens, 1)


def to_device(batch: dict, device) -> dict:
    return {key: value.to(device) for key, value in batch.items()}
