"""Predict a recipe's peak training memory from the model's config alone, before downloading weights.

    qadapt plan RECIPE [overrides] [--gpu-memory 24]

The model is built on PyTorch's meta device (shapes, no storage), so any size costs nothing:
- base weights: each linear that bitsandbytes quantizes at its bytes per weight (NF4/FP4: 4 bits plus
  its block scales; int8: 1 byte plus a row scale), the rest (embeddings, norms, the head) in the
  compute dtype;
- adapters: the recipe's adapters are attached to the meta model and counted: fp32 weights, gradients
  and the optimizer's state (AdamW 8 bytes per weight, its 8-bit forms 2);
- activations: one decoder layer runs forward on meta tensors while a saved-tensors hook adds up what
  autograd keeps for backward. With checkpointing every layer keeps only its input, and one layer at a
  time is recomputed with its full set; without, every layer keeps its set;
- logits and loss: a chunk of positions at a time (qadapt's loss) in fp32 and the compute dtype;
- on a GPU, the CUDA context and allocator slack come on top of what torch reports as allocated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qadapt.errors import QadaptError
from qadapt.recipe import Recipe

GIB = 2**30
BITS4_BYTES_PER_WEIGHT = {True: 0.5 + 1 / 64 + 4 / (64 * 256), False: 0.5 + 4 / 64}  # by double_quant
OPTIMIZER_BYTES_PER_WEIGHT = {"adamw": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2, "paged_adamw_32bit": 8}
CUDA_CONTEXT_BYTES = 0.5 * GIB  # the CUDA context and kernels: outside torch's allocator
ALLOCATOR_SLACK = 0.10  # fragmentation in the caching allocator, beyond the peak it reports
_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass
class MemoryPlan:
    parts: dict[str, float]  # bytes, by what holds them
    gpu_memory_gib: float

    @property
    def allocated(self) -> float:
        """What torch.cuda.max_memory_allocated would report at the peak."""
        return sum(self.parts.values())

    @property
    def needed(self) -> float:
        return self.allocated * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_BYTES

    @property
    def fits(self) -> bool:
        return self.needed <= self.gpu_memory_gib * GIB


def plan_memory(recipe: Recipe, gpu_memory_gib: float = 24.0, compute_dtype_bytes: int = 2,
                fsdp_gpus: int = 1) -> MemoryPlan:
    """The memory `recipe` needs at its peak on one GPU, part by part (compute dtype auto counts as 16-bit).

    `fsdp_gpus` > 1: FSDP FULL_SHARD over that many GPUs. Base weights, adapter weights, gradients and
    optimizer state are split; each GPU also holds the decoder layers gathered whole at a time (the one
    running and the one prefetched); activations are per GPU, as before.
    """
    from qadapt.adapters import attach_adapters, is_linear
    from qadapt.models import meta_model
    from qadapt.tasks import task_named
    from qadapt.tasks.causal_lm import LOSS_CHUNK_TOKENS

    if fsdp_gpus < 1:
        raise QadaptError(f"--fsdp-gpus must be at least 1, got {fsdp_gpus}")

    dtype_bytes = _DTYPE_BYTES.get(recipe.model.compute_dtype, compute_dtype_bytes)
    task = task_named(recipe.task)
    model = meta_model(recipe.model, task.auto_class())
    model.requires_grad_(False)
    head = task.logits_head(model)
    quantized = sum(m.weight.numel() for m in model.modules() if is_linear(m) and m is not head)
    other = sum(p.numel() for p in model.parameters()) - quantized
    attach_adapters(model, recipe.adapter)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    rows, length = task.micro_batch_shape(recipe)
    tokens = rows * length
    config = model.config
    hidden, layers = config.hidden_size, config.num_hidden_layers
    vocab = head.out_features  # the width of the logits: the vocabulary, or the labels
    per_layer = saved_bytes_per_layer(model, rows, length, dtype_bytes)
    if recipe.train.gradient_checkpointing is not False:  # auto is planned as the safe choice
        activations = layers * tokens * hidden * dtype_bytes + per_layer
    else:
        activations = layers * per_layer
    chunk = min(tokens, LOSS_CHUNK_TOKENS)
    base = quantized * _bytes_per_quantized_weight(recipe, dtype_bytes) + other * dtype_bytes
    embeddings = sum(p.numel() for m in (model.get_input_embeddings(), head) for p in m.parameters())
    layer_weights = (base - embeddings * dtype_bytes) / layers
    parts = {
        "base weights": base / fsdp_gpus,
        "adapter weights + gradients": trainable * 8 / fsdp_gpus,
        "optimizer state": trainable * OPTIMIZER_BYTES_PER_WEIGHT[recipe.train.optimizer] / fsdp_gpus,
        "activations": activations,
        # A backward pass holds about as much again in gradients of one layer's activations.
        "backward of one layer": per_layer,
        # Logits of a chunk in the compute dtype and fp32, log-softmax and their gradients; hidden-state grads.
        "logits and loss": chunk * vocab * (2 * dtype_bytes + 12) + 2 * tokens * hidden * dtype_bytes,
    }
    if fsdp_gpus > 1:
        parts["layers gathered by FSDP"] = 2 * layer_weights
    return MemoryPlan(parts, gpu_memory_gib)


def choose_gradient_checkpointing(recipe: Recipe, device: torch.device) -> tuple[bool, str]:
    """(checkpoint?, why) for `train.gradient_checkpointing`; `auto` checkpoints only when the plan without
    it needs more than half the memory free on the device (a GPU's free memory, or the host's available RAM).
    """
    import dataclasses

    from qadapt.devices import free_memory

    setting = recipe.train.gradient_checkpointing
    if setting != "auto":
        return setting, "as the recipe says"
    free = free_memory(device)
    without = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, gradient_checkpointing=False))
    dtype_bytes = 4 if device.type == "cpu" and not _fast_16bit(recipe) else 2
    need = plan_memory(without, compute_dtype_bytes=dtype_bytes).allocated
    checkpoint = need > free / 2
    why = (f"auto: without it the plan needs {need / GIB:.1f} GiB, "
           f"{'more' if checkpoint else 'less'} than half the {free / GIB:.1f} GiB free")
    return checkpoint, why


def _fast_16bit(recipe: Recipe) -> bool:
    from qadapt.models import resolve_compute_dtype

    return resolve_compute_dtype(recipe.model.compute_dtype) != torch.float32


def _bytes_per_quantized_weight(recipe: Recipe, dtype_bytes: int) -> float:
    quant = recipe.model.quant
    if quant in ("nf4", "fp4"):
        return BITS4_BYTES_PER_WEIGHT[recipe.model.double_quant]
    return 1.0 + 4 / 1024 if quant == "int8" else dtype_bytes  # int8: a row scale per ~1k weights


def saved_bytes_per_layer(model, batch: int, length: int, dtype_bytes: int) -> int:
    """What autograd keeps for backward in one decoder layer, measured by running it on meta tensors."""
    layer, rotary = _first_decoder_layer(model)
    dtype = torch.float32 if dtype_bytes == 4 else torch.bfloat16
    layer.to(dtype)
    for param in layer.parameters():  # adapters compute in fp32 whatever the base dtype
        if param.requires_grad:
            param.data = param.data.to(torch.float32)
    model.train()
    x = torch.empty(batch, length, model.config.hidden_size, device="meta", dtype=dtype, requires_grad=True)
    kwargs = {}
    if rotary is not None:
        kwargs["position_embeddings"] = rotary(x, torch.arange(length, device="meta")[None])
    # Weights saved for backward are not activations; a tensor saved by several ops is held once.
    weights = {param.untyped_storage()._cdata for param in layer.parameters()}
    saved: dict[int, int] = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        layer(x, **kwargs)
    return sum(saved.values())


def _first_decoder_layer(model):
    """The first repeated block (a ModuleList's first entry) and the model's rotary embedding if any."""
    rotary = next((m for name, m in model.named_modules() if name.endswith("rotary_emb")), None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == model.config.num_hidden_layers:
            return module[0], rotary
    raise ValueError("no decoder layer list found")


def advice(plan: MemoryPlan, recipe: Recipe) -> list[str]:
    """What to change, biggest saving first, when the plan does not fit."""
    tips = []
    if recipe.train.gradient_checkpointing is False:
        tips.append("train.gradient_checkpointing=true (keeps one layer's activations instead of all)")
    if recipe.train.micro_batch_size > 1:
        tips.append(f"train.micro_batch_size={recipe.train.micro_batch_size // 2} with "
                    f"train.grad_accum={recipe.train.grad_accum * 2} (halves activations, same batch)")
    if recipe.train.optimizer in ("adamw", "paged_adamw_32bit"):
        tips.append("train.optimizer=paged_adamw_8bit (optimizer state 8 → 2 bytes per weight)")
    if recipe.model.quant in ("none", "int8"):
        tips.append("model.quant=nf4 (base weights at about half a byte each)")
    tips.append(f"data.cutoff_len={recipe.data.cutoff_len // 2} (halves activations; long examples are cut)")
    return tips


def format_plan(plan: MemoryPlan, recipe: Recipe) -> str:
    lines = [f"{name:30} {value / GIB:8.2f} GiB" for name, value in plan.parts.items()]
    lines += [
        f"{'peak allocated (torch)':30} {plan.allocated / GIB:8.2f} GiB",
        f"{'with CUDA context and slack':30} {plan.needed / GIB:8.2f} GiB of {plan.gpu_memory_gib:g} GiB: "
        + ("fits" if plan.fits else "does NOT fit"),
    ]
    if not plan.fits:
        lines += ["to fit, try (biggest saving first):"] + [f"  {tip}" for tip in advice(plan, recipe)]
    return "\n".join(lines)
