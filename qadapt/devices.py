"""Where a model runs: the device it is placed on, the memory free there, and the peak it reached.

One GPU is named with its index (`cuda:0`): accelerate calls a lone GPU `cuda`, while loading with a
device map and accelerate's own placement checks compare indices. Without a GPU everything runs on
the CPU, where memory is the host's.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch

GIB = 2**30


def compute_device() -> torch.device:
    """The device a model is loaded onto to answer prompts: the current GPU when there is one, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def with_index(device: torch.device) -> torch.device:
    """`device`, a GPU named with its index (the current one when it has none)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def free_memory(device: torch.device) -> float:
    """Bytes free on `device`: what the GPU has free plus what torch holds cached and unused there, or the
    host's MemAvailable."""
    if device.type == "cuda":
        index = with_index(device).index
        cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
        return float(torch.cuda.mem_get_info(index)[0] + cached)
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    return 8.0 * GIB  # no /proc: assume a modest machine


def start_peak_memory(device: torch.device) -> None:
    """Count a GPU's peak memory from now (after loading, so that it is the peak of training)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(with_index(device).index)


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """The peak memory in MiB: on a GPU what torch allocated and what its caching allocator reserved (what
    nvidia-smi shows, less the CUDA context) since `start_peak_memory`; on a CPU this process's peak
    resident set size."""
    if device.type == "cuda":
        index = with_index(device).index
        return {"allocated": torch.cuda.max_memory_allocated(index) / 2**20,
                "reserved": torch.cuda.max_memory_reserved(index) / 2**20}
    return {"resident": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux reports KiB
