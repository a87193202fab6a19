"""The loss of an optimizer step, the same for every adapter kind.

The loss of a step is the mean over all its target tokens: each micro-batch contributes its summed
token losses divided by the step's total target-token count (summed over processes under
`accelerate launch`), so gradient accumulation and N processes give the gradient of one large batch.
"""

from __future__ import annotations

from contextlib import nullcontext

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


def accumulate_gradients(model, micro_batches: list[dict], accelerator) -> float:
    """Backward over one optimizer step's micro-batches; returns the step's mean token loss."""
    local_tokens = torch.tensor(sum(target_tokens(b) for b in micro_batches), device=accelerator.device)
    step_tokens = accelerator.reduce(local_tokens, "sum").item()
    # DDP averages gradients over processes; scaling by their number turns that into a sum.
    scale = accelerator.num_processes / step_tokens
    loss_sum = 0.0
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        with nullcontext() if last else accelerator.no_sync(model):
            loss = summed_token_loss(model, batch)
            accelerator.backward(loss * scale)
        loss_sum += loss.item()
    total = accelerator.reduce(torch.tensor(loss_sum, device=accelerator.device), "sum").item()
    return total / step_tokens


@torch.no_grad()
def eval_loss(model, rows: list[dict], micro_batch_size: int, pad_id: int, device) -> float:
    """Mean token loss on held-out rows; the model is left in the mode it came in."""
    was_training = model.training
    model.eval()
    loss_sum, tokens = 0.0, 0
    for start in range(0, len(rows), micro_batch_size):
        batch = to_device(data_lib.collate(rows[start:start + micro_batch_size], pad_id), device)
        loss_sum += summed_token_loss(model, batch).item()
        tokens += target_tokens(batch)
    model.train(was_training)
    return loss_sum / max(tokens, 1)


def to_device(batch: dict, device) -> dict:
    return {key: value.to(device) for key, value in batch.items()}
