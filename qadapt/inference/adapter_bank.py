"""Many adapters on one loaded base: each loaded once, the active one switched without reloading the
base, and (LoRA) one batch whose rows each use their own adapter.

    bank = AdapterBank.from_runs(["runs/wnut17-series", "runs/wnut17-lora"])   # one base, two adapters
    bank.activate("wnut17-lora");  bank.model(**batch)
    with bank.mixed(["wnut17-lora", "other-lora", ...]):  bank.model(**batch)   # row i: adapter i

An adapter is its config and a few MB of fp32 tensors, kept in memory. Activating one copies its tensors
into the attached modules; only an adapter of another shape (kind, placement, size, targets, label set)
first detaches the attached modules and attaches its own. The base stays loaded and quantized throughout.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qadapt.adapters import LoRALinear, TrainedHead, attach_adapters, detach_adapters, load_adapter_state_dict
from qadapt.adapters.head import TOKEN_CLASSIFIER
from qadapt.adapters.inject import replace_module
from qadapt.adapters.kinds import adapter_kind
from qadapt.adapters.lora import lora_scale
from qadapt.errors import QadaptError
from qadapt.inference.loader import head_labels, load_frozen_base
from qadapt.adapters.spec import AdapterSpec
from qadapt.recipe import adapter_section
from qadapt.run_dir import AdapterFolder, RunDir


@dataclass
class LoadedAdapter:
    name: str
    config: AdapterSpec
    labels: list[str] | None  # a token classifier's head outputs
    weights: dict[str, torch.Tensor]
    file_bytes: int  # adapter.safetensors on disk
    load_s: float  # reading, checking and keeping it (activation not included)

    @property
    def layout(self) -> tuple:
        """What the attached modules must look like for these weights to fit."""
        return self.config, tuple(self.labels or ())


class AdapterBank:
    """Adapters by name on one frozen (quantized) base `model`, whose identity `base` they must match."""

    def __init__(self, model: nn.Module, base: dict):
        self.model = model
        self.base = base
        self.adapters: dict[str, LoadedAdapter] = {}
        self.active: str | None = None
        self.base_load_s: float | None = None  # set by from_runs, which loads the base itself
        self._layout: tuple | None = None

    @classmethod
    def from_runs(cls, run_dirs: list[str | Path]) -> "AdapterBank":
        """The first run's base, loaded once as it was trained, with every run's adapter (named by its folder)."""
        runs = [RunDir(path) for path in run_dirs]
        first = runs[0]
        started = time.perf_counter()
        bank = cls(*load_frozen_base(first.trained_recipe.model, head_labels(first.adapter)))
        bank.base_load_s = time.perf_counter() - started
        for run in runs:
            bank.load(run.path.name, run.adapter.path)
        bank.activate(first.path.name)
        return bank

    def load(self, name: str, folder: str | Path) -> LoadedAdapter:
        """Read an adapter folder (adapter.safetensors + adapter_config.json) into the bank."""
        started, folder = time.perf_counter(), AdapterFolder(folder)
        if name in self.adapters:
            raise QadaptError(f"an adapter named {name!r} is already loaded")
        config = folder.config  # a folder without one is refused
        folder.check_base(self.base)
        adapter_cfg = adapter_section(config, str(folder.config_file))
        loaded = LoadedAdapter(name, adapter_cfg, head_labels(folder), folder.weights(),
                               folder.weights_file.stat().st_size, 0.0)
        loaded.load_s = time.perf_counter() - started
        self.adapters[name] = loaded
        return loaded

    def activate(self, name: str) -> None:
        """Make adapter `name` the one every forward uses."""
        adapter = self._get(name)
        if adapter.layout != self._layout:
            detach_adapters(self.model)
            if adapter.labels is not None:
                _new_head(self.model, adapter.labels)
            attach_adapters(self.model, adapter.config)
            self._layout = adapter.layout
        load_adapter_state_dict(self.model, adapter.weights)
        self.model.eval()
        self.active = name

    @contextmanager
    def mixed(self, row_adapters: list[str]):
        """Within this block, row i of a batch goes through LoRA adapter `row_adapters[i]`.

        The adapters must be LoRA on the same modules (ranks may differ) with the same labels, if any.
        """
        names = list(dict.fromkeys(row_adapters))
        adapters = [self._get(name) for name in names]
        for adapter in adapters:
            if not adapter_kind(adapter.config.kind).mixes_in_a_batch:
                raise QadaptError(f"a mixed batch runs LoRA adapters only; {adapter.name!r} is {adapter.config.kind}")
        shapes = {(frozenset(_lora_modules(a.weights)), tuple(a.labels or ())) for a in adapters}
        if len(shapes) > 1:
            raise QadaptError(f"adapters {names} wrap different modules or have different labels; a mixed batch "
                              "needs LoRA on the same modules with the same labels")
        self.activate(names[0])
        rows = {name: torch.tensor([i for i, n in enumerate(row_adapters) if n == name]) for name in names}
        originals = {}
        for module_name, module in list(self.model.named_modules()):
            if isinstance(module, (LoRALinear, TrainedHead)):
                originals[module_name] = module
                groups = [(rows[a.name], _module_weights(a, module_name)) for a in adapters]
                mixed = MixedLoRA(module.base, groups) if isinstance(module, LoRALinear) else MixedHead(groups)
                replace_module(self.model, module_name, mixed)
        try:
            yield self.model
        finally:
            for module_name, module in originals.items():
                replace_module(self.model, module_name, module)

    def _get(self, name: str) -> LoadedAdapter:
        if name not in self.adapters:
            raise QadaptError(f"no adapter named {name!r} is loaded; loaded: {', '.join(self.adapters) or 'none'}")
        return self.adapters[name]


class MixedLoRA(nn.Module):
    """A frozen linear layer plus, for each group of rows, that group's own LoRA update."""

    def __init__(self, base: nn.Module, groups: list[tuple[torch.Tensor, dict]]):
        super().__init__()
        self.base = base
        self.groups = groups  # (row indices, {"a", "b", "scale"})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        # As LoRALinear computes it: in x's dtype when that is 16-bit, else fp32.
        dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
        delta = out.new_zeros(out.shape, dtype=dtype)
        for rows, w in self.groups:
            rows = rows.to(x.device)
            middle = F.linear(x[rows].to(dtype), w["a"].to(x.device, dtype)) * w["scale"]
            delta[rows] = F.linear(middle, w["b"].to(x.device, dtype))
        return out + delta.to(out.dtype)


class MixedHead(nn.Module):
    """A trained token-classification head per group of rows."""

    def __init__(self, groups: list[tuple[torch.Tensor, dict]]):
        super().__init__()
        self.groups = groups  # (row indices, {"weight", "bias"})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        width = self.groups[0][1]["weight"].shape[0]
        out = x.new_zeros((*x.shape[:-1], width))
        for rows, w in self.groups:
            rows = rows.to(x.device)
            bias = None if w["bias"] is None else w["bias"].to(x.device)
            out[rows] = F.linear(x[rows], w["weight"].to(x.device), bias)
        return out


def _lora_modules(weights: dict[str, torch.Tensor]) -> list[str]:
    return [key.removesuffix(".lora_a.weight") for key in weights if key.endswith(".lora_a.weight")]


def _module_weights(adapter: LoadedAdapter, module_name: str) -> dict:
    w = adapter.weights
    if module_name == TOKEN_CLASSIFIER:
        return {"weight": w[f"{module_name}.linear.weight"], "bias": w.get(f"{module_name}.linear.bias")}
    cfg = adapter.config
    a, b = w[f"{module_name}.lora_a.weight"], w[f"{module_name}.lora_b.weight"]
    return {"a": a, "b": b, "scale": lora_scale(cfg.alpha, a.shape[0], cfg.rslora)}


def _new_head(model: nn.Module, labels: list[str]) -> None:
    """A token classifier's head sized for `labels` (its weights come from the adapter)."""
    old = model.get_submodule(TOKEN_CLASSIFIER)
    replace_module(model, TOKEN_CLASSIFIER, nn.Linear(old.in_features, len(labels), device=old.weight.device,
                                                dtype=old.weight.dtype))
    model.num_labels = model.config.num_labels = len(labels)
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {label: i for i, label in enumerate(labels)}

