"""The model a run trains: the base loaded for its device, frozen and prepared, the recipe's adapters
attached; on a CPU, qadapt.lean_cpu's measures switched on. `qadapt train` and the benchmarks in tools/
start from here, so that they measure what a run trains.
"""

from __future__ import annotations


import torch

from qadapt import lean_cpu
from qadapt.adapters import attach_adapters
from qadapt.base_identity import base_identity
from qadapt.console import say
from qadapt.errors import QadaptError
from qadapt.models import load_base
from qadapt.training.plan import choose_gradient_checkpointing
from qadapt.quant import prepare_for_kbit_training
from qadapt.recipe import Recipe
from qadapt.run_dir import adapter_folder_of
from qadapt.training import distributed


def prepare_model(recipe: Recipe, device: torch.device, labels: list[str] | None = None,
                  fsdp_accelerator=None) -> tuple[torch.nn.Module, list[str], dict]:
    """(model, wrapped module names, base identity): the base loaded for `device`, frozen and prepared for
    k-bit training, the recipe's adapters attached (and started from adapter.start_from); on a CPU the
    lean measures switched on (qadapt.lean_cpu). `fsdp_accelerator`: the base is loaded for FSDP to shard.
    """
    if fsdp_accelerator is not None:
        model, base = distributed.load_base_to_shard(recipe.model, fsdp_accelerator, labels)
    else:
        model = load_base(recipe.model, device, labels=labels)
        base = base_identity(model, recipe.model.name)
    checkpointing, why = choose_gradient_checkpointing(recipe, device)
    if recipe.train.gradient_checkpointing == "auto":
        say(f"gradient checkpointing {'on' if checkpointing else 'off'} ({why})")
    prepare_for_kbit_training(model, checkpointing)
    wrapped = attach_adapters(model, recipe.adapter)
    if recipe.adapter.start_from:
        start_from_adapter(model, recipe.adapter.start_from, base)
    if lean_cpu.applies(device):
        lean_cpu.for_training(model, shared_masks=recipe.train.shared_dropout_masks)
    return model, wrapped, base


def start_from_adapter(model: torch.nn.Module, path: str, base: dict) -> None:
    """Load a finished run's (or an adapter folder's) weights into the freshly attached adapters."""
    folder = adapter_folder_of(path)
    if not folder.path.is_dir():
        raise QadaptError(f"adapter.start_from: no run or adapter folder at {folder.path}")
    try:
        folder.load_into(model, base)
    except QadaptError as exc:
        raise QadaptError(f"adapter.start_from {folder.path}: {exc}") from None
    say(f"adapter: starting from the weights in {folder.path}")
