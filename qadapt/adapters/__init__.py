"""The adapter family of LLM-Adapters (arXiv 2304.01933), in full precision on a frozen base."""

from __future__ import annotations

from torch import nn

from qadapt.adapters.base import (
    Adapter,
    adapter_params,
    adapter_state_dict,
    count_parameters,
    load_adapter_state_dict,
    mark_only_adapters_trainable,
)
from qadapt.adapters.inject import DEFAULT_TARGETS, default_targets, inject_adapters, linear_layer_names
from qadapt.adapters.lora import LoRALinear
from qadapt.recipe import AdapterConfig


def attach_adapters(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Attach the adapters `cfg` describes to `model` in place; return the wrapped module names."""
    targets = cfg.targets or default_targets(model)
    if cfg.kind == "lora":
        return inject_adapters(
            model, targets, lambda base: LoRALinear(base, cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora)
        )
    raise ValueError(f"unknown adapter kind {cfg.kind!r}")


__all__ = [
    "Adapter", "LoRALinear", "DEFAULT_TARGETS", "attach_adapters", "adapter_params", "adapter_state_dict",
    "count_parameters", "default_targets", "inject_adapters", "linear_layer_names",
    "load_adapter_state_dict", "mark_only_adapters_trainable",
]
