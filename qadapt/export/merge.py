"""Fold LoRA / DoRA into a full-precision base and save a standard Hugging Face folder, verified.

    qadapt merge RUN_DIR --out DIR [--dtype auto|bf16|fp16|fp32] [--base dequantized|original]

The base to fold into:
- `dequantized` (default): the base exactly as the adapter was trained against it: every quantized
  linear de-quantized from the run's 4-bit / 8-bit weights, the other weights as loaded for training;
- `original`: the base checkpoint's full-precision weights, which the adapter never saw.
Each fold W' = W + s·BA (DoRA: m ⊙ (W + s·BA) / ‖W + s·BA‖ per row) is computed in fp32, one layer at
a time, on the one copy of the base that is held, in the output dtype, in the host's memory (a 7B base
in bf16 needs ~13 GB there, in fp32 ~26 GB; the trained model stays on the GPU when there is one, and
its de-quantized weights are copied to the host a layer at a time). The merge says what it needs before
loading the base, and refuses when the host does not have it.

Before the folder is moved into place it is loaded back with transformers and compared, on a few
templated prompts, with the adapter on the same base in the same dtype (this must agree: the fold
is exact up to rounding into the dtype), and with the trained model as it ran (quantized, fp32
compute), which shows what the chosen base and dtype cost. Where the CPU runs the output dtype slowly
(16 bits without AVX512-BF16: ~6× slower than fp32) and the host has room, both sides of that check
compute in fp32 from the same stored weights.
"""

from __future__ import annotations

import gc
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from qadapt.adapters import Adapter, LoRALinear, attach_adapters, is_linear
from qadapt.adapters.inject import replace_module
from qadapt.adapters.kinds import adapter_kind
from qadapt.errors import QadaptError
from qadapt.files import atomic_folder, describe_written, refuse_existing
from qadapt.tasks import task_named

BASES = ("dequantized", "original")
MERGE_DTYPES = ("auto", "bf16", "fp16", "fp32")
MERGE_INFO_FILE = "qadapt_merge.json"
# Least top-1 agreement between the merged model and the adapter on the same base, per dtype. The fold
# is exact in fp32; in 16 bits the merged weight is rounded once more than the base
# (measured: docs/benchmarks/exports.md).
MIN_TOP1_AGREEMENT = {torch.float32: 0.999, torch.bfloat16: 0.95, torch.float16: 0.98}


def refuse_unmergeable(recipe, export: str, action: str) -> None:
    """A clear error when the run's task has no such `export` (merge, peft, gguf) or its adapter cannot be
    folded into the base; `action` says what was asked, in words."""
    task_named(recipe.task).refuse_export(export, action)
    refuse_non_linear(recipe.adapter.kind, action)


def refuse_non_linear(kind: str, action: str) -> None:
    if not adapter_kind(kind).mergeable:
        raise QadaptError(
            f"cannot {action} a {kind} adapter: it applies a non-linear function (up(act(down(h)))), so no "
            "weight matrix of the base can absorb it. Run the model with the adapter attached instead "
            "(qadapt eval / generate / chat RUN_DIR, or load_trained_model), or ship the run's adapter/ folder"
        )


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """A full-precision linear layer's weight as (out, in) in fp32 (GPT-2's Conv1D stores it as (in, out))."""
    weight = layer.weight.detach()
    return (weight.T if isinstance(layer, Conv1D) else weight).to(torch.float32)


def set_weight_matrix(layer: nn.Module, matrix: torch.Tensor, name: str) -> None:
    """Store an (out, in) fp32 matrix into the layer, in its layout and dtype, refusing NaN/inf."""
    dtype = layer.weight.dtype
    if not torch.isfinite(matrix).all():
        raise QadaptError(f"{name}: the merged weight has NaN or inf values; the adapter weights are broken")
    if matrix.abs().max() > torch.finfo(dtype).max:
        raise QadaptError(f"{name}: the merged weight exceeds the {dtype} range; merge with --dtype bf16 or fp32")
    # On the layer's device: the matrix may come from a trained model on another (a GPU).
    value = (matrix.T if isinstance(layer, Conv1D) else matrix).to(device=layer.weight.device, dtype=dtype)
    value = value.contiguous()
    # A new parameter, not an in-place copy: a weight tied to another (the embeddings) is untied.
    layer.weight = nn.Parameter(value, requires_grad=False)


def copy_trained_weights(trained: nn.Module, full: nn.Module) -> int:
    """Make `full` the base exactly as it was trained: de-quantized linears, and the other weights as
    loaded for training (in its compute dtype). Returns the number of de-quantized layers."""
    from qadapt.quant import dequantized_weight, is_quantized_linear

    dequantized = 0
    with torch.no_grad():
        for name, module in full.named_modules():
            source = trained.get_submodule(name)
            source = source.base if isinstance(source, Adapter) else source
            if is_linear(module) and is_quantized_linear(source):
                set_weight_matrix(module, dequantized_weight(source), name)
                dequantized += 1
                continue
            for param_name, param in module.named_parameters(recurse=False):
                param.copy_(getattr(source, param_name))  # in place: tied weights stay tied
    return dequantized


def fold_adapters(model: nn.Module) -> list[str]:
    """Replace every LoRA / DoRA wrapper by its base layer holding the merged weight; return the names."""
    folded = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoRALinear):
            continue
        set_weight_matrix(module.base, module.merged_weight(weight_matrix(module.base)), name)
        replace_module(model, name, module.base)
        folded.append(name)
    output, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if output is not None and output.weight is not embeddings.weight:
        model.config.tie_word_embeddings = False  # a merged head no longer equals the embeddings
    return folded


def probe_texts(template: str, tokenizer, count: int = 6, answered: bool = True) -> list[str]:
    """Templated prompts with their answers (or without: what a reply is asked for): what the merged model
    is compared on."""
    from qadapt.builtin_data import arithmetic
    from qadapt.data import prompt_text

    return [prompt_text(r, template, tokenizer) + (r["output"] if answered else "")
            for r in arithmetic.problems("test", count)]


def check_dtype(dtype: torch.dtype, parameters: int) -> torch.dtype:
    """The dtype the host computes the merge's check in: `dtype` where this CPU runs it fast (fp32, or
    the one `auto` picks here), else fp32 when the host holds an fp32 copy of the base."""
    from qadapt.devices import free_memory
    from qadapt.quant import auto_compute_dtype

    if dtype in (torch.float32, auto_compute_dtype()):
        return dtype
    return torch.float32 if parameters * 4 < free_memory(torch.device("cpu")) else dtype


@contextmanager
def computed_in(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """`model`'s tensors in its own dtype held in `dtype` for the block, then restored bit for bit (a
    16-bit float round-trips through fp32 exactly); tensors in other dtypes (fp32 adapters) are left alone."""
    own = model.dtype
    tensors = [] if dtype == own else [t for t in (*model.parameters(), *model.buffers()) if t.dtype == own]
    for tensor in tensors:
        tensor.data = tensor.data.to(dtype)
    try:
        yield
    finally:
        for tensor in tensors:
            tensor.data = tensor.data.to(own)


@torch.no_grad()
def logits_on(model: nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    """Next-token logits at every position of every text (one at a time: no padding), in fp32."""
    rows = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids.to(model.device)
        rows.append(model(input_ids=ids).logits[0].to(torch.float32).cpu())
    return torch.cat(rows)


def compare_logits(reference: torch.Tensor, other: torch.Tensor) -> dict:
    diff = (reference - other).abs()
    agreement = (reference.argmax(-1) == other.argmax(-1)).to(torch.float32).mean()
    return {
        "max_abs_diff": round(diff.max().item(), 6),
        "mean_abs_diff": round(diff.mean().item(), 6),
        "top1_agreement": round(agreement.item(), 4),
        "positions": reference.shape[0],
    }


def save_hf_folder(model: nn.Module, tokenizer, template: str, folder: Path) -> None:
    """A folder transformers loads: safetensors shards, config, generation config, tokenizer, and the chat
    template the run trained with (generation tags removed: other runtimes do not know them)."""
    from qadapt.conversations import end_of_turn

    tokenizer.chat_template = exported_chat_template(tokenizer, template)
    generation = model.generation_config
    eos_ids = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    # Trained to end a reply with the tokenizer's EOS, or the template's end-of-turn token: stop at either.
    ends = [tokenizer.eos_token_id]
    if tokenizer.chat_template:
        mark = tokenizer(end_of_turn(tokenizer, tokenizer.chat_template), add_special_tokens=False).input_ids
        ends += mark if len(mark) == 1 else []
    if any(end not in eos_ids for end in ends):
        generation.eos_token_id = [i for i in eos_ids if i is not None] + [e for e in ends if e not in eos_ids]
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, max_shard_size="2GB")
    tokenizer.save_pretrained(folder)


def exported_chat_template(tokenizer, template: str) -> str | None:
    """The chat template a merged or exported model carries: the Alpaca one for a run trained on Alpaca
    prompts (prompt it as it was trained), else the run's, without `generation` tags (other runtimes do
    not know them)."""
    from qadapt.chat_templates import alpaca_chat_template
    from qadapt.conversations import without_generation_tags
    from qadapt.text_templates import is_text_template

    if is_text_template(template):
        return alpaca_chat_template()
    return without_generation_tags(tokenizer.chat_template) if tokenizer.chat_template else None


def merge_run(run_dir: str | Path, out: str | Path, dtype: str = "auto", base: str = "dequantized",
              show_written: bool = True, base_out: Path | None = None) -> dict:
    """Merge a run's LoRA / DoRA adapter into its base, verify, write `out`; return the figures.
    `base_out`: also write the base it folds into, before the fold (what a LoRA exported alone is applied to)."""
    from transformers import AutoModelForCausalLM

    from qadapt.models import load_full_precision
    from qadapt.inference.loader import load_trained_model
    from qadapt.run_dir import RunDir

    _check_choice("--base", base, BASES)
    _check_choice("--dtype", dtype, MERGE_DTYPES)
    run, out = RunDir(run_dir), Path(out)
    run_dir, recipe = run.path, run.trained_recipe
    refuse_unmergeable(recipe, "merge", "merge")
    refuse_existing(out)

    trained, tokenizer, _ = load_trained_model(run, compute_dtype="fp32")
    require_host_memory(recipe.model, dtype, trained)
    texts = probe_texts(recipe.data.template, tokenizer)
    trained_logits = logits_on(trained, tokenizer, texts)
    full = load_full_precision(recipe.model, dtype)
    copied = copy_trained_weights(trained, full) if base == "dequantized" else 0
    del trained
    gc.collect()
    if base_out is not None:
        save_hf_folder(full, tokenizer, recipe.data.template, base_out)
    attach_adapters(full, recipe.adapter)
    run.adapter.load_into(full)
    full.eval()
    torch_dtype = full.dtype
    checked_in = check_dtype(torch_dtype, sum(p.numel() for p in full.parameters()))
    with computed_in(full, checked_in):
        adapter_logits = logits_on(full, tokenizer, texts)
    folded = fold_adapters(full)
    with atomic_folder(out) as tmp:
        save_hf_folder(full, tokenizer, recipe.data.template, tmp)
        del full
        gc.collect()
        merged = AutoModelForCausalLM.from_pretrained(tmp, dtype=checked_in)
        merged_logits = logits_on(merged, tokenizer, texts)
        del merged
        info = {
            "run_dir": str(run_dir.resolve()), "base": base, "dtype": str(torch_dtype).removeprefix("torch."),
            "adapter_kind": recipe.adapter.kind, "folded_layers": len(folded), "dequantized_layers": copied,
            "vs_adapter_on_same_base": compare_logits(adapter_logits, merged_logits),
            "vs_trained_model": compare_logits(trained_logits, merged_logits),
        }
        _check_agreement(info, torch_dtype)
        (tmp / MERGE_INFO_FILE).write_text(json.dumps(info, indent=2))
    if show_written:
        print(describe_written(out))
    print(format_checks(info))
    return info


def require_host_memory(cfg, dtype: str, trained: nn.Module) -> float:
    """The host memory the merge needs (the full-precision base in the output dtype, beside the trained
    model when that is on the host too), said before loading the base; refused when not available.
    Returns the bytes needed."""
    from qadapt.devices import free_memory
    from qadapt.models import load_config, meta_model

    checkpoint_dtype = getattr(load_config(cfg), "dtype", None) or torch.float32
    if isinstance(checkpoint_dtype, str):
        checkpoint_dtype = getattr(torch, checkpoint_dtype)
    itemsize = checkpoint_dtype.itemsize if dtype == "auto" else {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]
    base_bytes = sum(p.numel() for p in meta_model(cfg).parameters()) * itemsize
    on_host = [t for t in [*trained.parameters(), *trained.buffers()] if t.device.type == "cpu"]
    trained_bytes = sum(t.numel() * t.element_size() for t in on_host)
    need, free = base_bytes + trained_bytes, free_memory(torch.device("cpu"))
    what = (f"the base in {str(checkpoint_dtype if dtype == 'auto' else dtype).removeprefix('torch.')} "
            f"({base_bytes / 2**30:.1f} GiB)" + (f" beside the trained model ({trained_bytes / 2**30:.1f} GiB)"
                                               if trained_bytes else ""))
    if need > free:
        raise QadaptError(f"merging needs about {need / 2**30:.1f} GiB of host memory for {what}, and "
                          f"{free / 2**30:.1f} GiB is available; nothing was written. Free memory, or merge in "
                          "16 bits (--dtype bf16: half of fp32)")
    print(f"merging in host memory: {what}, {free / 2**30:.1f} GiB available")
    return need


def _check_agreement(info: dict, dtype: torch.dtype) -> None:
    check = info["vs_adapter_on_same_base"]
    if check["top1_agreement"] < MIN_TOP1_AGREEMENT[dtype]:
        raise QadaptError(
            f"the merged model disagrees with the adapter on its base: top-1 agreement "
            f"{check['top1_agreement']:.4f} < {MIN_TOP1_AGREEMENT[dtype]} (max |Δlogit| {check['max_abs_diff']}); "
            "nothing was written. Try --dtype fp32"
        )


def format_checks(info: dict) -> str:
    lines = [f"verified {info['folded_layers']} merged layers ({info['base']} base, {info['dtype']}):"]
    for key, label in [("vs_adapter_on_same_base", "adapter on the same base"),
                       ("vs_trained_model", "trained model (quantized)")]:
        c = info[key]
        lines.append(f"  vs {label:27} max |Δlogit| {c['max_abs_diff']:.4g}  mean {c['mean_abs_diff']:.4g}  "
                     f"top-1 agreement {c['top1_agreement']:.2%} over {c['positions']} positions")
    return "\n".join(lines)


def _check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise QadaptError(f"{option} {value!r} is not one of {', '.join(choices)}")
