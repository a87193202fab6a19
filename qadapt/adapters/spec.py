"""What to attach: one typed spec per adapter topology. A recipe's `adapter` section is one of them.

    LowRankSpec     lora, dora          an update of each target linear's weight: s · B A (DoRA: rescaled)
    BottleneckSpec  series, parallel    up(act(down(h))) after or beside a block or a linear

The two form one union tagged by `kind` (each spec's `kind` lists the kinds it describes); `spec_class`
picks the spec of a kind. The field docs below are the recipe's documentation of its adapter keys. What
each kind allows (its layer, merging, PEFT's format) is qadapt.adapters.kinds'. Plain data, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal, Optional, Union, get_args, get_type_hints

from qadapt.errors import QadaptError


@dataclass(frozen=True)
class _EveryKind:
    """The keys every adapter kind has; each spec below narrows `kind` to its own."""

    kind: str = "lora"
    """Adapter family member: `lora`, `dora` (LoRA + magnitude), `series` or `parallel` bottleneck."""
    dropout: float = 0.05
    """Dropout on the adapter's input (every kind)."""
    targets: Optional[list[str]] = None
    """Module-name suffixes to wrap, e.g. [q_proj, v_proj]; null: the model family's default.
    lora/dora always; series/parallel with placement `linears` (series: `name:input` / `name:output`
    picks the side, else the family's side as in LLM-Adapters)."""
    start_from: Optional[str] = None
    """A finished run (or an adapter folder) whose adapter weights this run starts from instead of `init`:
    the same adapter settings and base; the optimizer, schedule and step count start afresh."""


@dataclass(frozen=True)
class LowRankSpec(_EveryKind):
    """LoRA (Hu et al. 2021) or DoRA (Liu et al. 2024) on every target linear."""

    kind: Literal["lora", "dora"] = "lora"
    rank: int = 16
    """lora/dora: rank r."""
    alpha: float = 32.0
    """lora/dora: scale numerator: the update is (alpha / r) * B A, or (alpha / sqrt(r)) with rslora."""
    rslora: bool = False
    """lora/dora: rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023)."""
    lr_ratio: float = 1.0
    """lora/dora: B's learning rate is lr_ratio × A's (LoRA+, Hayou et al. 2024, arXiv 2402.12354; they
    suggest 16); 1: plain LoRA."""


@dataclass(frozen=True)
class BottleneckSpec(_EveryKind):
    """A series or parallel bottleneck adapter (LLM-Adapters, arXiv 2304.01933) at a placement."""

    kind: Literal["series", "parallel"] = "series"
    placement: Literal["mlp", "attention", "both", "linears"] = "mlp"
    """series/parallel: beside (parallel) or after (series) the MLP block, the attention block, both
    (series: Houlsby), or at the named target linears (the LLM-Adapters code's placement)."""
    bottleneck_size: int = 256
    """series/parallel: width of the bottleneck (down-projection size)."""
    activation: Literal["tanh", "relu", "gelu", "silu"] = "tanh"
    """series/parallel: non-linearity between down- and up-projection."""
    scale: Union[float, Literal["learned"]] = 1.0
    """series/parallel: multiplier of the adapter's output, or `learned` (a trained scalar from 1)."""
    init: Literal["bert", "zero"] = "zero"
    """series/parallel: `zero` (up-projection zero: starts as the base model) or `bert` (both
    projections normal(0, 0.02), as the LLM-Adapters paper)."""

    @property
    def lr_ratio(self) -> float:
        """LoRA+'s ratio (a lora/dora key) does not apply: every weight of a bottleneck learns at the lr."""
        return 1.0


AdapterSpec = Union[LowRankSpec, BottleneckSpec]
SPECS: tuple[type, ...] = get_args(AdapterSpec)


def kinds_of(spec: type) -> tuple[str, ...]:
    """The kinds a spec class describes, read off its `kind` field."""
    return get_args(get_type_hints(spec)["kind"])


ADAPTER_KINDS: tuple[str, ...] = tuple(kind for spec in SPECS for kind in kinds_of(spec))


def spec_class(kind: str) -> type:
    """The spec describing adapters of `kind`; a clear error naming the kinds for any other."""
    for spec in SPECS:
        if kind in kinds_of(spec):
            return spec
    raise QadaptError(f"unknown adapter kind {kind!r}; choose one of {', '.join(ADAPTER_KINDS)}")


def adapter_spec(kind: str = "lora", **options) -> AdapterSpec:
    """The spec of `kind` from keyword options; options of the other topology are refused, named."""
    spec = spec_class(kind)
    names = {f.name for f in fields(spec)}
    foreign = sorted(set(options) - names)
    if foreign:
        raise QadaptError(f"{', '.join(foreign)} do not apply to a {kind} adapter; its options: {', '.join(names)}")
    return spec(kind=kind, **options)
