"""The adapter family of LLM-Adapters (arXiv 2304.01933), in full precision on a frozen base.

The package's names load on first use (PEP 562), so that the recipe can read the specs
(qadapt.adapters.spec, plain data) without importing torch.
"""

from __future__ import annotations

import importlib

# name -> the module of this package that defines it
_NAMES = {
    **dict.fromkeys(["Adapter", "adapter_params", "adapter_state_dict", "adapters_off", "count_parameters", "layer_dims",
                     "load_adapter_state_dict", "mark_only_adapters_trainable"], "base"),
    **dict.fromkeys(["attach_adapters", "has_token_classifier"], "attach"),
    **dict.fromkeys(["Bottleneck", "ParallelAdapter", "SeriesAdapter"], "bottleneck"),
    "DoRALinear": "dora",
    **dict.fromkeys(["FAMILIES", "Family", "family_of"], "families"),
    **dict.fromkeys(["TOKEN_CLASSIFIER", "TrainedHead"], "head"),
    **dict.fromkeys(["detach_adapters", "inject_adapters", "is_linear", "linear_layer_names", "wrap_modules"],
                    "inject"),
    **dict.fromkeys(["KINDS", "AdapterKind", "adapter_kind", "kind_of_peft_config"], "kinds"),
    "LoRALinear": "lora",
    "plan_adapters": "placement",
    **dict.fromkeys(["AdapterSpec", "BottleneckSpec", "LowRankSpec", "adapter_spec"], "spec"),
}


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    globals()[name] = value
    return value


__all__ = sorted(_NAMES)
