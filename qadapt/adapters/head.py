"""A task head trained whole, beside the adapters: the token classifier of an encoder.

The base model's head is new (randomly initialised by transformers) and kept out of quantization, so
it is trained in full, in fp32, and saved with the adapter: an adapter file then carries everything a
task needs, and switching adapters on one base switches heads too.
"""

from __future__ import annotations

import torch
from torch import nn

from qadapt.adapters.base import Adapter

# transformers' *ForTokenClassification models all name their head `classifier`.
TOKEN_CLASSIFIER = "classifier"


class TrainedHead(Adapter):
    """An fp32, trainable copy of a linear head; the original stays as `base`, unused, for detaching."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        if not type(base) is nn.Linear:
            raise TypeError(f"a trained head replaces a plain nn.Linear, got {type(base).__name__} "
                            "(was the head quantized? it must be skipped)")
        self.base = base
        self.linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                                device=base.weight.device, dtype=torch.float32)
        with torch.no_grad():
            self.linear.weight.copy_(base.weight)
            if base.bias is not None:
                self.linear.bias.copy_(base.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.to(torch.float32))

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return dict(self.linear.named_parameters(prefix="linear"))

    def extra_repr(self) -> str:
        return f"labels={self.linear.out_features}"
