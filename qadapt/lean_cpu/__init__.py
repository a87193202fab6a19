"""What qadapt does only for speed and memory on a CPU, behind one door.

The training loop, the loss and the adapters' forwards read as their equations, and that is what runs
on a GPU. On a CPU, where a step takes seconds and memory is the host's, these pay (each measured on
the embedded model in docs/benchmarks/training.md):
- heap: memory that loading and training free goes back to the system (glibc), and weights leave the
  mapped checkpoint file;
- masks: dropout masks cheap to draw (the same drop rate, other random numbers); on request
  (`train.shared_dropout_masks`), one mask shared by the adapters that read one input, which changes
  the math against PEFT's one mask per layer, so it is never on by default;
- fused_lora: LoRA's sum in fewer passes over full-width tensors;
- answering from unpacked 4-bit weights, when memory allows.

`applies(device)` is the door. Each stage of a model's life passes it once, and on a CPU only:
    loading     qadapt.models.load_base                 before_loading(), after_loading(model)
    training    qadapt.training.train.prepare_model     for_training(model)
    answering   qadapt.inference.loader                 for_answering(model), unpack_for_decoding(model)
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from qadapt.lean_cpu.fused_lora import fuse_lora_forwards
from qadapt.lean_cpu.heap import bound_heap_retention, copy_out_of_file_mappings, release_freed_memory, trim_heap
from qadapt.lean_cpu.masks import share_masks_within_blocks, use_cheap_dropout


def applies(device: torch.device) -> bool:
    """Whether a model on `device` runs on the CPU, where these measures pay."""
    return device.type == "cpu"


def before_loading() -> None:
    bound_heap_retention()


def after_loading(model: nn.Module) -> None:
    copy_out_of_file_mappings(model)
    release_freed_memory()


def for_training(model: nn.Module, shared_masks: bool = False) -> None:
    """After the adapters are attached: heap trims around each training forward, cheap dropout masks
    (shared within a block when `shared_masks`), fused LoRA."""
    backbone = getattr(model, "base_model", model)
    # Before the forward: what the last optimizer step (or backward pass) freed, fragmented, stays
    # resident otherwise. After it: what the forward freed, which backward would fault in again.
    backbone.register_forward_pre_hook(_trim_when_training)
    backbone.register_forward_hook(_trim_when_training)
    use_cheap_dropout(model)
    if shared_masks:
        share_masks_within_blocks(model)
    fuse_lora_forwards(model)


def for_answering(model: nn.Module) -> None:
    """A trained model as it computed in training: fused LoRA."""
    fuse_lora_forwards(model)


def _trim_when_training(module: nn.Module, *_) -> None:
    if module.training and torch.is_grad_enabled():
        trim_heap()


def unpack_for_decoding(model, free_bytes: float | None = None) -> bool:
    """Unpack the 4-bit base (same numbers, faster decoding) when that fits in half the free memory.

    A 4-bit layer re-derives its full weight from the codes at every forward, and a decoding step is a
    forward over a few rows, so on a CPU that work rivals the product itself (docs/benchmarks/decoding.md,
    "Decoding from unpacked 4-bit weights"). `free_bytes` defaults to the host's free memory. Returns
    whether it unpacked.
    """
    from qadapt.devices import free_memory
    from qadapt.quant import unpack_quantized_layers, unpacked_bytes

    need = unpacked_bytes(model)
    if not need:
        return False
    free = free_memory(torch.device("cpu")) if free_bytes is None else free_bytes
    if need > free / 2:
        print(f"decoding from the packed 4-bit weights: unpacking them needs {need / 2**20:,.0f} MB, "
              f"more than half the {free / 2**20:,.0f} MB free", file=sys.stderr)
        return False
    unpack_quantized_layers(model)
    print(f"decoding with the 4-bit weights unpacked (+{need / 2**20:,.0f} MB): the same numbers, faster",
          file=sys.stderr)
    return True


__all__ = ["after_loading", "applies", "before_loading", "for_answering", "for_training", "trim_heap",
           "unpack_for_decoding"]
