"""Batched greedy decoding with the KV cache, for evaluation and for trying an adapter.

Prompts are sorted by length so that a batch carries little padding, left-padded, and decoded greedily
together. A row that has produced EOS or a stop string leaves the batch at once (its KV-cache rows are
dropped), so finished problems stop costing work. Results come back in the prompts' order.
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 256, batch_size: int = 16,
                    stop_strings: Sequence[str] = (), add_special_tokens: bool = True,
                    on_done: Callable[[int], None] | None = None) -> list[str]:
    """The greedy continuation of every prompt, cut before the first stop string."""
    ids = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
    outputs: list[str] = [""] * len(ids)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        for index, tokens in zip(chunk, _decode_batch(model, tokenizer, [ids[i] for i in chunk], max_new_tokens,
                                                      stop_strings)):
            outputs[index] = cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), stop_strings)
        if on_done:
            on_done(len(chunk))
    return outputs


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """`text` up to the first stop string."""
    cut = min((text.find(s) for s in stop_strings if s in text), default=len(text))
    return text[:cut]


def eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    return ids | {tokenizer.eos_token_id} - {None}


def _decode_batch(model, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                  stop_strings: Sequence[str]) -> list[list[int]]:
    from transformers import DynamicCache

    device = model.device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    parameters = inspect.signature(model.forward).parameters
    takes_positions = "position_ids" in parameters
    cache_name = "cache" if "cache" in parameters else "past_key_values"  # transformers 5 renames it
    stop_ids = eos_ids(model, tokenizer)
    longest_stop = max((len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in stop_strings), default=0)

    cache = DynamicCache(config=model.config)
    generated: list[list[int]] = [[] for _ in prompts]
    alive = list(range(len(prompts)))  # prompt index of each row still decoding
    step_ids, step_positions = input_ids, positions
    for _ in range(max_new_tokens):
        kwargs = {cache_name: cache, **({"position_ids": step_positions} if takes_positions else {})}
        logits = model(input_ids=step_ids, attention_mask=mask, use_cache=True, **kwargs).logits
        next_tokens = logits[:, -1].argmax(-1)
        keep = []
        for row, (index, token) in enumerate(zip(alive, next_tokens.tolist())):
            if token in stop_ids:
                continue
            generated[index].append(token)
            tail = tokenizer.decode(generated[index][-(longest_stop + 2):]) if stop_strings else ""
            if not any(s in tail for s in stop_strings):
                keep.append(row)
        if not keep:
            break
        if len(keep) < len(alive):
            rows = torch.tensor(keep, device=device)
            cache.batch_select_indices(rows)
            alive = [alive[r] for r in keep]
            mask, next_tokens, step_positions = mask[rows], next_tokens[rows], step_positions[rows]
        mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
        step_ids = next_tokens[:, None]
        step_positions = step_positions[:, -1:] + 1
    return generated
