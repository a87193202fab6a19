"""The process's own memory on the host (Linux/glibc): give back what loading freed, bound what is kept.

- A checkpoint stored in the compute dtype loads its unquantized weights (embeddings, norms) as views of
  the memory-mapped file, which keeps every page of the file that quantizing read resident:
  `copy_out_of_file_mappings` copies those weights out, so the mapping goes away.
- glibc serves large allocations from its heap once one of them has been freed (its mmap threshold
  adapts upward, to 32 MB) and keeps freed heap memory for reuse; a training step frees many tensors of
  a few MB, so the resident set grows far beyond the live tensors. A fixed threshold
  (`bound_heap_retention`) returns larger tensors to the system when they are freed; a lower one makes
  every activation fault its pages in afresh.
- What stays in the heap still fragments, and glibc does not return free chunks pinned between live
  ones: `trim_heap` does, before each backward pass and after each optimizer step.

What each saves, measured on the embedded model, is in docs/benchmarks/training.md ("What the CPU measures save").
"""

from __future__ import annotations

import ctypes
import functools
import gc
from pathlib import Path

import torch

_M_MMAP_THRESHOLD = -3  # mallopt parameter, from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 4 * 2**20


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): the system allocator behaves differently; leave it
        return None


def bound_heap_retention() -> None:
    """Serve allocations of 4 MB and more from their own mappings, returned to the system when freed."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def release_freed_memory() -> None:
    """Hand the memory freed while loading (the full-precision checkpoint) back to the system."""
    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """Return the heap's free pages to the system (glibc keeps them otherwise); cheap, twice a step."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def copy_out_of_file_mappings(module: torch.nn.Module) -> int:
    """Copy each parameter and buffer that is a view of a memory-mapped file into the process's own
    memory, so the mapping (and the file pages it keeps resident) goes away; returns the bytes copied."""
    mapped = _file_mappings()
    copied = 0
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            address = tensor.data_ptr()
            if tensor.device.type == "cpu" and tensor.numel() and any(start <= address < end for start, end in mapped):
                tensor.data = tensor.data.clone()
                copied += tensor.numel() * tensor.element_size()
    if copied:
        gc.collect()
    return copied


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's memory-mapped files (none where /proc is missing)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return []
    ranges = []
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            start, end = fields[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges
