"""DoRA (Liu et al. 2024, arXiv 2402.09353): LoRA split into a magnitude and a direction.

    W' = m ⊙ (W + s·BA) / n,   n = ‖W + s·BA‖ per output row, treated as a constant in backward (§4.3)
    y  = base(x) + (m/n − 1) ⊙ W·x' + (m/n) ⊙ s·B(A(x')),   x' = dropout(x)

Without dropout (or in evaluation) W·x' is base(x) − b, no second pass; with it, W·x' is a second pass of
the base over the dropped input, as DoRA's own code and PEFT (`use_dora`) compute it, so the two train
alike step for step. m starts at ‖W‖, so the layer starts identical to its base. The base layer is only ever called,
never copied, so the same code serves full-precision, 4-bit and 8-bit bases. The norm is expanded

    n² = ‖W‖² + 2s·Σ_k B_ik (A Wᵀ)_ki + s²·Σ_k (B AAᵀ)_ik B_ik

‖W‖² is measured once by passing identity rows through the base; A Wᵀ by passing A's r rows through
it, once per change of A or B (an optimizer step), not at every forward: gradient accumulation,
checkpoint recomputation and evaluation reuse it. No de-quantized copy of W is kept.
"""

from __future__ import annotations

import torch
from torch import nn

from qadapt.adapters.base import layer_dims
from qadapt.adapters.lora import LoRALinear

_PROBE_ROWS = 1024  # identity rows per pass while measuring ‖W‖²: bounds the probe's memory


def _input_dtype(base: nn.Module) -> torch.dtype:
    """The dtype the base layer computes in: a 4-bit layer's compute dtype, else its weight's."""
    compute_dtype = getattr(base, "compute_dtype", None)
    if compute_dtype is not None:
        return compute_dtype
    return base.weight.dtype if base.weight.is_floating_point() else torch.float32


def _without_bias(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x Wᵀ in fp32, through the base layer itself (its own kernel, quantized or not)."""
    out = base(x.to(_input_dtype(base))).to(torch.float32)
    bias = getattr(base, "bias", None)
    return out - bias.to(torch.float32) if bias is not None else out


@torch.no_grad()
def weight_row_norms_squared(base: nn.Module) -> torch.Tensor:
    """‖W_i‖² for every output row i, measured by feeding the base identity rows in chunks."""
    in_features, out_features = layer_dims(base)
    device = base.weight.device
    total = torch.zeros(out_features, device=device)
    for start in range(0, in_features, _PROBE_ROWS):
        rows = torch.arange(start, min(start + _PROBE_ROWS, in_features), device=device)
        probe = torch.zeros(len(rows), in_features, device=device)
        probe[torch.arange(len(rows)), rows] = 1.0
        total += _without_bias(base, probe).square().sum(dim=0)  # (rows, out): rows of Wᵀ
    return total


class DoRALinear(LoRALinear):
    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__(base, rank, alpha, dropout, rslora)
        self.register_buffer("weight_norm_sq", weight_row_norms_squared(base), persistent=False)
        self.magnitude = nn.Parameter(self.weight_norm_sq.sqrt())
        self._norms_cache: tuple[tuple, torch.Tensor] | None = None

    @torch.no_grad()
    def adapted_row_norms(self) -> torch.Tensor:
        """n = ‖W + s·BA‖ per output row, without forming W or BA; recomputed only when A or B changed."""
        a, b = self.lora_a.weight, self.lora_b.weight  # (r, in), (out, r)
        # In-place updates (optimizer steps, loading) bump a tensor's _version; moves change data_ptr.
        key = (a._version, b._version, a.data_ptr(), b.data_ptr())
        if self._norms_cache is None or self._norms_cache[0] != key:
            a_wt = _without_bias(self.base, a)  # (r, out) = A Wᵀ
            cross = (b * a_wt.T).sum(dim=1)
            lora_sq = ((b @ (a @ a.T)) * b).sum(dim=1)
            norm_sq = self.weight_norm_sq + 2 * self.scale * cross + self.scale**2 * lora_sq
            self._norms_cache = (key, norm_sq.clamp_min(0).sqrt())
        return self._norms_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        factor = self.magnitude / self.adapted_row_norms().clamp_min(1e-12)  # (out,)
        if self.training and not isinstance(self.dropout, nn.Identity):
            x = self.dropout(x)
            base_part = _without_bias(self.base, x)  # W·dropout(x): a second pass of the base
        else:
            bias = getattr(self.base, "bias", None)
            base_part = out.to(torch.float32) - (bias.to(torch.float32) if bias is not None else 0)
        delta = self.low_rank_product(x).to(torch.float32)
        return out + ((factor - 1) * base_part + factor * delta).to(out.dtype)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {**super().adapter_params(), "magnitude": self.magnitude}

    @torch.no_grad()
    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """m ⊙ (W + s·BA) / ‖W + s·BA‖ per output row, in fp32."""
        direction = super().merged_weight(weight)
        return (self.magnitude / direction.norm(dim=1).clamp_min(1e-12)).unsqueeze(1) * direction
