"""Bottleneck adapters of LLM-Adapters (arXiv 2304.01933): Series and Parallel.

    bottleneck(h) = s · up(act(down(dropout(h))))          in → bottleneck_size → out, no biases

    Series   (Houlsby et al. 2019, arXiv 1902.00751; Pfeiffer et al. 2020, arXiv 2005.00247):
        after a sub-layer:        y = h + bottleneck(h),  h = base(x)
        on a linear's input:      y = base(x + bottleneck(x))   (LLM-Adapters' "mh_adapter")
    Parallel (He et al. 2021, arXiv 2110.04366):
        y = base(x) + bottleneck(x)

`s` is a fixed number or a learned scalar starting at 1. Init `bert` draws both projections from
normal(0, 0.02) as the paper's code does; `zero` starts the up-projection at zero (down Kaiming-uniform,
as He et al.'s code), so the adapted model starts identical to its base. Weights are kept in fp32.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qadapt.adapters.base import Adapter
from qadapt.adapters.lora import adapter_dropout

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class Bottleneck(nn.Module):
    """s · up(act(down(dropout(h)))), computed in fp32 and returned in fp32."""

    def __init__(self, in_features: int, out_features: int, size: int, activation: str, scale: float | str,
                 dropout: float, init: str, device: torch.device | None = None):
        super().__init__()
        self.dropout = adapter_dropout(dropout)
        self.down = nn.Linear(in_features, size, bias=False, device=device, dtype=torch.float32)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(size, out_features, bias=False, device=device, dtype=torch.float32)
        self.scale = nn.Parameter(torch.ones(1, device=device)) if scale == "learned" else float(scale)
        if init == "bert":
            nn.init.normal_(self.down.weight, std=0.02)
            nn.init.normal_(self.up.weight, std=0.02)
        elif init == "zero":
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
        else:
            raise ValueError(f"unknown bottleneck init {init!r}")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.act(self.down(self.dropout(h).to(torch.float32))))

    def params(self) -> dict[str, nn.Parameter]:
        params = {"down.weight": self.down.weight, "up.weight": self.up.weight}
        if isinstance(self.scale, nn.Parameter):
            params["scale"] = self.scale
        return params


class SeriesAdapter(Adapter):
    """A bottleneck in series with a linear layer: after its output, or before it on its input."""

    def __init__(self, base: nn.Module, bottleneck: Bottleneck, on_input: bool = False):
        super().__init__()
        self.base = base
        self.bottleneck = bottleneck
        self.on_input = on_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.on_input:
            return self.base(x + self.bottleneck(x).to(x.dtype))
        h = self.base(x)
        # Out of place: a quantized layer's output may be a view that must not be modified.
        return h + self.bottleneck(h).to(h.dtype)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {f"bottleneck.{name}": p for name, p in self.bottleneck.params().items()}

    def extra_repr(self) -> str:
        return f"on={'input' if self.on_input else 'output'}"


class ParallelAdapter(Adapter):
    """A bottleneck beside a linear layer or a whole block (attention or MLP), fed the same input.

    A block may take its hidden states positionally or as `hidden_states=` and may return a tuple
    (attention: output, weights); the adapter's output is added to the first element.
    """

    def __init__(self, base: nn.Module, bottleneck: Bottleneck):
        super().__init__()
        self.base = base
        self.bottleneck = bottleneck

    def forward(self, *args, **kwargs):
        out = self.base(*args, **kwargs)
        x = args[0] if args else kwargs["hidden_states"]
        if isinstance(out, tuple):
            return (out[0] + self.bottleneck(x).to(out[0].dtype), *out[1:])
        return out + self.bottleneck(x).to(out.dtype)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {f"bottleneck.{name}": p for name, p in self.bottleneck.params().items()}
