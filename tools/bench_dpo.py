"""DPO's speed and memory: qadapt against TRL's DPOTrainer with PEFT LoRA, side by side, in one run.

    .venv/bin/python tools/bench_dpo.py [--steps 6] [--pairs runs/pairs.jsonl] [--json bench.json]

Both sides train LoRA (the same rank, alpha and linear layers, started from the very adapter weights qadapt
starts from) on the same 4-bit NF4 model (default: the embedded SmolLM2-135M-Instruct, in the compute dtype
qadapt's `auto` picks here) with the sigmoid DPO loss (with --sft-weight, plus the chosen answers' NLL: RPO),
the same beta, learning rate (constant, no warm-up), AdamW, gradient clipping, micro-batches and gradient
checkpointing, on the same pairs through the model's chat template. Each step trains on every pair of the data
(the data is one step's pairs), so the two sides see the same pairs at every step whatever order they draw
them in, and their losses can be compared step by step.
The reference is the model as it starts on both sides: TRL's PEFT model with its adapter off (its LoRA B is
zero, as qadapt's), qadapt's scored once before step 1.

The pairs: `--pairs FILE` ({prompt, chosen, rejected} rows, as `qadapt rationales --pairs` writes), or the
built-in word problems' worked solutions against the same solutions with a wrong final number. Each side runs
in its own fresh process (qadapt's `train`; TRL's `DPOTrainer.train`), one after the other, alternating which
goes first when there are several rounds.

Reported per side: every step's loss, the median seconds per optimizer step (the first step of each process
left out: start-up), the peak resident memory of the process (CPU: Linux's VmHWM, loading included) or on a
GPU the peak torch allocated; the ratios qadapt / TRL, and the largest difference between the sides' losses.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peer_bench import TARGETS, add_common_arguments, alternate, peak_memory_mb, resolve_auto_dtype

from qadapt.machine import describe, one_line


def builtin_pairs(count: int) -> list[dict]:
    """The first `count` built-in word problems of the training split: the worked solution against the same
    solution with a wrong final number."""
    from qadapt.tasks.math_sets import load_eval_set

    problem_set = load_eval_set("builtin:word-problems", limit=count, split="train")
    pairs = []
    for record, gold in zip(problem_set.records, problem_set.golds):
        wrong = re.sub(r"The answer is [^.]*\.$", f"The answer is {gold + 10:g}.", record["output"])
        pairs.append({"prompt": record["instruction"], "chosen": record["output"], "rejected": wrong})
    return pairs


def file_pairs(path: Path, count: int) -> list[dict]:
    """The first `count` rows of a {prompt, chosen, rejected} JSONL file."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if len(rows) < count:
        raise SystemExit(f"{path} holds {len(rows)} pairs; --pairs-per-step {count} needs as many")
    return [{key: row[key] for key in ("prompt", "chosen", "rejected")} for row in rows[:count]]


def conversational(pair: dict) -> dict:
    """TRL's conversational preference format: both sides answer one user turn (the chat template on both sides)."""
    return {"prompt": [{"role": "user", "content": pair["prompt"]}],
            "chosen": [{"role": "assistant", "content": pair["chosen"]}],
            "rejected": [{"role": "assistant", "content": pair["rejected"]}]}


def qadapt_recipe(args, pairs_file: Path, output_dir: Path):
    from qadapt.recipe import recipe_from_dict

    return recipe_from_dict({
        "task": "preference",
        "model": {"name": args.model, "quant": "nf4", "compute_dtype": args.compute_dtype},
        "adapter": {"kind": "lora", "rank": args.rank, "alpha": 2 * args.rank, "dropout": 0.0, "targets": TARGETS},
        "data": {"path": str(pairs_file), "template": "chat", "max_examples": None, "val_size": 0,
                 "cutoff_len": args.max_length},
        "train": {"max_steps": args.steps, "micro_batch_size": args.pairs_per_step // args.grad_accum,
                  "grad_accum": args.grad_accum, "lr": args.lr, "lr_schedule": "constant", "warmup_steps": 0,
                  "optimizer": "adamw", "weight_decay": 0.0, "max_grad_norm": 1.0,
                  "gradient_checkpointing": args.gradient_checkpointing == "on", "save_every": 0, "eval_every": 0},
        "preference": {"loss": "dpo", "beta": args.beta, "sft_weight": args.sft_weight},
        "output_dir": str(output_dir),
    })


def qadapt_worker(args) -> dict:
    """qadapt's side: `train` on a preference recipe; its step times and losses from the run's metrics.jsonl."""
    from qadapt.training.train import train

    out = Path(tempfile.mkdtemp(prefix="bench-dpo-qadapt-"))
    train(qadapt_recipe(args, args.work / "pairs.jsonl", out))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if "loss" in row]
    ends = [row["elapsed_s"] for row in rows]
    return {"step_s": [b - a for a, b in zip([0.0] + ends, ends)], "losses": [row["loss"] for row in rows],
            "margins": [row["margin"] for row in rows]}


def trl_worker(args) -> dict:
    """TRL's side: DPOTrainer given a PEFT LoRA model on the NF4 base (prepared as PEFT's QLoRA docs show), its
    adapter set to qadapt's initial weights."""
    from datasets import Dataset
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from qadapt.models import resolve_compute_dtype, resolve_model_path
    from peer_fidelity import load_peft_state, peft_model

    recipe = qadapt_recipe(args, args.work / "pairs.jsonl", args.work / "unused")
    model = peft_model(recipe, TARGETS)
    load_peft_state(model, load_file(args.work / "initial_adapter.safetensors"))
    rows = [json.loads(line) for line in (args.work / "pairs.jsonl").read_text().splitlines()]
    dtype = resolve_compute_dtype(args.compute_dtype)
    config = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-dpo-trl-"), per_device_train_batch_size=args.pairs_per_step
        // args.grad_accum, gradient_accumulation_steps=args.grad_accum, beta=args.beta,
        # RPO: TRL adds the chosen answers' NLL as a second loss type; its NLL is a mean over the micro-batch's
        # tokens, qadapt's over each pair's, so the two agree with one pair per micro-batch.
        loss_type=["sigmoid", "sft"] if args.sft_weight else ["sigmoid"],
        loss_weights=[1.0, args.sft_weight] if args.sft_weight else None,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch", weight_decay=0.0,
        max_grad_norm=1.0, max_steps=args.steps, max_length=args.max_length, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=not torch.cuda.is_available(), bf16=dtype == torch.bfloat16,
        gradient_checkpointing=args.gradient_checkpointing == "on", seed=42)
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(resolve_model_path(args.model)))
    step_ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, *_, **__):
            step_ends.append(time.perf_counter())

    trainer.add_callback(StepTimes())
    started = time.perf_counter()
    trainer.train()
    logged = [row for row in trainer.state.log_history if "loss" in row]
    return {"step_s": [b - a for a, b in zip([started] + step_ends, step_ends)],
            "losses": [row["loss"] for row in logged],
            "margins": [row.get("rewards/margins") for row in logged]}


def prepare(args) -> None:
    """The pairs (as one JSONL file both sides read) and qadapt's initial adapter under PEFT's names, in --work."""
    from accelerate.utils import set_seed
    from safetensors.torch import save_file

    from qadapt.adapters import adapter_state_dict
    from qadapt.devices import compute_device
    from qadapt.export.peft_format import peft_state
    from qadapt.training.prepare import prepare_model

    pairs = file_pairs(args.pairs, args.pairs_per_step) if args.pairs else builtin_pairs(args.pairs_per_step)
    (args.work / "pairs.jsonl").write_text("".join(json.dumps(conversational(p)) + "\n" for p in pairs))
    recipe = qadapt_recipe(args, args.work / "pairs.jsonl", args.work / "unused")
    set_seed(recipe.train.seed)  # as `qadapt train` seeds before attaching the adapter
    model, _, _ = prepare_model(recipe, compute_device())
    save_file(peft_state(adapter_state_dict(model)), args.work / "initial_adapter.safetensors")


def summarise(results: list[dict]) -> dict:
    """The median over every process's steps after its first; the peak memory of the largest process; the first
    process's losses."""
    return {"step_s": round(statistics.median(s for r in results for s in r["step_s"][1:]), 2),
            "peak_memory_mb": round(max(r["peak_memory_mb"] for r in results)),
            "losses": results[0]["losses"], "margins": results[0]["margins"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, ("qadapt", "trl"))
    parser.add_argument("--pairs", type=Path, help="a {prompt, chosen, rejected} JSONL file (default: built-in pairs)")
    parser.add_argument("--pairs-per-step", type=int, default=8, help="pairs per optimizer step: all of the data")
    parser.add_argument("--grad-accum", type=int, default=2, help="micro-batches per step (both sides)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per side at most")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--sft-weight", type=float, default=0.0, help="RPO: the chosen answers' NLL, this much")
    parser.add_argument("--gradient-checkpointing", default="on", choices=["on", "off"])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per process (the first is not timed)")
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.pairs_per_step % args.grad_accum:
        parser.error(f"--pairs-per-step {args.pairs_per_step} must split into --grad-accum {args.grad_accum} "
                     "micro-batches")
    if args.pairs and not args.pairs.is_file():
        parser.error(f"--pairs {args.pairs}: no such file")
    resolve_auto_dtype(args)
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        torch.manual_seed(0)
        result = (qadapt_worker if args.worker == "qadapt" else trl_worker)(args)
        print(json.dumps({**result, "peak_memory_mb": peak_memory_mb()}))
        return
    args.work = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    prepare(args)
    runs = alternate(__file__, ("qadapt", "trl"), args, skip=lambda side: ("pairs",))  # the sides read --work
    sides = {side: summarise(results) for side, results in runs.items()}
    loss_gap = max(abs(a - b) for a, b in zip(sides["qadapt"]["losses"], sides["trl"]["losses"]))
    report = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                         if k not in ("worker", "json", "work")},
              "machine": describe(), **sides, "largest_loss_difference": loss_gap,
              "step_time_ratio": round(sides["qadapt"]["step_s"] / sides["trl"]["step_s"], 3),
              "peak_memory_ratio": round(sides["qadapt"]["peak_memory_mb"] / sides["trl"]["peak_memory_mb"], 3)}
    print(f"machine: {one_line(report['machine'])}")
    print(f"{'':7} {'s/step':>7} {'peak MB':>8}  losses")
    for side in ("qadapt", "trl"):
        s = sides[side]
        print(f"{side:7} {s['step_s']:7.2f} {s['peak_memory_mb']:8.0f}  " + " ".join(f"{x:.4f}" for x in s["losses"]))
    print(f"qadapt / TRL: step time {report['step_time_ratio']:.2f}x, peak memory {report['peak_memory_ratio']:.2f}x; "
          f"losses differ by {loss_gap:.2e} at most")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
