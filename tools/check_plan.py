"""How close is `qadapt plan`? Predict, then train a few steps and measure, for a few settings.

    .venv/bin/python tools/check_plan.py [--model smollm2-135m] [--json plan-check.json]

Each setting trains in a fresh process through qadapt's own loading and step (bench_train's qadapt
side). On a GPU the measurement is torch.cuda.max_memory_allocated, which is what the plan's "peak
allocated" predicts. A CPU has no allocator peak, so torch's profiler records every allocation and
free of one step, and their running sum gives the step's peak of live tensors; to it are added what
lives across steps (adapter weights, optimizer state). The plan's base weights are compared with the
loaded parameters' bytes separately.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import fixed_batches, qadapt_recipe_trainer  # noqa: E402
from peer_bench import TARGETS  # noqa: E402

SETTINGS = [  # micro batch, cut-off length, gradient checkpointing
    (4, 256, True), (8, 256, True), (4, 512, True), (4, 256, False), (1, 1024, True),
]
MIB = 2**20


def recipe_for(model: str, batch: int, length: int, checkpointing: bool):
    from qadapt.recipe import recipe_from_dict

    return recipe_from_dict({
        "model": {"name": model, "quant": "nf4", "compute_dtype": "bf16"},
        "adapter": {"kind": "lora", "rank": 16, "alpha": 32, "dropout": 0.05, "targets": TARGETS},
        "data": {"cutoff_len": length},
        "train": {"micro_batch_size": batch, "gradient_checkpointing": checkpointing},
    })


def measure(model_name: str, batch: int, length: int, checkpointing: bool) -> dict:
    """Train a warm-up step, then one profiled step; return the weights' bytes and the training memory:
    what lives across steps (adapter weights, optimizer state) plus the step's peak of live tensors."""
    from torch.profiler import ProfilerActivity, profile

    from qadapt.adapters import adapter_params

    recipe = recipe_for(model_name, batch, length, checkpointing)
    tokenizer, model, optimizer, step = qadapt_recipe_trainer(recipe)
    batches = fixed_batches(tokenizer, 2, batch, length)
    # The base's weights: everything but the adapters (4-bit weights counted as stored).
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)

    step(batches[0])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        step(batches[1])
        return {"weights_mb": weights / MIB, "training_mb": torch.cuda.max_memory_allocated() / MIB - weights / MIB}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step(batches[1])
    # Each op's own net allocation and each free ([memory], negative), in time order: their running
    # sum is the memory of live tensors; its maximum is the step's peak.
    events = sorted((e for e in profiler.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live, peak = 0, 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    lasting = sum(p.numel() * p.element_size() for p in adapter_params(model).values())
    lasting += sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
                   if torch.is_tensor(t))
    return {"weights_mb": weights / MIB, "training_mb": (lasting + peak) / MIB}


def main() -> None:
    from qadapt.training.plan import plan_memory

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        batch, length, checkpointing = int(args.measure[0]), int(args.measure[1]), args.measure[2] == "True"
        print(json.dumps(measure(args.model, batch, length, checkpointing)))
        return
    rows = []
    print(f"{'batch x length':>15} {'ckpt':>5} {'weights MB plan/real':>21} {'training MB plan/real':>22} {'error':>6}")
    for batch, length, checkpointing in SETTINGS:
        parts = plan_memory(recipe_for(args.model, batch, length, checkpointing)).parts
        planned_training = (sum(parts.values()) - parts["base weights"]) / MIB
        result = subprocess.run([sys.executable, __file__, "--model", args.model, "--measure", str(batch),
                                 str(length), str(checkpointing)], capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(result.stderr[-3000:])
        real = json.loads(result.stdout.strip().splitlines()[-1])
        error = planned_training / real["training_mb"] - 1
        rows.append({"batch": batch, "length": length, "checkpointing": checkpointing,
                     "planned_weights_mb": parts["base weights"] / MIB, "real_weights_mb": real["weights_mb"],
                     "planned_training_mb": planned_training, "real_training_mb": real["training_mb"],
                     "training_error": error})
        print(f"{batch:>6} x {length:<6} {str(checkpointing):>5} {parts['base weights'] / MIB:10.0f} / "
              f"{real['weights_mb']:<8.0f} {planned_training:11.0f} / {real['training_mb']:<8.0f} {error:+6.0%}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
