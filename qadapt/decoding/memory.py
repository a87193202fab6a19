"""How many rows the decoder holds at once: the KV cache a row needs, from the model's config, against
the memory free on its device.

Per token, every layer caches a key and a value vector per KV head: 2 × layers × KV heads × head size ×
bytes (LLaMA-2-7B in bf16: 0.5 MiB a token, so 64 rows of ~450 positions are ~14 GiB, twice that in
fp32). A config whose layers differ (Gemma 4's per-layer head sizes) leaves the count to a one-token
probe of the model itself. The decoder keeps room to grow (up to half again: qadapt.decoding.generation) and copies a
layer's cache when new rows join, and a prefill's activations come on top: the cache of the batch is
given at most FREE_SHARE of the free memory. What this leaves out (fragmentation, another process),
the decoder meets as an out-of-memory error, and answers by halving its batch (generation._run).
"""

from __future__ import annotations

import math
import sys
from typing import Callable

import torch

KV_ROOM = 1.5  # the decoder's buffers grow by half their filled width
FREE_SHARE = 0.8  # of the free memory, for the batch's KV cache; the rest for prefill activations and copies


def kv_bytes_per_token(config, dtype: torch.dtype) -> int | None:
    """Bytes of KV cache one token takes across all layers, from a transformers config; None when its layers
    differ (then measure it: generation's one-token probe)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "is_heterogeneous", False):
        return None
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * dtype.itemsize


def rows_that_fit(token_bytes: int, positions: int, free_bytes: float) -> int:
    """How many rows of `positions` cached positions fit in FREE_SHARE of `free_bytes` (at least 1)."""
    return max(1, math.floor(FREE_SHARE * free_bytes / (token_bytes * positions * KV_ROOM)))


def decode_batch_size(model, requested: int, positions: int, free_bytes: float | None = None,
                      measure: Callable[[], int] | None = None) -> int:
    """`requested`, or fewer rows (said on stderr) when their KV cache would not fit the memory free on the
    model's device. `measure` gives the bytes of one token's cache where the config cannot say.
    """
    from qadapt.devices import free_memory

    dtype = model.get_input_embeddings().weight.dtype  # the activations', and so the cache's, dtype
    token_bytes = kv_bytes_per_token(model.config, dtype)
    if token_bytes is None:
        if measure is None:
            return requested
        token_bytes = measure()
    free = free_memory(model.device) if free_bytes is None else free_bytes
    rows = rows_that_fit(token_bytes, positions, free)
    if rows >= requested:
        return requested
    print(f"decoding {rows} rows at a time, not {requested}: the KV cache of more would not fit in the "
          f"{free / 2**30:.1f} GiB free on {model.device}", file=sys.stderr)
    return rows


def release_cached_memory(device: torch.device) -> None:
    """Hand a GPU's cached blocks back, after an out-of-memory error, before trying smaller."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
