"""Attach adapters to a model in place: match targets, wrap them on their parent, report the names.

Default targets come from a table keyed on `config.model_type`, never on a model's name.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from qadapt.adapters.base import Adapter, mark_only_adapters_trainable
from qadapt.errors import QadaptError

_LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# config.model_type -> module-name suffixes wrapped by default: every linear layer but the LM head.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": _LLAMA_LINEARS,
    "mistral": _LLAMA_LINEARS,
    "qwen2": _LLAMA_LINEARS,
    "qwen3": _LLAMA_LINEARS,
}


def linear_layer_names(model: nn.Module) -> list[str]:
    """The distinct last name parts of the model's linear layers, e.g. ['down_proj', 'lm_head', ...]."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise QadaptError(
            f"no default adapter targets for model type {model_type!r}; set adapter.targets to some of "
            f"the model's linear layers: {', '.join(linear_layer_names(model))}"
        )
    return DEFAULT_TARGETS[model_type]


def inject_adapters(model: nn.Module, targets: list[str], wrap: Callable[[nn.Linear], Adapter]) -> list[str]:
    """Replace every linear layer whose name ends with a target by `wrap(layer)`; return their names."""
    matched = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not isinstance(module, Adapter)
        and any(name == t or name.endswith("." + t) for t in targets)
    ]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in matched)]
    if unmatched:
        raise QadaptError(
            f"adapter target(s) {', '.join(unmatched)} match no linear layer; the model's linear layers "
            f"are: {', '.join(linear_layer_names(model))}"
        )
    for name in matched:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, wrap(getattr(parent, child)))
    mark_only_adapters_trainable(model)
    return matched
