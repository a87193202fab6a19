"""LoRA (Hu et al. 2021, arXiv 2106.09685) around a frozen linear layer.

    y = base(x) + s · B(A(dropout(x))),   s = alpha / r   (rsLoRA, arXiv 2312.03732: alpha / sqrt(r))

A (in → r) starts Kaiming-uniform and B (r → out) at zero, so the wrapped layer starts identical to
its base. The base may be an `nn.Linear`, a bitsandbytes `Linear4bit` or `Linear8bitLt`, or
transformers' `Conv1D` (GPT-2): only its output is used, never its weight. A and B are kept (and
updated) in fp32; with a 16-bit compute dtype the product is computed in it, as autocast would.
(On a CPU, qadapt.lean_cpu computes the same sum in fewer passes.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qadapt.adapters.base import Adapter, layer_dims


def adapter_dropout(p: float) -> nn.Module:
    """Dropout on an adapter's input; none at all when p is 0."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / (math.sqrt(rank) if rslora else rank)


class LoRALinear(Adapter):
    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        self.base = base
        self.rank = rank
        self.scale = lora_scale(alpha, rank, rslora)
        self.dropout = adapter_dropout(dropout)
        in_features, out_features = layer_dims(base)
        device = base.weight.device
        self.lora_a = nn.Linear(in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_b = nn.Linear(rank, out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        # Out of place: a quantized layer's output may be a view that must not be modified.
        return out + self.low_rank_delta(x).to(out.dtype)

    def low_rank_delta(self, x: torch.Tensor) -> torch.Tensor:
        """s · B A dropout(x)."""
        return self.low_rank_product(self.dropout(x))

    def low_rank_product(self, x: torch.Tensor) -> torch.Tensor:
        """s · B A x, computed as autocast would: in x's dtype when that is 16-bit, else in fp32.

        The weights stay fp32 (the optimizer updates them there); 16-bit matmuls keep fp32 accumulation.
        """
        dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
        a, b = self.lora_a.weight.to(dtype), self.lora_b.weight.to(dtype)
        return F.linear(F.linear(x.to(dtype), a), b) * self.scale

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"lora_a.weight": self.lora_a.weight, "lora_b.weight": self.lora_b.weight}

    @torch.no_grad()
    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W + s·BA for the base's (out, in) weight W, in fp32: the one matrix that equals this layer."""
        return weight.to(torch.float32) + self.scale * (self.lora_b.weight @ self.lora_a.weight)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}"
