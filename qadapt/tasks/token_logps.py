"""The log-probabilities a model gives the tokens of answers it is trained on (batch["labels"]'s tokens):
what learning from rewards (qadapt.tasks.grpo) and from preferences weigh, in fp32.

For a model of a known family the head runs only at the answer's places, a chunk at a time (checkpointed
under a gradient), so the (tokens × vocabulary) logits never exist whole; Granite's scaling and Gemma's soft
cap are applied as the model's own head applies them.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from qadapt import data as data_lib
from qadapt.tasks.causal_lm import LOSS_CHUNK_TOKENS, head_logits, head_output_transform


def completion_token_logps(model, batch: dict, temperature: float = 1.0) -> torch.Tensor:
    """log π(token) of every token after the first (batch["labels"][:, 1:]'s places; 0 where nothing is trained),
    in fp32, under the distribution at `temperature` (the one sampled tokens were drawn from; 1: the model's).

    A wrapped model (DDP) runs its plain forward.
    """
    from transformers import PreTrainedModel

    from qadapt.adapters import FAMILIES

    targets = batch["labels"][:, 1:]
    mask = targets != data_lib.IGNORE_INDEX
    inputs = data_lib.model_inputs(batch)
    if not isinstance(model, PreTrainedModel) or model.config.model_type not in FAMILIES:
        logits = model(**inputs).logits[:, :-1].float() / temperature  # the model's own head, scaled and capped
        return torch.log_softmax(logits, -1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask
    scaling, cap = head_output_transform(model.config)
    logps = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
    hidden = model.base_model(**inputs)[0][:, :-1][mask]
    picked = targets[mask]
    head = model.get_output_embeddings()
    chunks = []
    for start in range(0, picked.numel(), LOSS_CHUNK_TOKENS):
        rows = slice(start, start + LOSS_CHUNK_TOKENS)
        if torch.is_grad_enabled():
            chunks.append(checkpoint(_chunk_logps, head, hidden[rows], picked[rows], scaling, cap, temperature,
                                     use_reentrant=False))
        else:
            chunks.append(_chunk_logps(head, hidden[rows], picked[rows], scaling, cap, temperature))
    return logps.masked_scatter(mask, torch.cat(chunks)) if chunks else logps


def _chunk_logps(head, hidden, targets, scaling: float, cap: float | None, temperature: float) -> torch.Tensor:
    logits = head_logits(head, hidden, scaling, cap)
    return torch.log_softmax(logits.float() / temperature, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
