"""The adapter family of LLM-Adapters (arXiv 2304.01933), in full precision on a frozen base."""

from __future__ import annotations

from torch import nn

from qadapt.adapters.base import (
    Adapter,
    adapter_params,
    adapter_state_dict,
    count_parameters,
    layer_dims,
    load_adapter_state_dict,
    mark_only_adapters_trainable,
)
from qadapt.adapters.bottleneck import Bottleneck, ParallelAdapter, SeriesAdapter
from qadapt.adapters.dora import DoRALinear
from qadapt.adapters.families import FAMILIES, Family, family_of
from qadapt.adapters.head import TOKEN_CLASSIFIER, TrainedHead
from qadapt.adapters.inject import detach_adapters, inject_adapters, is_linear, linear_layer_names, wrap_modules
from qadapt.adapters.lora import LoRALinear
from qadapt.adapters.placement import plan_adapters
from qadapt.adapters.kinds import KINDS, AdapterKind, adapter_kind, kind_of_peft_config
from qadapt.adapters.spec import AdapterSpec, BottleneckSpec, LowRankSpec, adapter_spec


def attach_adapters(model: nn.Module, spec: AdapterSpec) -> list[str]:
    """Attach the adapters `spec` describes to `model` in place; return the wrapped module names.

    A token-classification model's new head is trained whole beside them (qadapt.adapters.head).
    """
    plan = plan_adapters(model, spec)
    if has_token_classifier(model):
        plan[TOKEN_CLASSIFIER] = TrainedHead
    return wrap_modules(model, plan)


def has_token_classifier(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForTokenClassification")


__all__ = [
    "Adapter", "AdapterKind", "AdapterSpec", "Bottleneck", "BottleneckSpec", "DoRALinear", "FAMILIES", "Family",
    "KINDS", "LoRALinear", "LowRankSpec", "ParallelAdapter", "SeriesAdapter", "TrainedHead", "adapter_kind",
    "adapter_params", "adapter_spec", "adapter_state_dict", "attach_adapters", "kind_of_peft_config",
    "count_parameters", "detach_adapters", "family_of", "has_token_classifier", "inject_adapters", "is_linear",
    "layer_dims", "linear_layer_names", "load_adapter_state_dict", "mark_only_adapters_trainable",
    "plan_adapters",
]
