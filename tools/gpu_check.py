"""Does a 7B model train in 24 GB? Peak CUDA memory and tokens/s, qadapt against PEFT, no weights needed.

    python tools/gpu_check.py [--config llama2-7b] [--batch 2] [--seq 2048] [--steps 5] [--json out.json]

A LLaMA-2-7B-shaped model is built from its config with random weights, one linear layer at a time:
each is drawn in bf16 on the CPU and quantized to NF4 (double quantization) as it moves to the GPU,
so no full-precision 7B copy ever exists, on the GPU or off it. Then LoRA r16 on every linear layer,
gradient checkpointing and paged 8-bit AdamW train `--steps` steps on random tokens, through qadapt's
own step, and the same through PEFT + bitsandbytes (`--sides`). Finally the longest sequence (batch 1)
that trains inside `--gpu-memory` GiB is searched by doubling, then bisecting.

Without a GPU it runs on the CPU (use a small `--config tiny` there): the same code path, no CUDA figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

CONFIGS = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=65536),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_nf4_model(config_name: str, device: torch.device) -> nn.Module:
    """A LLaMA with random weights whose linear layers are NF4 on `device`, built layer by layer."""
    import bitsandbytes as bnb
    from transformers import LlamaConfig, LlamaForCausalLM

    from qadapt.adapters.inject import replace_module

    config = LlamaConfig(**CONFIGS[config_name], tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name == "lm_head":
            continue
        layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False, compute_dtype=torch.bfloat16,
                                  compress_statistics=True, quant_type="nf4", device="meta")
        weight = torch.randn(module.out_features, module.in_features, generator=generator).mul_(0.02)
        layer.weight = bnb.nn.Params4bit(weight.to(torch.bfloat16), requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", module=layer).to(device)  # quantized here
        replace_module(model, name, layer)
    for module in model.modules():  # the rest (embeddings, head, norms): empty on the device, then filled
        if not isinstance(module, bnb.nn.Linear4bit):
            module.to_empty(device=device, recurse=False)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 0.02)
        model.lm_head.weight.normal_(0, 0.02)
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.fill_(1.0)
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)  # its inverse frequencies, computed
    model.requires_grad_(False)
    return model


def qadapt_trainer(model: nn.Module):
    from accelerate import Accelerator

    from qadapt.adapters import attach_adapters
    from qadapt.quant import optimizer_class, prepare_for_kbit_training
    from qadapt.recipe import AdapterConfig
    from qadapt.training.loss import accumulate_gradients

    prepare_for_kbit_training(model, gradient_checkpointing=True)
    attach_adapters(model, AdapterConfig(kind="lora", rank=16, alpha=32, dropout=0.05, targets=TARGETS).spec())
    optimizer = optimizer_class("paged_adamw_8bit")([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model.train()

    def step(tokens: torch.Tensor) -> float:
        batch = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": tokens}
        loss = accumulate_gradients(model, [batch], accelerator)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def peft_trainer(model: nn.Module):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    optimizer = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step(tokens: torch.Tensor) -> float:
        loss = model(input_ids=tokens, attention_mask=torch.ones_like(tokens), labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def run(side: str, args, device: torch.device, batch: int, seq: int, steps: int) -> dict:
    """Build, train `steps` steps (the first is a warm-up), measure; frees everything before returning."""
    model = build_nf4_model(args.config, device)
    step = (qadapt_trainer if side == "qadapt" else peft_trainer)(model)
    vocab = CONFIGS[args.config]["vocab_size"]
    tokens = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    try:
        losses = [step(tokens)]
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        losses += [step(tokens) for _ in range(steps - 1)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        return {"side": side, "batch": batch, "seq": seq, "peak_gib": peak, "losses": losses,
                "tokens_per_s": batch * seq * (steps - 1) / elapsed if steps > 1 else None}
    finally:
        del model, step
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def fits(side: str, args, device: torch.device, seq: int) -> bool:
    try:
        run(side, args, device, 1, seq, steps=1)
        return True
    except torch.cuda.OutOfMemoryError:
        return False


def longest_sequence(side: str, args, device: torch.device) -> int:
    """The longest batch-1 sequence that trains within the memory limit: doubling, then bisecting."""
    good, bad = 0, None
    seq = 4096
    while bad is None and seq <= CONFIGS[args.config]["max_position_embeddings"]:
        good, bad, seq = (seq, None, seq * 2) if fits(side, args, device, seq) else (good, seq, seq)
    while bad is not None and bad - good > 1024:
        middle = (good + bad) // 2 // 256 * 256
        good, bad = (middle, bad) if fits(side, args, device, middle) else (good, middle)
    return good


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="llama2-7b", choices=sorted(CONFIGS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--sides", default="qadapt,peft")
    parser.add_argument("--gpu-memory", type=float, default=24.0, help="GiB allowed for the longest-context search")
    parser.add_argument("--no-context-search", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, args.gpu_memory * 2**30 / torch.cuda.get_device_properties(0).total_memory))
    report = {"config": args.config, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    for side in args.sides.split(","):
        report[side] = run(side, args, device, args.batch, args.seq, args.steps)
        print(json.dumps(report[side]), file=sys.stderr)
        if device.type == "cuda" and not args.no_context_search:
            report[side]["longest_seq_batch1"] = longest_sequence(side, args, device)
    if "qadapt" in report and "peft" in report and device.type == "cuda":
        report["peak_ratio"] = report["qadapt"]["peak_gib"] / report["peft"]["peak_gib"]
        report["speed_ratio"] = report["qadapt"]["tokens_per_s"] / report["peft"]["tokens_per_s"]
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
