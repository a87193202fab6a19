"""Packing: several training examples in one row, so that a step computes on tokens, not padding.

Examples are placed into rows of at most `data.cutoff_len` tokens by best-fit decreasing (longest first,
equal lengths in a seeded order, each into the row it fills best), so the same data and seed give the
same rows and a resumed run continues on them. Each example keeps its own position ids, restarting at 0;
transformers reads those restarts as sequence boundaries when no 2-D attention mask is given, and builds
a block-diagonal causal mask (SDPA, eager) or runs variable-length FlashAttention, so no token attends
to another example. An example's first label is dropped: unpacked it is never a target, packed it would
make the previous example predict it.
"""

from __future__ import annotations

import bisect
import random

from qadapt.data import IGNORE_INDEX
from qadapt.errors import QadaptError

# Layers that carry state along the sequence instead of attending: position-id restarts do not reach them.
SEQUENCE_STATE_LAYERS = ("linear_attention", "mamba", "conv", "recurrent")
SEQUENCE_STATE_MODELS = ("mamba", "mamba2", "falcon_mamba", "rwkv", "lfm2", "recurrent_gemma", "jamba", "zamba",
                         "zamba2", "bamba", "falcon_h1", "granitemoehybrid", "qwen3_next", "nemotron_h")


def packing_problem(config) -> str | None:
    """Why a model cannot train on packed rows (a layer that carries state across example boundaries), or None."""
    layer_types = [str(t) for t in getattr(config, "layer_types", None) or []]
    stateful = sorted({t for t in layer_types if any(kind in t for kind in SEQUENCE_STATE_LAYERS)})
    if stateful or config.model_type in SEQUENCE_STATE_MODELS:
        what = f"layers of type {', '.join(stateful)}" if stateful else "recurrent / state-space layers"
        return (f"{config.model_type} has {what}, which carry state from one token to the next whatever the position "
                "ids say, so packed examples would leak into each other; set data.packing: false")
    return None


def refuse_unpackable(config) -> None:
    problem = packing_problem(config)
    if problem:
        raise QadaptError(f"data.packing: {problem}")


def pack(rows: list[dict], capacity: int, seed: int) -> list[dict]:
    """Rows of input_ids, labels and position_ids, each holding whole examples of at most `capacity` tokens."""
    rng = random.Random(seed)
    ties = list(range(len(rows)))
    rng.shuffle(ties)
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]["input_ids"]), ties[i]))
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted: the best fit is the first with enough room
    bins: list[list[int]] = []
    for i in order:
        size = len(rows[i]["input_ids"])
        if size > capacity:
            raise QadaptError(f"an example of {size} tokens is longer than data.cutoff_len {capacity}")
        at = bisect.bisect_left(free, (size, -1))
        if at == len(free):
            bins.append([i])
            room, index = capacity - size, len(bins) - 1
        else:
            room, index = free.pop(at)
            bins[index].append(i)
            room -= size
        bisect.insort(free, (room, index))
    return [_joined([rows[i] for i in members]) for members in bins]


def _joined(examples: list[dict]) -> dict:
    input_ids, labels, position_ids = [], [], []
    for example in examples:
        n = len(example["input_ids"])
        input_ids += example["input_ids"]
        labels += [IGNORE_INDEX] + list(example["labels"][1:])
        position_ids += list(range(n))
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
