"""Which modules of a model get which adapter: an adapter spec (qadapt.adapters.spec) turned into a plan.

    lora / dora                 every target linear (default: the family's linears)
    series   mlp | attention    after the MLP's / attention's output projection; `both` is Houlsby
    series   linears            on each target linear's input or output (the LLM-Adapters code)
    parallel mlp | attention    beside the whole MLP / attention block, fed the block's input
    parallel linears            beside each target linear
"""

from __future__ import annotations

from functools import partial

from torch import nn

from qadapt.adapters.base import layer_dims
from qadapt.adapters.bottleneck import Bottleneck, ParallelAdapter, SeriesAdapter
from qadapt.adapters.families import family_of
from qadapt.adapters.inject import Wrap, ends_with, match_blocks, match_linears
from qadapt.adapters.kinds import adapter_kind
from qadapt.adapters.spec import AdapterSpec, BottleneckSpec, LowRankSpec
from qadapt.errors import QadaptError

SIDES = ("input", "output")


def plan_adapters(model: nn.Module, cfg: AdapterSpec) -> dict[str, Wrap]:
    """{module name: function wrapping that module in its adapter}, in model order."""
    layer = adapter_kind(cfg.kind).layer
    if isinstance(cfg, LowRankSpec):
        targets = list(cfg.targets or family_of(model, "adapter targets").linears)
        wrap = partial(layer, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, rslora=cfg.rslora)
        return {name: wrap for name in match_linears(model, targets)}
    if cfg.placement == "linears":
        return _plan_on_linears(model, cfg, layer)
    family = family_of(model, f"{cfg.placement} placement")
    placements = ["attention", "mlp"] if cfg.placement == "both" else [cfg.placement]
    if layer is SeriesAdapter:
        outputs = [family.attention_output if p == "attention" else _mlp_output(model, family) for p in placements]
        return {name: partial(_series, cfg=cfg, on_input=False) for name in match_linears(model, outputs)}
    if "mlp" in placements and family.mlp is None:
        raise QadaptError(
            f"{model.config.model_type} has no MLP block to put a parallel adapter beside; use placement: "
            f"linears with targets such as [{', '.join(family.mlp_inputs)}, {family.mlp_output}]"
        )
    blocks = [family.attention if p == "attention" else family.mlp for p in placements]
    hidden_size = model.config.hidden_size
    wrap = partial(_parallel_block, cfg=cfg, hidden_size=hidden_size)
    plan = {name: wrap for block in blocks for name in match_blocks(model, block)}
    return {name: plan[name] for name, _ in model.named_modules() if name in plan}


def _plan_on_linears(model: nn.Module, cfg: BottleneckSpec, layer: type) -> dict[str, Wrap]:
    if layer is ParallelAdapter:
        if cfg.targets and any(":" in t for t in cfg.targets):
            raise QadaptError("adapter.targets: a parallel adapter has no side; drop the ':input' / ':output'")
        if cfg.targets:
            targets = list(cfg.targets)
        else:
            family = family_of(model, "linear targets")
            targets = [*family.mlp_inputs, _mlp_output(model, family)]
        return {name: partial(_parallel_linear, cfg=cfg) for name in match_linears(model, targets)}
    sides = _series_sides(model, cfg)
    names = match_linears(model, list(sides))
    return {
        name: partial(_series, cfg=cfg, on_input=sides[next(t for t in sides if ends_with(name, t))] == "input")
        for name in names
    }


def _series_sides(model: nn.Module, cfg: BottleneckSpec) -> dict[str, str]:
    """{target: input | output}. A bare target takes the family's side: MLP inputs on the input,
    the MLP output on the output, as LLM-Adapters' `mh_adapter` / `output_adapter` table does."""
    if not cfg.targets:
        family = family_of(model, "linear targets")
        return {**{t: "input" for t in family.mlp_inputs}, _mlp_output(model, family): "output"}
    sides = {}
    for target in cfg.targets:
        name, _, side = target.partition(":")
        if not side:
            family = family_of(model, f"side for series target '{name}'")
            if name in family.mlp_inputs or name == family.mlp_output:
                side = "input" if name in family.mlp_inputs else "output"
            else:
                raise QadaptError(f"adapter.targets: say which side of '{name}' the series adapter goes on: "
                                  f"'{name}:input' or '{name}:output'")
        if side not in SIDES:
            raise QadaptError(f"adapter.targets: '{target}' has side '{side}'; choose input or output")
        sides[name] = side
    return sides


def _bottleneck(cfg: BottleneckSpec, in_features: int, out_features: int, like: nn.Module) -> Bottleneck:
    device = next(like.parameters()).device
    return Bottleneck(in_features, out_features, cfg.bottleneck_size, cfg.activation, cfg.scale, cfg.dropout,
                      cfg.init, device)


def _mlp_output(model: nn.Module, family) -> str:
    if family.mlp_output is None:
        raise QadaptError(
            f"{model.config.model_type}'s MLP is a mixture of experts, with no linear layer to put an adapter "
            "after or beside: put series adapters after the attention (placement: attention), or a parallel "
            "adapter beside the whole MoE block (placement: mlp)")
    return family.mlp_output


def _series(base: nn.Module, cfg: BottleneckSpec, on_input: bool) -> SeriesAdapter:
    in_features, out_features = layer_dims(base)
    width = in_features if on_input else out_features
    return SeriesAdapter(base, _bottleneck(cfg, width, width, base), on_input)


def _parallel_linear(base: nn.Module, cfg: BottleneckSpec) -> ParallelAdapter:
    return ParallelAdapter(base, _bottleneck(cfg, *layer_dims(base), base))


def _parallel_block(block: nn.Module, cfg: BottleneckSpec, hidden_size: int) -> ParallelAdapter:
    return ParallelAdapter(block, _bottleneck(cfg, hidden_size, hidden_size, block))
