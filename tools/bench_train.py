"""Training speed and memory: qadapt against PEFT + bitsandbytes, side by side, in one run.

    .venv/bin/python tools/bench_train.py [--compute-dtype bf16] [--json bench.json]

Both sides train the same model (default: the embedded SmolLM2-135M) in the same quantization, with
LoRA of the same rank on the same linear layers, gradient checkpointing, AdamW, on the same fixed
batches of real text (GSM8K when ../shared/data has it, else built-in arithmetic). Each side runs in
its own fresh process, alternating qadapt, PEFT, qadapt, PEFT, ... so that drifts of the machine hit
both alike. A process warms up, then times each optimizer step; its memory is the peak resident set
size during the timed steps (CPU; Linux's VmHWM, reset before them) or, on a GPU, the peak torch
allocated and the peak its caching allocator reserved (what nvidia-smi shows, less the CUDA context).
With --gradient-checkpointing on, each side is checked to have it on.

Reported per side: median step time, tokens/s, peak memory, model-FLOPs utilisation (against the
matmul peak measured here for the compute dtype), and the ratios qadapt / PEFT.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from peer_bench import TARGETS, add_common_arguments, alternate, peak_rss_mb, reset_peak_rss, resolve_auto_dtype

from qadapt.machine import describe, one_line

REPO = Path(__file__).resolve().parents[1]
GSM8K_TRAIN = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def fixed_batches(tokenizer, count: int, batch: int, seq: int) -> list[torch.Tensor]:
    """`count` batches of `batch` × `seq` tokens cut from a stream of templated examples."""
    from qadapt import data as data_lib

    source = str(GSM8K_TRAIN) if GSM8K_TRAIN.is_file() else data_lib.BUILTIN_ARITHMETIC
    stream: list[int] = []
    for record in data_lib.load_examples(source):
        text = data_lib.prompt_text(record, "alpaca", tokenizer) + record["output"]
        stream += tokenizer(text).input_ids + [tokenizer.eos_token_id]
        if len(stream) >= count * batch * seq:
            break
    tokens = torch.tensor(stream[: count * batch * seq])
    return list(tokens.view(count, batch, seq))


def qadapt_trainer(args):
    """qadapt's side of the benchmark, from the command's arguments."""
    from qadapt.recipe import recipe_from_dict

    return qadapt_recipe_trainer(recipe_from_dict({
        "model": {"name": args.model, "quant": args.quant, "compute_dtype": args.compute_dtype},
        "adapter": {"kind": "lora", "rank": args.rank, "alpha": 2 * args.rank, "dropout": 0.05, "targets": TARGETS},
        "train": {"gradient_checkpointing": args.gradient_checkpointing == "on", "optimizer": args.optimizer},
    }), lean_on_cpu=args.lean_cpu == "on")


def qadapt_recipe_trainer(recipe, lean_on_cpu: bool = True):
    """qadapt's own path for a recipe: the model as `qadapt train` prepares it, and the loop's step;
    without `lean_on_cpu`, without the CPU's own measures (qadapt.lean_cpu), as on a GPU.

    Returns (tokenizer, model, optimizer, step), step(tokens) training one batch of token ids.
    """
    from accelerate import Accelerator

    from qadapt import lean_cpu
    from qadapt.models import load_tokenizer
    from qadapt.quant import optimizer_class
    from qadapt.training.loss import accumulate_gradients
    from qadapt.training.prepare import prepare_model

    tokenizer = load_tokenizer(recipe.model)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if not lean_on_cpu:  # the model a GPU would train, here: the loop and the adapters as their equations
        lean_cpu.applies = lambda device: False
    model, _, _ = prepare_model(recipe, accelerator.device)
    assert model.is_gradient_checkpointing == recipe.train.gradient_checkpointing, "qadapt: checkpointing not as asked"
    optimizer = optimizer_class(recipe.train.optimizer)([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step(tokens: torch.Tensor) -> float:
        batch = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": tokens}
        batch = {key: value.to(accelerator.device) for key, value in batch.items()}
        loss = accumulate_gradients(model, [batch], accelerator)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return tokenizer, model, optimizer, step


def peft_trainer(args):
    """What a user would write with PEFT: QLoRA as its docs show it."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from qadapt.models import resolve_compute_dtype, resolve_model_path
    from qadapt.quant import optimizer_class

    path, dtype = resolve_model_path(args.model), resolve_compute_dtype(args.compute_dtype)
    quantization = (BitsAndBytesConfig(load_in_8bit=True) if args.quant == "int8" else
                    BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=args.quant,
                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
    device_map = {"": 0} if torch.cuda.is_available() else None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=quantization,
                                                 device_map=device_map)
    checkpointing = args.gradient_checkpointing == "on"
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05,
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    assert model.get_base_model().is_gradient_checkpointing == checkpointing, "PEFT: checkpointing not as asked"
    optimizer = optimizer_class(args.optimizer)([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step(tokens: torch.Tensor) -> float:
        tokens = tokens.to(model.device)
        loss = model(input_ids=tokens, attention_mask=torch.ones_like(tokens), labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return AutoTokenizer.from_pretrained(path), model, optimizer, step


def worker(args) -> dict:
    """One side in this process: warm up, then time each step and sample memory."""
    torch.manual_seed(0)
    if args.gpu_memory and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_memory * 2**30 / total))
    tokenizer, model, _, step = (qadapt_trainer if args.worker == "qadapt" else peft_trainer)(args)
    batches = fixed_batches(tokenizer, args.warmup + args.steps, args.batch, args.seq)
    losses = [step(tokens) for tokens in batches[: args.warmup]]
    before_mb = peak_rss_mb()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    resident_mb = peak_rss_mb()  # the process before its timed steps: interpreter, libraries, model
    times = []
    for tokens in batches[args.warmup:]:
        start = time.perf_counter()
        losses.append(step(tokens))
        times.append(time.perf_counter() - start)
    peak, reserved = peak_memory()
    result = {"side": args.worker, "step_times_s": times, "peak_memory_mb": peak, "peak_reserved_mb": reserved,
              "losses": losses, "resident_before_mb": resident_mb, "peak_while_loading_mb": before_mb}
    result["ops_per_step"] = count_ops(step, batches[-1])
    if args.probe_seq:
        result["probe"] = probe(step, model, args.probe_seq)
    return result


def count_ops(step, tokens: torch.Tensor) -> dict:
    """The operators one more step dispatches (torch's and bitsandbytes', forward, recomputed forward, backward
    and optimizer), by name. On a GPU each launches one kernel or more, and each costs the host time to
    dispatch it: at short micro-batches that time, not the GPU's, bounds the step. It is the same on every
    machine, so a CPU measures it too."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Counting(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.counts[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    with Counting() as counting:
        step(tokens)
    return {"total": sum(counting.counts.values()), "by_op": dict(counting.counts.most_common())}


def peak_memory() -> tuple[float, float | None]:
    """(peak MiB: allocated on a GPU, else resident; peak MiB reserved by torch on a GPU, else None)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, torch.cuda.max_memory_reserved() / 2**20
    return peak_rss_mb(), None


def probe(step, model, seq: int) -> dict:
    """One more step at batch 1 × `seq` random tokens: its time and peak memory, or that it ran out of memory."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    tokens = torch.randint(0, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    try:
        step(tokens)
    except torch.OutOfMemoryError:
        return {"seq": seq, "fits": False}
    peak, reserved = peak_memory()
    return {"seq": seq, "fits": True, "step_s": round(time.perf_counter() - start, 2), "peak_memory_mb": round(peak),
            "peak_reserved_mb": round(reserved) if reserved is not None else None}


def matmul_peak_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """The matmul rate reached here in `dtype`: on the GPU when there is one, else on the CPU."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = 8192 if device.type == "cuda" else size
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def model_flops_per_token(model_name: str) -> float:
    """Forward + backward to the inputs of a frozen model: 4 × (matmul weights), + attention scores."""
    from transformers import AutoConfig

    from qadapt.models import resolve_model_path

    c = AutoConfig.from_pretrained(resolve_model_path(model_name))
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads * head_dim
    per_layer = c.hidden_size * (2 * c.hidden_size + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
    weights = c.num_hidden_layers * per_layer + c.hidden_size * c.vocab_size  # + the output head
    return 4 * weights


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, ("qadapt", "peft"), rounds=2)
    parser.add_argument("--quant", default="nf4", choices=["nf4", "fp4", "int8"])
    parser.add_argument("--gradient-checkpointing", default="on", choices=["on", "off"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw_8bit", "paged_adamw_8bit",
                                                                 "paged_adamw_32bit"], help="both sides")
    parser.add_argument("--gpu-memory", type=float, default=None,
                        help="GiB a side may use on the GPU (e.g. 24: a consumer card's; out of memory beyond it)")
    parser.add_argument("--lean-cpu", default="on", choices=["on", "off"],
                        help="qadapt's side on a CPU: off trains without qadapt.lean_cpu's measures, as on a GPU")
    parser.add_argument("--probe-seq", type=int, default=0,
                        help="qadapt's side: after the timed steps, one step at batch 1 × this many tokens")
    args = parser.parse_args(argv)
    resolve_auto_dtype(args)
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    report = compare(args)
    print(f"machine: {one_line(report['machine'])}")
    print(f"{'':8} {'s/step':>8} {'tokens/s':>9} {'peak MB':>8} {'MFU':>6} {'ops/step':>9}")
    for side in ("qadapt", "peft"):
        s = report[side]
        print(f"{side:8} {s['step_time_s']:8.2f} {s['tokens_per_s']:9.0f} {s['peak_memory_mb']:8.0f} {s['mfu']:6.1%} "
              f"{s['ops_per_step']:9,}")
    print(f"qadapt / PEFT: step time {report['step_time_ratio']:.2f}x, peak memory {report['peak_memory_ratio']:.2f}x "
          f"(matmul peak {report['matmul_peak_gflops']:.0f} GFLOP/s in {args.compute_dtype})")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def compare(args) -> dict:
    """Both sides, alternated for `args.rounds` rounds; their figures and the ratios qadapt / PEFT."""
    runs = alternate(__file__, ("qadapt", "peft"), args, skip=lambda side: ("probe_seq",) if side == "peft" else (),
                     progress=lambda side, result: f"{statistics.median(result['step_times_s']):.2f} s/step")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[args.compute_dtype]
    peak_gflops = matmul_peak_gflops(dtype)
    tokens_per_step = args.batch * args.seq
    flops_per_step = model_flops_per_token(args.model) * tokens_per_step
    sides = {}
    for side, results in runs.items():
        step_s = statistics.median(t for r in results for t in r["step_times_s"])
        sides[side] = {
            "step_time_s": round(step_s, 3),
            "tokens_per_s": round(tokens_per_step / step_s, 1),
            "peak_memory_mb": round(max(r["peak_memory_mb"] for r in results)),
            **({"peak_reserved_mb": round(max(r["peak_reserved_mb"] for r in results))}
               if results[0].get("peak_reserved_mb") is not None else {}),
            "resident_before_steps_mb": round(max(r["resident_before_mb"] for r in results)),
            "mfu": round(flops_per_step / step_s / 1e9 / peak_gflops, 3),
            "first_losses": [round(x, 4) for x in results[0]["losses"][:3]],
            "ops_per_step": results[0]["ops_per_step"]["total"],
            "most_dispatched": dict(list(results[0]["ops_per_step"]["by_op"].items())[:20]),
            **({"probe": results[-1]["probe"]} if "probe" in results[-1] else {}),
        }
    report = {
        "config": {k: v for k, v in vars(args).items() if k not in ("worker", "json")},
        "machine": describe(),
        "matmul_peak_gflops": round(peak_gflops, 1),
        **sides,
        "step_time_ratio": round(sides["qadapt"]["step_time_s"] / sides["peft"]["step_time_s"], 3),
        "peak_memory_ratio": round(sides["qadapt"]["peak_memory_mb"] / sides["peft"]["peak_memory_mb"], 3),
    }
    return report


if __name__ == "__main__":
    main()
