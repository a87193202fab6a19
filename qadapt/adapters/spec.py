"""What to attach: one typed spec per adapter topology, and the table of adapter kinds.

    LowRankSpec     lora, dora          an update of each target linear's weight: s · B A (DoRA: rescaled)
    BottleneckSpec  series, parallel    up(act(down(h))) after or beside a block or a linear

The recipe's flat `adapter` section (and a saved adapter_config.json) becomes one of these in
qadapt.recipe; this package never reads a recipe. KINDS is the one place that says what each kind
allows: merging into the base (and so GGUF), PEFT's format, rows of one batch through different adapters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from qadapt.errors import QadaptError


@dataclass(frozen=True)
class LowRankSpec:
    """LoRA (Hu et al. 2021) or DoRA (Liu et al. 2024) on every target linear."""

    kind: str = "lora"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    rslora: bool = False
    targets: tuple[str, ...] | None = None  # module-name suffixes; None: the model family's linears


@dataclass(frozen=True)
class BottleneckSpec:
    """A series or parallel bottleneck adapter (LLM-Adapters, arXiv 2304.01933) at a placement."""

    kind: str = "series"
    placement: str = "mlp"  # mlp, attention, both (series: Houlsby) or linears (at `targets`)
    targets: tuple[str, ...] | None = None  # placement linears: suffixes, series with an optional ':input'/':output'
    bottleneck_size: int = 256
    activation: str = "tanh"
    scale: float | str = 1.0  # or "learned"
    init: str = "zero"  # zero (starts as the base) or bert (both projections normal(0, 0.02))
    dropout: float = 0.0


AdapterSpec = Union[LowRankSpec, BottleneckSpec]


@dataclass(frozen=True)
class AdapterKind:
    spec: type
    mergeable: bool  # its update is a weight matrix: it folds into the base (merge, GGUF export)
    peft_options: dict | None  # how PEFT's LoRA config says this kind; None: PEFT has no such adapter
    mixes_in_a_batch: bool  # the adapter bank can run rows of one batch through different adapters of it


KINDS = {
    "lora": AdapterKind(LowRankSpec, mergeable=True, peft_options={"use_dora": False}, mixes_in_a_batch=True),
    "dora": AdapterKind(LowRankSpec, mergeable=True, peft_options={"use_dora": True}, mixes_in_a_batch=False),
    "series": AdapterKind(BottleneckSpec, mergeable=False, peft_options=None, mixes_in_a_batch=False),
    "parallel": AdapterKind(BottleneckSpec, mergeable=False, peft_options=None, mixes_in_a_batch=False),
}


def adapter_kind(name: str) -> AdapterKind:
    if name not in KINDS:
        raise QadaptError(f"unknown adapter kind {name!r}; choose one of {', '.join(KINDS)}")
    return KINDS[name]


def kind_of_peft_config(config: dict) -> str:
    """The kind a PEFT LoRA config describes (use_dora: DoRA)."""
    return next(name for name, kind in KINDS.items()
                if kind.peft_options is not None and kind.peft_options["use_dora"] == bool(config.get("use_dora")))
