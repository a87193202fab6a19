"""LoRA's sum y = base(x) + s · B A dropout(x) in fewer passes over full-width tensors, for a CPU.

- The scale s and dropout's rescaling 1 / (1 - p) multiply the r-wide middle A·x rather than the input
  or the output: one pass over the input saved, forward and backward (with CheapDropout, whose
  `zero_dropped` leaves the rescaling to its caller).
- B's product is added to the base output in one addmm: the full-width product is never stored on its
  own (what it saves: docs/benchmarks/training.md).
The numbers are LoRALinear's up to rounding.
"""

from __future__ import annotations

from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn

from qadapt.adapters import DoRALinear, LoRALinear


def fuse_lora_forwards(model: nn.Module) -> int:
    """Compute every LoRA of `model` the fused way; return how many adapters."""
    fused = 0
    for module in model.modules():
        # DoRA's forward drops its input once for two products (qadapt.adapters.dora): left as it is.
        if isinstance(module, LoRALinear) and not isinstance(module, DoRALinear):
            module.low_rank_delta = MethodType(_low_rank_delta, module)
            module.forward = MethodType(_lora_forward, module)
            fused += 1
    return fused


def _lora_forward(self: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    out = self.base(x)
    middle, b = _scaled_middle(self, x)
    if middle.dtype != out.dtype:
        return out + F.linear(middle, b).to(out.dtype)
    # Out of place: a quantized layer's output may be a view that must not be modified.
    return torch.addmm(out.reshape(-1, out.shape[-1]), middle.reshape(-1, self.rank), b.t()).view(out.shape)


def _low_rank_delta(self: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    middle, b = _scaled_middle(self, x)
    return F.linear(middle, b)


def _scaled_middle(self: LoRALinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s · A dropout(x), B), in the dtype LoRALinear.low_rank_delta computes in."""
    dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
    a, b = self.lora_a.weight.to(dtype), self.lora_b.weight.to(dtype)
    dropped, rescale = _zero_dropped(self.dropout, x)
    return F.linear(dropped.to(dtype), a) * (self.scale * rescale), b


def _zero_dropped(dropout: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(x with dropped elements zeroed, the rescaling still to apply) for CheapDropout; else (dropout(x), 1)."""
    zero_dropped = getattr(dropout, "zero_dropped", None)
    return zero_dropped(x) if zero_dropped is not None else (dropout(x), 1.0)
