"""What changes under `accelerate launch` when the base is sharded with FSDP (QLoRA + FSDP).

DDP needs nothing here: each process holds the whole quantized base, only the adapters' gradients are
averaged, and the loop gives each process its share of every step's batch (qadapt.training.train).

FSDP's ranks load the base on the host, never whole on a GPU: FSDP moves each rank's shard there as it
wraps the layers (a 70B in NF4 is ~35 GiB, more than a 24 GB card). With cpu-ram-efficient loading
(`fsdp_cpu_ram_efficient_loading: true`, as recipes/accelerate/fsdp-qlora.yaml sets), only rank 0 reads
the checkpoint; the others build the same modules on the meta device and receive from rank 0
what FSDP does not send (each 4-bit layer's quantization state, and the base's identity); FSDP's
`sync_module_states` then broadcasts the codes and the other weights from rank 0.

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

HOST = torch.device("cpu")


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def load_base_to_shard(cfg, accelerator, labels: list[str] | None = None) -> tuple[nn.Module, dict]:
    """(model, base identity): the base as FSDP shards it, loaded on the host, 4-bit codes stored in the
    compute dtype; with cpu-ram-efficient loading read by rank 0 alone (the module docstring)."""
    from qadapt.base_identity import base_identity
    from qadapt.errors import QadaptError
    from qadapt.models import load_base

    if cfg.quant == "int8":
        raise QadaptError("FSDP shards a 4-bit (nf4, fp4) or unquantized base: bitsandbytes supports FSDP for its "
                          "4-bit layers only. Set model.quant to nf4, or train the 8-bit base on one GPU (or with DDP)")
    if cpu_ram_efficient_loading(accelerator):
        return load_base_on_rank_0(cfg, accelerator.process_index, accelerator.device, labels)
    model = load_base(cfg, HOST, quant_storage_like_compute=True, labels=labels)
    return model, base_identity(model, cfg.name)


def load_base_on_rank_0(cfg, rank: int, device: torch.device, labels: list[str] | None = None) -> tuple[nn.Module, dict]:
    """(model, base identity) on every process of an initialized process group: rank 0 reads the base on the
    host; the others build its modules on the meta device, with each 4-bit layer's quantization state (on
    `device`) and the identity sent by rank 0. Their weights stay to be filled, by FSDP's sync_module_states."""
    from qadapt.base_identity import base_identity
    from qadapt.models import load_base
    from qadapt.quant import four_bit_layer_states, keep_quant_states_on_layers, rebuild_four_bit_layers

    if rank == 0:
        model = load_base(cfg, HOST, quant_storage_like_compute=True, labels=labels)
        keep_quant_states_on_layers(model)
        sent = [base_identity(model, cfg.name), four_bit_layer_states(model)]
    else:
        model, sent = meta_base(cfg, labels), [None, None]
    torch.distributed.broadcast_object_list(sent, src=0)
    identity, states = sent
    if rank != 0:
        rebuild_four_bit_layers(model, states, device)
    return model, identity


def cpu_ram_efficient_loading(accelerator) -> bool:
    """Whether the accelerate config has rank 0 alone read the base (FSDP then syncs the others)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return bool(plugin is not None and plugin.cpu_ram_efficient_loading and plugin.sync_module_states)


def meta_base(cfg, labels: list[str] | None = None) -> nn.Module:
    """The base's modules on the meta device, in the compute dtype, frozen: what rank 0 loads, without
    weights (its 4-bit layers are rebuilt by qadapt.quant.rebuild_four_bit_layers)."""
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    from qadapt.models import meta_model, resolve_compute_dtype

    auto_class = AutoModelForTokenClassification if labels is not None else AutoModelForCausalLM
    return meta_model(cfg, auto_class, resolve_compute_dtype(cfg.compute_dtype), labels).requires_grad_(False)


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
