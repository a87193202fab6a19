r"""Attach adapters to a model in place: match module names, wrap them on their parent, report the names.

A target is a module-name suffix of whole name parts (`q_proj`, `attn.c_proj`), or, starting with `^`,
a regular expression the whole name must match: BERT's FFN output `layer.0.output.dense` and its
attention output `layer.0.attention.output.dense` share every suffix, so the table names the first as
`^.*layer\.\d+\.output\.dense`.
"""

from __future__ import annotations

import re
from typing import Callable

from torch import nn
from transformers.pytorch_utils import Conv1D

from qadapt.adapters.base import Adapter, mark_only_adapters_trainable
from qadapt.errors import QadaptError

Wrap = Callable[[nn.Module], Adapter]


def is_linear(module: nn.Module) -> bool:
    """nn.Linear (bitsandbytes' 4-bit and 8-bit layers included) or GPT-2's transposed Conv1D."""
    return isinstance(module, (nn.Linear, Conv1D)) and not isinstance(module, Adapter)


def linear_layer_names(model: nn.Module) -> list[str]:
    """The distinct last name parts of the model's linear layers, e.g. ['down_proj', 'lm_head', ...]."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if is_linear(m)})


def ends_with(name: str, target: str) -> bool:
    """Whether module `name` is what `target` names: a suffix of whole name parts, or a `^` regex."""
    if target.startswith("^"):
        return re.fullmatch(target, name) is not None
    return name == target or name.endswith("." + target)


def match_linears(model: nn.Module, targets: list[str]) -> list[str]:
    """Names of the linear layers ending with any target; every target must match at least one."""
    matched = [name for name, m in model.named_modules() if is_linear(m) and any(ends_with(name, t) for t in targets)]
    unmatched = [t for t in targets if not any(ends_with(n, t) for n in matched)]
    if unmatched:
        raise QadaptError(
            f"adapter target(s) {', '.join(unmatched)} match no linear layer; the model's linear layers "
            f"are: {', '.join(linear_layer_names(model))}"
        )
    return matched


def match_blocks(model: nn.Module, block: str) -> list[str]:
    """Names of the modules whose name ends with `block` (e.g. every layer's `mlp`)."""
    matched = [name for name, m in model.named_modules() if ends_with(name, block) and not isinstance(m, Adapter)]
    if not matched:
        raise QadaptError(f"the model has no module named '{block}'")
    return matched


def replace_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put `module` where the submodule `name` is, on its parent; return the one it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old


def wrap_modules(model: nn.Module, plan: dict[str, Wrap]) -> list[str]:
    """Replace each named module by `wrap(module)` on its parent; only adapters stay trainable."""
    for name, wrap in plan.items():
        replace_module(model, name, wrap(model.get_submodule(name)))
    mark_only_adapters_trainable(model)
    return list(plan)


def inject_adapters(model: nn.Module, targets: list[str], wrap: Wrap) -> list[str]:
    """Wrap every linear layer whose name ends with a target; return their names."""
    return wrap_modules(model, {name: wrap for name in match_linears(model, targets)})


def detach_adapters(model: nn.Module) -> None:
    """Put every wrapped module back in its adapter's place: the base as it was before attaching."""
    names = [name for name, m in model.named_modules() if isinstance(m, Adapter)]
    for name in reversed(names):  # inner first: an adapter's base may hold adapters of its own
        replace_module(model, name, model.get_submodule(name).base)
