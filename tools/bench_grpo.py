"""GRPO's speed and memory: qadapt against TRL's GRPOTrainer with PEFT LoRA, side by side, in one run.

    .venv/bin/python tools/bench_grpo.py [--steps 4] [--json bench.json]

Both sides train LoRA (the same rank, alpha and linear layers, fresh) on the same 4-bit NF4 model (default: the
embedded SmolLM2-135M-Instruct, in the compute dtype qadapt's `auto` picks here), on the same built-in word
problems through the model's chat template, with the same group size, problems per step, micro-batches, answer
length, temperature, loss (Dr. GRPO by default), learning rate and no KL term; the reward is the answer
checked. Each side runs in its own fresh process (qadapt's `train`; TRL's `GRPOTrainer.train`), one after the
other, alternating which goes first when there are several rounds.

Reported per side: the median seconds per optimizer step, the seconds spent generating and the generated tokens
per second of generation (answers differ in length between the sides: they are sampled), the peak resident
memory of the process (CPU: Linux's VmHWM, loading included) or on a GPU the peak torch allocated; and the
ratios qadapt / TRL. The first step of each process is left out of the medians (start-up of the kernels).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peer_bench import TARGETS, add_common_arguments, alternate, peak_memory_mb, resolve_auto_dtype

from qadapt.machine import describe, one_line


def problems(count: int) -> list[dict]:
    """The first `count` built-in word problems of the training split, with their answers."""
    from qadapt.tasks.math_sets import load_eval_set

    problem_set = load_eval_set("builtin:word-problems", limit=count, split="train")
    return [{"question": r["instruction"], "answer": gold} for r, gold in zip(problem_set.records, problem_set.golds)]


def qadapt_worker(args) -> dict:
    """qadapt's side: `train` on a GRPO recipe; its times and lengths from the run's metrics.jsonl."""
    from qadapt.recipe import recipe_from_dict
    from qadapt.training.train import train

    out = Path(tempfile.mkdtemp(prefix="bench-grpo-qadapt-"))
    recipe = recipe_from_dict({
        "task": "grpo",
        "model": {"name": args.model, "quant": "nf4", "compute_dtype": args.compute_dtype},
        "adapter": {"kind": "lora", "rank": args.rank, "alpha": 2 * args.rank, "dropout": 0.0, "targets": TARGETS},
        "data": {"path": "builtin:word-problems", "template": "chat", "max_examples": args.steps * args.problems,
                 "val_size": 0},
        "train": {"max_steps": args.steps, "micro_batch_size": args.problems // args.grad_accum,
                  "grad_accum": args.grad_accum, "lr": args.lr, "lr_schedule": "constant", "warmup_steps": 0,
                  "gradient_checkpointing": args.gradient_checkpointing == "on", "save_every": 0, "eval_every": 0},
        "grpo": {"group_size": args.group_size, "loss": args.loss, "max_new_tokens": args.max_new_tokens,
                 "temperature": args.temperature, "rewards": ["correct"]},
        "output_dir": str(out),
    })
    train(recipe)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ends = [row["elapsed_s"] for row in rows]
    completions = args.problems * args.group_size
    return {"step_s": [b - a for a, b in zip([0.0] + ends, ends)], "generate_s": [row["generate_s"] for row in rows],
            "generated_tokens": [row["completion_tokens"] * completions for row in rows],
            "rewards": [row["reward"] for row in rows]}


def trl_worker(args) -> dict:
    """TRL's side: GRPOTrainer with a PEFT LoRA config on the NF4 model, as TRL's docs show QLoRA GRPO."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from qadapt.models import resolve_compute_dtype, resolve_model_path
    from qadapt.tasks import answers

    path, dtype = resolve_model_path(args.model), resolve_compute_dtype(args.compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype),
        device_map={"": 0} if torch.cuda.is_available() else None)
    rows = problems(args.steps * args.problems)
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": r["question"]}] for r in rows],
                                 "answer": [r["answer"] for r in rows]})

    def correct(completions, answer, **_):
        return [float(answers.is_correct(answers.extract(c[0]["content"], False), gold))
                for c, gold in zip(completions, answer)]

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-grpo-trl-"), per_device_train_batch_size=args.problems
        * args.group_size // args.grad_accum, gradient_accumulation_steps=args.grad_accum,
        num_generations=args.group_size, max_completion_length=args.max_new_tokens, temperature=args.temperature,
        loss_type=args.loss, beta=0.0, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        max_steps=args.steps, logging_steps=1, report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available(),
        bf16=dtype == torch.bfloat16, gradient_checkpointing=args.gradient_checkpointing == "on", seed=42)
    trainer = GRPOTrainer(model=model, reward_funcs=correct, args=config, train_dataset=dataset,
                          processing_class=AutoTokenizer.from_pretrained(path),
                          peft_config=LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                 target_modules=TARGETS, task_type="CAUSAL_LM"))
    generate_s: list[float] = []
    generate = trainer._generate

    def timed_generate(*a, **k):
        started = time.perf_counter()
        result = generate(*a, **k)
        generate_s.append(time.perf_counter() - started)
        return result

    trainer._generate = timed_generate
    step_ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, *_, **__):
            step_ends.append(time.perf_counter())

    trainer.add_callback(StepTimes())
    started = time.perf_counter()
    trainer.train()
    logged = [row for row in trainer.state.log_history if "completions/mean_length" in row]
    completions = args.problems * args.group_size
    return {"step_s": [b - a for a, b in zip([started] + step_ends, step_ends)], "generate_s": generate_s,
            "generated_tokens": [row["completions/mean_length"] * completions for row in logged],
            "rewards": [row["reward"] for row in logged]}


def summarise(results: list[dict]) -> dict:
    """Medians over every process's steps after its first; the peak memory of the largest process."""
    def after_first(key):
        return [value for r in results for value in r[key][1:]]

    generate_s, tokens = sum(after_first("generate_s")), sum(after_first("generated_tokens"))
    return {"step_s": round(statistics.median(after_first("step_s")), 2),
            "generate_s_per_step": round(statistics.median(after_first("generate_s")), 2),
            "generated_tokens_per_s": round(tokens / generate_s, 1),
            "mean_answer_tokens": round(tokens / len(after_first("generated_tokens")) / results[0]["completions"], 1),
            "peak_memory_mb": round(max(r["peak_memory_mb"] for r in results)),
            "rewards": [r["rewards"] for r in results]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, ("qadapt", "trl"))
    parser.add_argument("--problems", type=int, default=4, help="problems per optimizer step")
    parser.add_argument("--grad-accum", type=int, default=2, help="micro-batches per step (both sides)")
    parser.add_argument("--group-size", type=int, default=8, help="answers per problem (G)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--loss", default="dr_grpo", choices=["grpo", "dr_grpo", "dapo"])
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--gradient-checkpointing", default="on", choices=["on", "off"])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per process (the first is not timed)")
    args = parser.parse_args(argv)
    if args.problems % args.grad_accum:
        parser.error(f"--problems {args.problems} must split into --grad-accum {args.grad_accum} micro-batches")
    resolve_auto_dtype(args)
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        torch.manual_seed(0)
        result = (qadapt_worker if args.worker == "qadapt" else trl_worker)(args)
        print(json.dumps({**result, "completions": args.problems * args.group_size, "peak_memory_mb": peak_memory_mb()}))
        return
    runs = alternate(__file__, ("qadapt", "trl"), args)
    sides = {side: summarise(results) for side, results in runs.items()}
    report = {"config": {k: v for k, v in vars(args).items() if k not in ("worker", "json")}, "machine": describe(),
              **sides,
              "step_time_ratio": round(sides["qadapt"]["step_s"] / sides["trl"]["step_s"], 3),
              "generation_throughput_ratio": round(sides["qadapt"]["generated_tokens_per_s"]
                                                   / sides["trl"]["generated_tokens_per_s"], 3),
              "peak_memory_ratio": round(sides["qadapt"]["peak_memory_mb"] / sides["trl"]["peak_memory_mb"], 3)}
    print(f"machine: {one_line(report['machine'])}")
    print(f"{'':7} {'s/step':>7} {'gen s':>6} {'gen tok/s':>9} {'answer':>7} {'peak MB':>8}")
    for side in ("qadapt", "trl"):
        s = sides[side]
        print(f"{side:7} {s['step_s']:7.2f} {s['generate_s_per_step']:6.2f} {s['generated_tokens_per_s']:9.1f} "
              f"{s['mean_answer_tokens']:7.1f} {s['peak_memory_mb']:8.0f}")
    print(f"qadapt / TRL: step time {report['step_time_ratio']:.2f}x, generation throughput "
          f"{report['generation_throughput_ratio']:.2f}x, peak memory {report['peak_memory_ratio']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
