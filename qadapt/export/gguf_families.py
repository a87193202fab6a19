"""What llama.cpp needs from each model family a GGUF is written for: architecture, hyper-parameters, layout.

Tensor names come from gguf-py's map for the architecture. What differs between families is written
here, one row each, as llama.cpp's own converter (convert_hf_to_gguf.py) lays them out:
- LLaMA-style rotary (llama, mistral, smollm3, granite) rotates adjacent pairs in llama.cpp and two
  halves in transformers: q/k rows are reordered. NEOX-style families (Qwen, Gemma, Phi-3, OLMo 2,
  GPT-NeoX) rotate halves in both and are written as they are.
- Gemma's RMSNorm scales by (1 + w), llama.cpp's by w: the norms are written with the 1 added.
- BLOOM and GPT-NeoX keep their fused qkv rows grouped by head (q, k, v of head 0, then of head 1, ...);
  llama.cpp reads all q rows, then all k rows, then all v rows.
A setting llama.cpp would silently compute differently (another rope scaling, a SmolLM3 no-rope
layout or a Gemma attention scale llama.cpp does not derive) is refused up front, by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from qadapt.errors import QadaptError


@dataclass(frozen=True)
class GgufFamily:
    arch: str  # the gguf.MODEL_ARCH member
    rotary_pairs: bool = False
    norm_shift: float = 0.0
    qkv_by_head: bool = False
    strip_prefix: str = ""  # removed from tensor names before gguf-py's map reads them
    extra_hyperparameters: Callable = field(default=lambda writer, config: None)
    refusal: Callable = field(default=lambda config: None)  # config -> why llama.cpp cannot run it, or None
    pre_tokenizer: str = "default"  # llama.cpp's pre-tokenizer for this family's byte-level BPE vocabulary
    # transformers 5.24 reads a Gemma 3 GGUF as another model (13 % top-1 agreement on a file llama.cpp runs
    # at 99.6 %): its read-back checks nothing there.
    transformers_reads_it: bool = True


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _rope(config: dict) -> dict:
    rope = config.get("rope_parameters") or {"rope_theta": config.get("rope_theta", 10000.0)}
    return rope.get("full_attention", rope)


def _partial_rotary(config: dict) -> float:
    return (config.get("rope_parameters") or {}).get("partial_rotary_factor") or config.get("rotary_pct") or 1.0


def _gemma3_hyperparameters(writer, config: dict) -> None:
    writer.add_key_length(_head_dim(config))
    writer.add_value_length(_head_dim(config))
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    if config.get("sliding_window"):
        writer.add_sliding_window(config["sliding_window"])
        writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in config["layer_types"]])
        local = (config.get("rope_parameters") or {}).get("sliding_attention", {}).get("rope_theta")
        if local is not None:
            writer.add_rope_freq_base_swa(local)


def _gemma3_refusal(config: dict) -> str | None:
    # llama.cpp scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 62-layer 27B.
    derived = (config["hidden_size"] // config["num_attention_heads"] if config["num_hidden_layers"] == 62
               else _head_dim(config))
    if config.get("query_pre_attn_scalar", derived) != derived:
        return (f"query_pre_attn_scalar {config['query_pre_attn_scalar']} is not what llama.cpp derives "
                f"for this shape ({derived})")
    return None


def _smollm3_refusal(config: dict) -> str | None:
    layers = config["num_hidden_layers"]
    every_fourth = [int((i + 1) % 4 != 0) for i in range(layers)]  # llama.cpp's fixed no-rope layout
    if config.get("no_rope_layers", every_fourth) != every_fourth:
        return "its no-rope layers are not every fourth layer, the layout llama.cpp assumes"
    return None


def _phi3_hyperparameters(writer, config: dict) -> None:
    writer.add_sliding_window(config.get("sliding_window") or 0)  # 0: llama.cpp's "no window"


def _granite_hyperparameters(writer, config: dict) -> None:
    writer.add_attention_scale(config["attention_multiplier"])
    writer.add_embedding_scale(config["embedding_multiplier"])
    writer.add_residual_scale(config["residual_multiplier"])
    writer.add_logit_scale(config["logits_scaling"])


def _gpt_neox_hyperparameters(writer, config: dict) -> None:
    writer.add_parallel_residual(config.get("use_parallel_residual", True))


def _sliding_refusal(config: dict) -> str | None:
    if config.get("use_sliding_window"):
        return "it uses sliding-window attention, which llama.cpp does not run for this architecture"
    return None


FAMILIES = {  # config.model_type → how its GGUF is written
    "llama": GgufFamily("LLAMA", rotary_pairs=True),
    "mistral": GgufFamily("LLAMA", rotary_pairs=True),
    "smollm3": GgufFamily("SMOLLM3", rotary_pairs=True, refusal=_smollm3_refusal, pre_tokenizer="llama-bpe"),
    "granite": GgufFamily("GRANITE", rotary_pairs=True, extra_hyperparameters=_granite_hyperparameters),
    "qwen2": GgufFamily("QWEN2", refusal=_sliding_refusal, pre_tokenizer="qwen2"),
    "qwen3": GgufFamily("QWEN3", refusal=_sliding_refusal, pre_tokenizer="qwen2"),
    "gemma3_text": GgufFamily("GEMMA3", norm_shift=1.0, extra_hyperparameters=_gemma3_hyperparameters,
                              refusal=_gemma3_refusal, transformers_reads_it=False),
    "phi3": GgufFamily("PHI3", extra_hyperparameters=_phi3_hyperparameters),
    "olmo2": GgufFamily("OLMO2"),
    "gpt_neox": GgufFamily("GPTNEOX", qkv_by_head=True, extra_hyperparameters=_gpt_neox_hyperparameters),
    "bloom": GgufFamily("BLOOM", qkv_by_head=True, strip_prefix="transformer."),
}


def gguf_family(config: dict) -> GgufFamily:
    """The family's row, or a clear refusal naming the families that can be written."""
    model_type = config["model_type"]
    if model_type not in FAMILIES:
        raise QadaptError(f"GGUF export supports {', '.join(FAMILIES)} models, not {model_type}; merge to a "
                          "Hugging Face folder (qadapt merge) and convert it with llama.cpp's convert_hf_to_gguf.py")
    family = FAMILIES[model_type]
    rope = _rope(config)
    why = family.refusal(config)
    if why is None and rope.get("rope_type", "default") != "default":
        why = f"its rope scaling {rope['rope_type']!r} is not written by qadapt"
    if why is not None:
        raise QadaptError(f"cannot write this {model_type} model as GGUF: {why}. Merge it (qadapt merge) and "
                          "convert the folder with llama.cpp's convert_hf_to_gguf.py")
    return family


def add_hyperparameters(writer, family: GgufFamily, config: dict) -> None:
    """What llama.cpp reads for the architecture: the shared keys, then the family's own."""
    hidden = config.get("hidden_size") or config["n_embed"]
    heads = config.get("num_attention_heads") or config["n_head"]
    writer.add_context_length(config.get("max_position_embeddings") or config.get("seq_length") or 2048)
    writer.add_embedding_length(hidden)
    writer.add_block_count(config.get("num_hidden_layers") or config["n_layer"])
    writer.add_feed_forward_length(config.get("intermediate_size") or 4 * hidden)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    if config.get("rms_norm_eps") is not None:
        writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    for key in ("layer_norm_eps", "layer_norm_epsilon"):
        if config.get(key) is not None:
            writer.add_layer_norm_eps(config[key])
    if family.arch != "BLOOM":  # ALiBi: no rotary
        writer.add_rope_freq_base(_rope(config).get("rope_theta", 10000.0))
        writer.add_rope_dimension_count(int(_partial_rotary(config) * _head_dim(config)))
    family.extra_hyperparameters(writer, config)


def to_gguf_layout(key: str, tensor: torch.Tensor, family: GgufFamily, config: dict) -> torch.Tensor:
    """One tensor as llama.cpp lays it out for the family (see the module's docstring)."""
    if family.rotary_pairs and key.endswith(("q_proj.weight", "k_proj.weight")):
        heads = config["num_attention_heads"] if key.endswith("q_proj.weight") else config["num_key_value_heads"]
        return interleave_rotary_halves(tensor, heads, _head_dim(config))
    if family.norm_shift and key.endswith("norm.weight"):
        return tensor + family.norm_shift
    if family.qkv_by_head and ".query_key_value." in key:
        heads = config.get("num_attention_heads") or config["n_head"]
        return tensor.reshape(heads, 3, -1, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape)
    return tensor


def interleave_rotary_halves(weight: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Hugging Face rotates the two halves of each head (rotate_half); llama.cpp's LLaMA rotates adjacent pairs.

    Reorder each head's rows from [x0..x(d/2-1), y0..y(d/2-1)] to [x0, y0, x1, y1, ...].
    """
    return weight.reshape(heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(weight.shape)
