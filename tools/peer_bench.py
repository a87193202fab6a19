"""What the side-by-side benchmarks share (bench_train against PEFT, bench_grpo and bench_dpo against TRL): each
side runs in a fresh process of the benchmark's own script, the sides take turns going first over the rounds,
a side reports its peak memory, and the flags every benchmark takes mean the same everywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch

# The linear layers both sides adapt: every projection of a Llama-style block.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Flags that steer the parent, not a side's process.
PARENT_ONLY = ("worker", "json", "rounds")


class SideFailed(RuntimeError):
    """A side's process failed; the message is the end of what it wrote to stderr."""


def add_common_arguments(parser: argparse.ArgumentParser, sides: tuple[str, str], rounds: int = 1) -> None:
    """--model, --compute-dtype, --rank, --rounds, --json, and the hidden --worker a side's process gets."""
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--compute-dtype", default="auto", choices=["auto", "bf16", "fp32", "fp16"],
                        help="auto: what qadapt's `auto` picks here (fp32 on a CPU without fast bf16)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=rounds, help="processes per side, alternated")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--worker", choices=list(sides), help=argparse.SUPPRESS)


def resolve_auto_dtype(args: argparse.Namespace) -> None:
    """--compute-dtype auto becomes the dtype qadapt's `auto` picks on this machine, so both sides get its name."""
    if args.compute_dtype == "auto":
        from qadapt.models import resolve_compute_dtype

        args.compute_dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(resolve_compute_dtype("auto"), "fp32")


def reset_peak_rss() -> None:
    """Linux: restart this process's peak resident set size (VmHWM) from its current size."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_rss_mb() -> float:
    """Linux: the peak resident set size since the last reset, in MiB (the CPU has no allocator peak)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def peak_memory_mb() -> float:
    """The process's peak: what torch allocated on a GPU, else the peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def run_side(script: str, side: str, args: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict:
    """`script --worker side` with the parent's flags (less those in PARENT_ONLY and `skip`), in a fresh process;
    the JSON object its last line of output holds."""
    command = [sys.executable, script, "--worker", side] + [
        f"--{key.replace('_', '-')}={value}" for key, value in vars(args).items()
        if key not in PARENT_ONLY + skip and value is not None]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if result.returncode != 0:
        raise SideFailed(f"{side} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def alternate(script: str, sides: tuple[str, str], args: argparse.Namespace,
              skip: Callable[[str], tuple[str, ...]] = lambda side: (),
              progress: Callable[[str, dict], str] = lambda side, result: "done") -> dict[str, list[dict]]:
    """Each side's results over args.rounds rounds, the sides taking turns going first, so that drifts of the
    machine hit both alike. `skip(side)`: flags that side's process does not take; `progress`: what to print to
    stderr after each process."""
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for round_index in range(args.rounds):
        for side in (sides if round_index % 2 == 0 else sides[::-1]):
            runs[side].append(run_side(script, side, args, skip(side)))
            print(f"round {round_index + 1}: {side} {progress(side, runs[side][-1])}", file=sys.stderr)
    return runs
