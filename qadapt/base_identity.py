"""Which base model an adapter was trained on, so that it is never loaded onto another one.

An adapter loads without complaint onto any base whose layers have the same shapes (every fine-tune
of LLaMA-7B, say), and then silently computes nonsense. Its run records the base's identity: name,
architecture, the shape of every linear and embedding layer (hashed), and a few embedding weights
(listed and hashed). Embeddings are never quantized, so the identity is the same for NF4, FP4, int8
and unquantized loads of one checkpoint.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from qadapt.errors import QadaptError

SAMPLE_SIZE = 16
# A 16-bit load of an fp32 checkpoint moves a weight by at most half a bf16 step.
SAMPLE_RTOL = 2.0**-8


def base_identity(model: nn.Module, name: str) -> dict:
    """The identity of a freshly loaded base model (before adapters are attached)."""
    config = model.config
    embedding = model.get_input_embeddings().weight.detach()
    flat = embedding.flatten()
    stride = max(1, flat.numel() // SAMPLE_SIZE)
    sample = flat[stride // 2::stride][:SAMPLE_SIZE].float().cpu()
    return {
        "name": name,
        "model_type": config.model_type,
        "architectures": list(getattr(config, "architectures", None) or []),
        "layers": config.num_hidden_layers if hasattr(config, "num_hidden_layers") else None,
        "shapes_sha256": _sha256(json.dumps(_layer_shapes(model))),
        "weights_sample": [float(v) for v in sample],
        "weights_sha256": _sha256(sample.to(torch.bfloat16).view(torch.int16).numpy().tobytes()),
    }


def check_same_base(trained_on: dict | None, loaded: dict, adapter: str) -> None:
    """Refuse when the base loaded now is not the one `adapter` was trained on."""
    if not trained_on:  # runs written before identities were recorded, and imported PEFT adapters
        return
    if trained_on["model_type"] != loaded["model_type"] or trained_on["shapes_sha256"] != loaded["shapes_sha256"]:
        what = "a different architecture (its layer shapes differ)"
    elif trained_on["weights_sha256"] != loaded["weights_sha256"] and not torch.allclose(
            torch.tensor(trained_on["weights_sample"]), torch.tensor(loaded["weights_sample"]),
            rtol=SAMPLE_RTOL, atol=1e-6):
        what = "the same architecture with different weights"
    else:
        return
    raise QadaptError(
        f"adapter {adapter} was trained on {_describe(trained_on)}, but the base loaded now "
        f"({loaded['name']}) is {what}: {_describe(loaded)}. Refusing to load it onto another base; "
        "point model.name at the model it was trained on"
    )


def _describe(identity: dict) -> str:
    return (f"{identity['name']} ({identity['model_type']}, {identity['layers']} layers, "
            f"weights {identity['weights_sha256'][:12]})")


def _layer_shapes(model: nn.Module) -> list:
    """(name, in, out) of every linear and embedding layer; quantized linears report their logical shape.

    A token classifier's head is not part of the base: it is new, sized by the task's labels, and trained.
    """
    from qadapt.adapters import TOKEN_CLASSIFIER, has_token_classifier

    head = TOKEN_CLASSIFIER if has_token_classifier(model) else None
    shapes = []
    for name, module in model.named_modules():
        if name == head:
            continue
        if isinstance(module, nn.Linear):
            shapes.append([name, module.in_features, module.out_features])
        elif isinstance(module, nn.Embedding):
            shapes.append([name, module.num_embeddings, module.embedding_dim])
        elif type(module).__name__ == "Conv1D":  # GPT-2's transposed linear
            shapes.append([name, *module.weight.shape])
    return shapes


def _sha256(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()
