"""LoRA / DoRA adapters in PEFT's layout, both ways, so PEFT, vLLM and the hub can use them.

PEFT's adapter folder holds `adapter_config.json` and `adapter_model.safetensors`, with keys such as
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. Ours are the same module names with
`lora_a.weight`, `lora_b.weight` and (DoRA) `magnitude`; the math is the same: s = alpha / r
(alpha / √r with rsLoRA), B starts at zero, DoRA's norm is taken per output row.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from qadapt.adapters.kinds import adapter_kind, kind_of_peft_config
from qadapt.errors import QadaptError
from qadapt.files import atomic_folder, describe_written, refuse_existing

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PICKLED_WEIGHTS = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
# Our parameter name → PEFT's, relative to the wrapped module.
KEY_NAMES = {"lora_a.weight": "lora_A.weight", "lora_b.weight": "lora_B.weight", "magnitude": "lora_magnitude_vector"}
# PEFT options we cannot carry over: a non-default value is refused on import, naming the option.
UNSUPPORTED_OPTIONS = {
    "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "layers_to_transform": None,
    "bias": "none", "lora_bias": False, "use_qalora": False, "target_parameters": None,
    "trainable_token_indices": None,
}


def compact_targets(model: nn.Module, wrapped: list[str]) -> list[str]:
    """The last name parts when they pick exactly the wrapped layers (`q_proj`), else the full names."""
    from qadapt.adapters import is_linear

    leaves = sorted({name.rsplit(".", 1)[-1] for name in wrapped})
    picked = {name for name, m in model.named_modules() if is_linear(m) and name.rsplit(".", 1)[-1] in leaves}
    return leaves if picked == set(wrapped) else sorted(wrapped)


def export_peft(run_dir: str | Path, out: str | Path) -> Path:
    """Write the run's LoRA / DoRA adapter as a PEFT adapter folder; return it."""
    from safetensors.torch import save_file
    from transformers.pytorch_utils import Conv1D

    from qadapt.export.merge import refuse_unmergeable
    from qadapt.models import meta_model, resolve_model_path
    from qadapt.run_dir import RunDir

    run = RunDir(run_dir)
    recipe = run.trained_recipe
    refuse_unmergeable(recipe, "peft", "export to PEFT (which has no bottleneck adapters)")
    refuse_existing(Path(out))
    wrapped = run.adapter.config["wrapped_modules"]
    weights = run.adapter.weights()
    model = meta_model(recipe.model)
    base = resolve_model_path(recipe.model.name)
    adapter = recipe.adapter
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "inference_mode": True,
        # A hub id as it is; a local folder (or the cached conversion of a GGUF) as an absolute path.
        "base_model_name_or_path": str(Path(base).resolve()) if Path(base).is_dir() else base,
        "revision": recipe.model.revision,
        "r": adapter.rank, "lora_alpha": adapter.alpha, "lora_dropout": adapter.dropout,
        "use_rslora": adapter.rslora, **adapter_kind(adapter.kind).peft_options,
        "target_modules": compact_targets(model, wrapped),
        # GPT-2's Conv1D stores its weight as (in, out); PEFT needs to know to merge it right.
        "fan_in_fan_out": any(isinstance(model.get_submodule(name), Conv1D) for name in wrapped),
        "init_lora_weights": True, **UNSUPPORTED_OPTIONS,
    }
    state = peft_state(weights)
    with atomic_folder(Path(out)) as tmp:
        save_file(state, tmp / PEFT_WEIGHTS, metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2))
    print(describe_written(Path(out)))
    return Path(out)


def import_peft(peft_dir: str | Path, out: str | Path, base: str | None = None, quant: str = "nf4",
                template: str = "alpaca") -> Path:
    """Make a run directory from a PEFT LoRA / DoRA adapter, loadable with qadapt eval / merge / export."""
    from qadapt.adapters import attach_adapters, load_adapter_state_dict
    from qadapt.models import meta_model
    from qadapt.recipe import recipe_from_dict, save_recipe
    from qadapt.run_dir import RunDir

    peft_dir, out = Path(peft_dir), Path(out)
    config = _read_peft_config(peft_dir)
    refuse_existing(out)
    state = peft_state_to_ours(_read_peft_weights(peft_dir))
    wrapped = sorted({_split_key(key, KEY_NAMES)[0] for key in state})
    name = base or config.get("base_model_name_or_path")
    if not name:
        raise QadaptError(f"{peft_dir / PEFT_CONFIG} names no base_model_name_or_path; give one with --base")
    recipe = recipe_from_dict({
        "model": {"name": name, "quant": quant, "revision": config.get("revision")},
        "adapter": {"kind": kind_of_peft_config(config), "rank": config["r"],
                    "alpha": config["lora_alpha"], "dropout": config.get("lora_dropout", 0.0),
                    "rslora": bool(config.get("use_rslora"))},
        "data": {"template": template},
        "output_dir": str(out),
    }, source=str(peft_dir / PEFT_CONFIG))
    model = meta_model(recipe.model)
    recipe.adapter = dataclasses.replace(recipe.adapter, targets=compact_targets(model, wrapped))
    attach_adapters(model, recipe.adapter)  # on the meta device: checks names and shapes, loads nothing
    load_adapter_state_dict(model, state)
    out.mkdir(parents=True, exist_ok=True)
    run = RunDir(out)
    save_recipe(recipe, run.recipe_file)
    run.adapter.save(model, recipe, wrapped, state=state)
    print(describe_written(out))
    return out


def _read_peft_config(peft_dir: Path) -> dict:
    file = peft_dir / PEFT_CONFIG
    if not file.is_file():
        raise QadaptError(f"not a PEFT adapter folder: {file} not found")
    config = json.loads(file.read_text())
    if config.get("peft_type") != "LORA":
        raise QadaptError(f"{file}: peft_type is {config.get('peft_type')!r}; only LORA adapters (LoRA, DoRA) import")
    for option, default in UNSUPPORTED_OPTIONS.items():
        if config.get(option, default) not in (default, None, {}, [], False, "none"):
            raise QadaptError(f"{file}: {option}={config[option]!r} is not supported by qadapt (only {default!r})")
    return config


def _read_peft_weights(peft_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (peft_dir / PEFT_WEIGHTS).is_file():
        return load_file(peft_dir / PEFT_WEIGHTS)
    if (peft_dir / PEFT_PICKLED_WEIGHTS).is_file():
        return torch.load(peft_dir / PEFT_PICKLED_WEIGHTS, map_location="cpu", weights_only=True)
    raise QadaptError(f"no adapter weights in {peft_dir}: expected {PEFT_WEIGHTS} (or {PEFT_PICKLED_WEIGHTS})")


def peft_state(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our adapter weights under PEFT's saved names (what `set_peft_model_state_dict` loads)."""
    state = {}
    for key, tensor in weights.items():
        module, param = _split_key(key, KEY_NAMES)
        state[f"{PEFT_PREFIX}{module}.{KEY_NAMES[param]}"] = tensor
    return state


def peft_state_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # PEFT before 0.12 saved DoRA's magnitude as `lora_magnitude_vector.weight`.
    peft_to_ours = {peft: ours for ours, peft in KEY_NAMES.items()} | {"lora_magnitude_vector.weight": "magnitude"}
    converted = {}
    for key, tensor in state.items():
        module, param = _split_key(key.removeprefix(PEFT_PREFIX), peft_to_ours)
        converted[f"{module}.{peft_to_ours[param]}"] = tensor.to(torch.float32)
    return converted


def _split_key(key: str, known: dict[str, str]) -> tuple[str, str]:
    """('model.layers.0.mlp.down_proj', 'lora_a.weight') from a full key; unknown parameters are refused."""
    for param in known:
        if key.endswith("." + param):
            return key[: -len(param) - 1], param
    raise QadaptError(f"adapter weight {key!r} is not a LoRA / DoRA weight ({', '.join(known)})")
