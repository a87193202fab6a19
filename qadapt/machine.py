"""What machine a figure was measured on: timings mean little without the CPU (or GPU) that made them.

CPUs differ more than their core counts say: with AVX512-BF16 a bf16 matmul runs ~4.5× faster than
fp32; on AVX2 alone bf16 crawls and `auto` picks fp32.
"""

from __future__ import annotations

from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what the platform module says."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    import platform

    return platform.processor() or platform.machine()


def describe() -> dict:
    """CPU model, its vector capability as torch sees it, threads, torch version, and the GPU if any."""
    return {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def one_line(machine: dict | None = None) -> str:
    m = machine or describe()
    return (f"{m['gpu']}, " if m.get("gpu") else "") + f"{m['cpu']} ({m['cpu_capability']}, {m['threads']} threads)"
