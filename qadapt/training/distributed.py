"""What changes under `accelerate launch` when the base is sharded with FSDP (QLoRA + FSDP).

DDP needs nothing here: each process holds the whole quantized base, only the adapters' gradients are
averaged, and the loop gives each process its share of every step's batch (qadapt.training.train).

FSDP (version 1, `fsdp_use_orig_params: false`) flattens the parameters of each unit it wraps into one
tensor, which asks two things of a 4-bit base with adapters:
- one dtype per flat tensor: bitsandbytes stores the 4-bit codes in the compute dtype instead of uint8
  (`bnb_4bit_quant_storage`, qadapt.models.load_base);
- one `requires_grad` per flat tensor: each adapter becomes a unit of its own, and the frozen layer it
  wraps another. Otherwise FSDP would need `use_orig_params: true`, and would then keep gradient
  buffers for the frozen base weights too.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def fsdp_units(model: nn.Module) -> set[int]:
    """ids of the modules that become FSDP units so that every unit's own parameters share one requires_grad.

    - each decoder layer (the model's `_no_split_modules`): frozen weights, gathered one layer at a time;
    - each adapter: its own trainable weights, gathered when it runs (it may read them directly);
    - each frozen child of an adapter (the base layer or block it wraps), so that it stays out of the
      adapter's unit.
    """
    from qadapt.adapters import Adapter

    layer_names = set(getattr(model, "_no_split_modules", None) or [])
    units = set()
    for module in model.modules():
        if type(module).__name__ in layer_names:
            units.add(id(module))
        if isinstance(module, Adapter):
            units.add(id(module))
            units.update(id(child) for child in module.children() if _all_frozen(child))
    return units


def _all_frozen(module: nn.Module) -> bool:
    params = list(module.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


def wrap_adapters_apart(accelerator, model: nn.Module) -> None:
    """Give accelerate's FSDP plugin a wrap policy built from `fsdp_units` (before `prepare`)."""
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    units = fsdp_units(model)
    plugin = accelerator.state.fsdp_plugin
    plugin.auto_wrap_policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda module: id(module) in units)


FSDP_PREFIX = "_fsdp_wrapped_module."


def _adapter_units(model: nn.Module):
    """(name, FSDP unit) of every adapter that FSDP wrapped (see `fsdp_units`)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from qadapt.adapters import Adapter

    for name, unit in model.named_modules():
        if isinstance(unit, FSDP) and isinstance(unit.module, Adapter):
            yield name.replace(FSDP_PREFIX, ""), unit


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return isinstance(model, FSDP)


def adapter_weights(model: nn.Module) -> dict | None:
    """The adapter's whole weights, gathered one adapter at a time, when FSDP shards them (every process
    must call); None for a model that holds them whole."""
    if not is_sharded(model):
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    weights = {}
    for name, unit in _adapter_units(model):
        with FSDP.summon_full_params(unit, recurse=False, writeback=False):
            for param_name, param in unit.module.adapter_params().items():
                weights[f"{name}.{param_name}"] = param.detach().float().cpu().clone()
    return weights


def load_adapter_weights(model: nn.Module, weights: dict) -> None:
    """Copy saved adapter weights into an FSDP-sharded model (every process must call)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    for name, unit in _adapter_units(model):
        with FSDP.summon_full_params(unit, recurse=False, writeback=True), torch.no_grad():
            for param_name, param in unit.module.adapter_params().items():
                param.copy_(weights[f"{name}.{param_name}"])


def optimizer_state(model: nn.Module, optimizer) -> dict:
    """The optimizer's state to save; under FSDP gathered whole (every process must call)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.optim_state_dict(model, optimizer)


def load_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    optimizer = getattr(optimizer, "optimizer", optimizer)
    if is_sharded(model):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        state = FSDP.optim_state_dict_to_load(model, optimizer, state)
    optimizer.load_state_dict(state)
