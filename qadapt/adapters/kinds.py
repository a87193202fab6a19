"""The table of adapter kinds: the one place that says what each kind is made of and allows.

Each kind names its spec (qadapt.adapters.spec), the layer that carries it, and what it allows: folding
into the base (merge, and so GGUF), PEFT's format, llama.cpp's LoRA adapter files, rows of one batch
through different adapters. Code elsewhere asks this table, never compares a kind's name.
"""

from __future__ import annotations

from dataclasses import dataclass

from qadapt.adapters.bottleneck import ParallelAdapter, SeriesAdapter
from qadapt.adapters.dora import DoRALinear
from qadapt.adapters.lora import LoRALinear
from qadapt.adapters.spec import ADAPTER_KINDS, BottleneckSpec, LowRankSpec, spec_class
from qadapt.errors import QadaptError


@dataclass(frozen=True)
class AdapterKind:
    name: str
    spec: type
    layer: type  # the module the adapter lives in
    mergeable: bool  # its update is a weight matrix: it folds into the base (merge, GGUF export)
    peft_options: dict | None  # how PEFT's LoRA config says this kind; None: PEFT has no such adapter
    llamacpp_adapter: bool  # llama.cpp's adapter GGUF holds it (plain LoRA only)
    mixes_in_a_batch: bool  # the adapter bank can run rows of one batch through different adapters of it


KINDS = {kind.name: kind for kind in (
    AdapterKind("lora", LowRankSpec, LoRALinear, mergeable=True, peft_options={"use_dora": False},
                llamacpp_adapter=True, mixes_in_a_batch=True),
    AdapterKind("dora", LowRankSpec, DoRALinear, mergeable=True, peft_options={"use_dora": True},
                llamacpp_adapter=False, mixes_in_a_batch=False),
    AdapterKind("series", BottleneckSpec, SeriesAdapter, mergeable=False, peft_options=None,
                llamacpp_adapter=False, mixes_in_a_batch=False),
    AdapterKind("parallel", BottleneckSpec, ParallelAdapter, mergeable=False, peft_options=None,
                llamacpp_adapter=False, mixes_in_a_batch=False),
)}
assert tuple(KINDS) == ADAPTER_KINDS and all(spec_class(k.name) is k.spec for k in KINDS.values())


def adapter_kind(name: str) -> AdapterKind:
    if name not in KINDS:
        raise QadaptError(f"unknown adapter kind {name!r}; choose one of {', '.join(KINDS)}")
    return KINDS[name]


def kind_of_peft_config(config: dict) -> str:
    """The kind a PEFT LoRA config describes (use_dora: DoRA)."""
    return next(name for name, kind in KINDS.items()
                if kind.peft_options is not None and kind.peft_options["use_dora"] == bool(config.get("use_dora")))
