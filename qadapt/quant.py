"""The bitsandbytes boundary: the one module that imports it, always inside functions.

Holds what qadapt needs from bitsandbytes: the quantization config for loading a frozen base in
4-bit (NF4/FP4, QLoRA, arXiv 2305.14314) or 8-bit (LLM.int8(), arXiv 2208.07339), the k-bit training
preparation, and the 8-bit / paged optimizers.
"""

from __future__ import annotations

import copy
import sys

import torch

from qadapt.errors import QadaptError


def _bitsandbytes():
    if "bitsandbytes" not in sys.modules:
        _import_without_compiling_fallbacks()
    import bitsandbytes

    return bitsandbytes


def _import_without_compiling_fallbacks() -> None:
    """Import bitsandbytes with torch.compile set aside for the moment of its import.

    bitsandbytes 0.50 wraps four of its device-independent fallback kernels in torch.compile when it is
    imported, which imports torch's compiler (dynamo and inductor): most of every qadapt command's start
    (measured: docs/benchmarks/startup.md). Neither fallback runs here: the CPU and CUDA backends register their own
    kernels for those ops (dequantizing 4-bit and blockwise, the 32-bit optimizer step), and an odd-shaped
    4-bit layer that reaches a fallback runs it eagerly, with the same arithmetic.
    """
    compile_ = torch.compile
    torch.compile = lambda model=None, **options: model if model is not None else (lambda function: function)
    try:
        import bitsandbytes  # noqa: F401
    finally:
        torch.compile = compile_


def auto_compute_dtype() -> torch.dtype:
    """The compute dtype `auto` means here: the fastest one that keeps training stable.

    A GPU from Ampere on (compute capability 8.0: A100, RTX 30/40) runs bf16 at full speed. Older ones
    (T4, V100, RTX 20) have fast fp16 but emulate bf16 slowly, although torch.cuda.is_bf16_supported()
    says yes: fp16 there, with loss scaling in training (qadapt.training.loss_scale). A CPU with
    AVX512-BF16 or AMX runs bf16 ~4.5x faster than fp32; without it, bf16 crawls: fp32.
    """
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float16
    return torch.bfloat16 if _bitsandbytes().functional.has_avx512bf16() else torch.float32


def quantization_config(quant: str, double_quant: bool, compute_dtype: torch.dtype,
                        storage: torch.dtype | None = None, skip: list[str] | None = None):
    """transformers' BitsAndBytesConfig for `quant` (nf4 | fp4 | int8), or None for `none`.

    `storage`: the dtype that holds 4-bit codes (default uint8; FSDP needs the compute dtype).
    `skip`: modules left unquantized (a new head that trains); None lets transformers pick (the LM head).
    """
    if quant == "none":
        return None
    _bitsandbytes()
    from transformers import BitsAndBytesConfig

    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        llm_int8_skip_modules=skip,
        bnb_4bit_quant_type=quant,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=storage or torch.uint8,
    )


def prepare_for_kbit_training(model: torch.nn.Module, gradient_checkpointing: bool) -> None:
    """Make a (quantized or not) frozen base ready for adapter training, step by step."""
    # 1. Nothing of the base trains: adapters are attached afterwards with their own parameters.
    model.requires_grad_(False)
    # 2. Keep 4-bit weights in their training layout through periodic eval (the function says why).
    disable_cpu_weight_repacking(model)
    # 3. The KV cache is useless while training and conflicts with checkpointing.
    model.config.use_cache = False
    # 4. Non-reentrant checkpointing propagates gradients to the adapters inside each checkpointed
    #    layer even though the (frozen) embedding output does not require grad, so no input hook.
    if gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", True):
            raise QadaptError(f"{type(model).__name__} does not support gradient checkpointing in transformers; "
                              "set train.gradient_checkpointing: false (more memory, less compute)")
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # Unlike peft's prepare_model_for_kbit_training we do not upcast the frozen norms, embeddings and
    # head to fp32: they stay in the compute dtype (RMSNorm computes in fp32 internally) and the loss
    # is computed in fp32, which keeps training stable without a second copy of those weights.


def disable_cpu_weight_repacking(model: torch.nn.Module) -> None:
    """Keep bitsandbytes from repacking 4-bit weights for its AVX512-BF16 CPU inference kernel.

    On such a CPU a Linear4bit forward in eval mode under no_grad repacks its weights in place;
    training afterwards fails ("a view of a leaf Variable ... in-place"), and the repacked kernel
    computes in bf16 even for fp32 inputs, so its logits differ from the training ones.
    """
    bnb = _bitsandbytes()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer for a recipe's `train.optimizer`. Paged optimizers run unpaged on a CPU."""
    if name == "adamw":
        return torch.optim.AdamW
    optim = _bitsandbytes().optim
    classes = {
        "adamw_8bit": optim.AdamW8bit,
        "paged_adamw_8bit": optim.PagedAdamW8bit,
        "paged_adamw_32bit": optim.PagedAdamW32bit,
    }
    if name not in classes:
        raise QadaptError(f"unknown optimizer {name!r}; choose one of adamw, {', '.join(classes)}")
    return classes[name]


def unpaged_here(name: str, device: torch.device) -> str | None:
    """What to tell the user when a paged optimizer runs where paging does not exist (a CPU), else None.

    Paging (CUDA unified memory) moves optimizer state to CPU memory when the GPU runs short; bitsandbytes
    runs the same optimizer unpaged on a CPU and warns in its own words (qadapt.console silences that).
    """
    if not name.startswith("paged_") or device.type == "cuda":
        return None
    return (f"train.optimizer {name}: paging is a CUDA feature; on this {device.type} it runs unpaged "
            f"(the same {name.removeprefix('paged_')} updates)")


def is_quantized_linear(module: torch.nn.Module) -> bool:
    """A bitsandbytes 4-bit or 8-bit linear layer (both are nn.Linear subclasses)."""
    bnb = _bitsandbytes()
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def set_compute_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Compute in `dtype` while keeping the quantized weights exactly as loaded.

    Quantizing the same checkpoint from bf16 and from fp32 gives different 4-bit codes, so a base is
    always loaded (and quantized) in the dtype it was trained with; this changes only what it computes in.
    """
    bnb = _bitsandbytes()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = dtype
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point() and tensor.dtype != dtype:
            tensor.data = tensor.data.to(dtype)


def dequantized_weight(module: torch.nn.Module) -> torch.Tensor:
    """The (out, in) weight a bitsandbytes 4-bit or 8-bit layer computes with, in fp32."""
    bnb = _bitsandbytes()
    weight = module.weight
    if isinstance(module, bnb.nn.Linear4bit):
        # Straight to fp32, as the fp32 forward does: no rounding through the dtype it was loaded in.
        state = copy.copy(weight.quant_state)
        state.dtype = torch.float32
        return bnb.functional.dequantize_4bit(weight.data, state)
    if isinstance(module, bnb.nn.Linear8bitLt):
        # The row scales move from the weight to the layer's state at the first forward.
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        return bnb.functional.int8_vectorwise_dequant(weight.data, scales).to(torch.float32)
    raise TypeError(f"{type(module).__name__} is not a bitsandbytes quantized layer")


def unpack_quantized_layers(model: torch.nn.Module) -> int:
    """Replace every frozen 4-bit layer by a plain linear of its de-quantized weight; return bytes added.

    For decoding only (qadapt.lean_cpu decides when, on a CPU). The weight is the one the layer computes
    with, in its compute dtype. 8-bit layers stay: their forward is an int8 product, not a product with
    the de-quantized weight.
    """
    from qadapt.adapters.inject import replace_module

    bnb = _bitsandbytes()
    added = 0
    for name, packed in [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]:
        dtype = packed.compute_dtype or torch.float32
        plain = torch.nn.Linear(packed.in_features, packed.out_features, bias=packed.bias is not None,
                                device=packed.weight.device, dtype=dtype)
        plain.weight.data = dequantized_weight(packed).to(dtype).contiguous()
        if packed.bias is not None:
            plain.bias.data = packed.bias.data.to(dtype)
        plain.requires_grad_(False)
        added += plain.weight.numel() * plain.weight.element_size() - packed.weight.numel()
        replace_module(model, name, plain)
    return added


def unpacked_bytes(model: torch.nn.Module) -> int:
    """Memory `unpack_quantized_layers` would add: full weights in the compute dtype less the 4-bit codes."""
    bnb = _bitsandbytes()
    total = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            dtype = module.compute_dtype or torch.float32
            total += module.in_features * module.out_features * dtype.itemsize - module.weight.numel()
    return total


def four_bit_layer_states(model: torch.nn.Module) -> dict[str, dict]:
    """{name: what rebuilds that 4-bit layer on another process}: its sizes, the shape and storage dtype of
    its codes, its compute dtype and its quantization state (block scales, code map), on the CPU."""
    bnb = _bitsandbytes()
    states = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state.as_dict()
            states[name] = {
                "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None, "codes_shape": tuple(module.weight.shape),
                "storage": module.weight.dtype, "compute_dtype": module.compute_dtype,
                "quant_state": {key: value.cpu() if torch.is_tensor(value) else value for key, value in state.items()},
            }
    return states


def rebuild_four_bit_layers(model: torch.nn.Module, states: dict[str, dict], device: torch.device) -> None:
    """Turn the named linears of a model built on the meta device into 4-bit layers like the ones
    `four_bit_layer_states` read: codes still on the meta device (to be filled: FSDP's sync_module_states
    sends them), quantization state on `device`, kept on the layer too (FSDP's flat parameters lose it)."""
    from qadapt.adapters.inject import replace_module

    bnb = _bitsandbytes()
    for name, layer_state in states.items():
        state = bnb.functional.QuantState.from_dict(layer_state["quant_state"], device)
        storage = layer_state["storage"]
        layer = bnb.nn.Linear4bit(layer_state["in_features"], layer_state["out_features"], bias=layer_state["bias"],
                                  compute_dtype=layer_state["compute_dtype"], compress_statistics=state.nested,
                                  quant_type=state.quant_type, quant_storage=storage, device="meta")
        layer.weight = bnb.nn.Params4bit(torch.empty(layer_state["codes_shape"], dtype=storage, device="meta"),
                                         requires_grad=False, quant_state=state, blocksize=state.blocksize,
                                         compress_statistics=state.nested, quant_type=state.quant_type,
                                         quant_storage=storage, module=layer, bnb_quantized=True)
        if layer.bias is not None:
            layer.bias = torch.nn.Parameter(torch.empty_like(layer.bias, dtype=layer_state["compute_dtype"]),
                                            requires_grad=False)
        layer.quant_state = state
        replace_module(model, name, layer)


def keep_quant_states_on_layers(model: torch.nn.Module) -> None:
    """Keep each 4-bit layer's quantization state on the layer itself, where bitsandbytes finds it again
    once FSDP has flattened the weight into a plain tensor."""
    bnb = _bitsandbytes()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.quant_state = module.weight.quant_state
