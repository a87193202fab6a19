"""Adapter dropout with a keep-mask that is cheap to draw on a CPU, shared by adapters reading one input.

torch's CPU dropout draws one random number per element (bernoulli_), which made it about a quarter
of a LoRA training step on the embedded model. Here one 64-bit random word, drawn over int64's whole
range, gives four 16-bit uniform draws: an element is kept when its draw is at or above
round(p · 2¹⁶), so the drop rate is p to within 2⁻¹⁷. The draws are laid out as the input is, so the
comparison reads them in order and the mask needs no copy. The mask comes from torch's generator, so
seeds and activation checkpointing (which restores the RNG state before recomputing) reproduce it.

On request (`train.shared_dropout_masks`), adapters in one block that read the same input (q, k, v;
gate, up) share one mask for a call of the block (`SharedMasks`), as one adapter on a fused projection
(Phi-3's qkv_proj) does: one mask drawn instead of three. This changes which elements each adapter drops
against one mask per layer (PEFT's), so it is opt-in.
"""

from __future__ import annotations

import math
import sys
import weakref

import torch
from torch import nn

from qadapt.adapters import Adapter, Bottleneck

_DRAWS_PER_WORD = 4  # all 64 bits of a random int64 drawn over [-2⁶³, 2⁶³) are uniform: four 16-bit draws


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A boolean mask of `shape`, each element True with probability 1 - p (to within 2⁻¹⁷)."""
    if sys.byteorder != "little":
        return torch.rand(shape, device=device) >= p
    count = math.prod(shape)
    words = torch.empty(-(-count // _DRAWS_PER_WORD), dtype=torch.int64, device=device).random_(-2**63, None)
    draws = words.view(torch.int16)[:count].view(shape)  # uniform on [-2¹⁵, 2¹⁵), in the input's layout
    return draws >= round(p * 2**16) - 2**15


class SharedMasks:
    """One mask per input tensor for the adapters of one block, for the length of one call of the block.

    Adapters that read the same input (q, k and v; gate and up) then drop the same elements, as one
    adapter on a fused projection (Phi-3's qkv_proj) does, and the block draws one mask, and while the
    first dropped copy lives, makes no other. A new call of the block (the next step, or activation
    checkpointing's recomputation, which restores the random state first) draws afresh.

    An entry keeps the mask, and only a weak reference to the dropped copy: checkpointing may stop a
    recomputation before the block's call ends, and a dropped copy kept alive would keep its graph.
    """

    def __init__(self):
        self._entries: dict[tuple[int, float], tuple[weakref.ref, int, torch.Tensor, weakref.ref]] = {}

    def clear(self, *_) -> None:
        self._entries.clear()

    def dropped(self, x: torch.Tensor, p: float) -> torch.Tensor:
        entry = self._entries.get((id(x), p))
        if entry is not None and entry[0]() is x and entry[1] == x._version:
            _, _, mask, copy = entry
            dropped = copy()
            # Not kept by the adapter that made it (checkpointing keeps nothing): the same mask again.
            return dropped if dropped is not None else torch.where(mask, x, 0)
        mask = keep_mask(x.shape, p, x.device)
        dropped = torch.where(mask, x, 0)
        self._entries[(id(x), p)] = (weakref.ref(x), x._version, mask, weakref.ref(dropped))
        return dropped


def share_masks_within_blocks(model: nn.Module) -> None:
    """Give the adapters with dropout that sit side by side in one block (an attention's q, k, v) one
    SharedMasks, emptied when a call of the block begins and when it ends."""
    for block in model.modules():
        droppers = [child.dropout for child in block.children()
                    if isinstance(getattr(child, "dropout", None), CheapDropout)]
        if len(droppers) < 2:
            continue
        masks = getattr(block, "_qadapt_shared_masks", None)
        if masks is None:
            masks = block._qadapt_shared_masks = SharedMasks()
            block.register_forward_pre_hook(masks.clear)
            block.register_forward_hook(masks.clear)
        for dropper in droppers:
            dropper.shared = masks


def use_cheap_dropout(model: nn.Module) -> int:
    """Replace every adapter's torch dropout (nn.Dropout) by a CheapDropout of the same rate; return how many."""
    owners = [m for m in model.modules() if isinstance(m, (Adapter, Bottleneck))]
    replaced = 0
    for owner in owners:
        dropout = getattr(owner, "dropout", None)
        if isinstance(dropout, nn.Dropout):
            owner.dropout = CheapDropout(dropout.p)
            owner.dropout.train(dropout.training)
            replaced += 1
    return replaced


class CheapDropout(nn.Module):
    """Inverted dropout: zero each element with probability p, scale the rest by 1 / (1 - p)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.shared: SharedMasks | None = None  # set by share_masks_within_blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropped, rescale = self.zero_dropped(x)
        return dropped if rescale == 1.0 else dropped * rescale

    def zero_dropped(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """x with the dropped elements zeroed, the kept ones not yet rescaled, and the factor 1 / (1 - p).

        A linear map after dropout can take the factor on its (smaller) output instead: one pass over
        the input saved, forward and backward.
        """
        if not self.training or self.p == 0:
            return x, 1.0
        if self.shared is not None:
            return self.shared.dropped(x, self.p), 1 / (1 - self.p)
        return torch.where(keep_mask(x.shape, self.p, x.device), x, 0), 1 / (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"
