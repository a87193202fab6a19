"""What every adapter declares, and the helpers that rely only on that declaration.

An adapter wraps (or sits beside) a frozen base layer and names its own trainable parameters in
`adapter_params()`. Freezing, counting, saving and loading use that declaration, never name patterns.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from qadapt.errors import QadaptError


class Adapter(nn.Module):
    """Base class of the adapter family. `self.base` is the module it wraps (put back by detaching)."""

    base: nn.Module

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """Trainable parameters, by name relative to this module."""
        raise NotImplementedError


def layer_dims(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear layer: nn.Linear, bitsandbytes 4/8-bit, or Conv1D."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    # transformers' Conv1D (GPT-2) computes x @ W + b with W stored transposed, as (in, out).
    in_features, out_features = layer.weight.shape
    return in_features, out_features


def adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every adapter parameter of `model`, by its full name in the model."""
    return {
        f"{module_name}.{param_name}": param
        for module_name, module in model.named_modules()
        if isinstance(module, Adapter)
        for param_name, param in module.adapter_params().items()
    }


@contextmanager
def adapters_off(model: nn.Module):
    """`model` computes as its base alone inside the block: every adapter passes its input to the module it
    wraps. The reference policy of learning from rewards, with no second copy of the base."""
    adapters = [m for m in model.modules() if isinstance(m, Adapter)]
    # A forward set on the instance (qadapt.lean_cpu's fused LoRA) is put back afterwards, not dropped.
    own_forwards = [vars(adapter).get("forward") for adapter in adapters]
    for adapter in adapters:
        adapter.forward = adapter.base.forward  # an instance attribute: nn.Module.__call__ finds it first
    try:
        yield model
    finally:
        for adapter, forward in zip(adapters, own_forwards):
            if forward is None:
                del adapter.forward
            else:
                adapter.forward = forward


def mark_only_adapters_trainable(model: nn.Module) -> None:
    model.requires_grad_(False)
    for param in adapter_params(model).values():
        param.requires_grad_(True)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().cpu().contiguous() for name, param in adapter_params(model).items()}


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved adapter weights in; every expected key must be there and nothing else."""
    params = adapter_params(model)
    missing = sorted(params.keys() - state.keys())
    unexpected = sorted(state.keys() - params.keys())
    if missing or unexpected:
        raise QadaptError(
            f"adapter weights do not fit this model: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    with torch.no_grad():
        for name, param in params.items():
            if param.shape != state[name].shape:
                raise QadaptError(f"adapter weight {name} has shape {tuple(state[name].shape)}, "
                                  f"the model expects {tuple(param.shape)}")
            param.copy_(state[name])


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit weight counts its real element number."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = 0
    for param in model.parameters():
        # bitsandbytes packs two 4-bit values per byte; its quant_state keeps the true shape.
        quant_state = getattr(param, "quant_state", None)
        total += quant_state.shape.numel() if quant_state is not None else param.numel()
    return trainable, total
