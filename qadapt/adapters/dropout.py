"""Dropout on adapter inputs, with a keep-mask that is cheap to draw on a CPU.

torch's CPU dropout draws one random number per element (bernoulli_), which made it about a quarter
of a LoRA training step on the embedded model. Here one 64-bit random word gives three 16-bit
uniform draws: an element is kept when its draw is at or above round(p · 2¹⁶), so the drop rate is p
to within 2⁻¹⁷. The mask comes from torch's generator, so seeds and activation checkpointing (which
restores the RNG state before recomputing) reproduce it exactly. On a GPU torch's dropout is fast
and used as is.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

_DRAWS_PER_WORD = 3  # the low 48 bits of a random int64 in [0, 2⁶³) are uniform: three 16-bit draws


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A boolean mask of `shape`, each element True with probability 1 - p (to within 2⁻¹⁷)."""
    count = math.prod(shape)
    words = torch.empty(-(-count // _DRAWS_PER_WORD), dtype=torch.int64, device=device).random_()
    # As int16 (little-endian), a word's first three slices are its low 48 bits: uniform on [-2¹⁵, 2¹⁵).
    draws = words.view(torch.int16).view(-1, 4)[:, :_DRAWS_PER_WORD]
    return (draws >= round(p * 2**16) - 2**15).reshape(-1)[:count].view(shape)


class AdapterDropout(nn.Module):
    """Inverted dropout: zero each element with probability p, scale the rest by 1 / (1 - p)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

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
        if x.device.type != "cpu" or sys.byteorder != "little":
            return F.dropout(x, self.p, training=True), 1.0
        return torch.where(keep_mask(x.shape, self.p, x.device), x, 0), 1 / (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"
