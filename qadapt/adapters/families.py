"""Where adapters go in each model family, keyed on `config.model_type` (never on a model's name).

Names are module-name suffixes inside a decoder (or encoder) layer. Where two modules share a last name
(GPT-2's `attn.c_proj` and `mlp.c_proj`) the suffix carries its parent; where they share every suffix
(BERT's two `output.dense`) a `^` regex names the whole path. A family not in the table still works
with explicit `adapter.targets` and `placement: linears`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from qadapt.errors import QadaptError


@dataclass(frozen=True)
class Family:
    linears: tuple[str, ...]
    """Every linear layer of a decoder layer: the default LoRA / DoRA targets."""
    attention: str
    """The attention block (parallel placement `attention`)."""
    mlp: Optional[str]
    """The MLP block (parallel placement `mlp`); None where its linears sit on the layer itself."""
    attention_output: str
    """The attention's output projection (series placement `attention`: after it)."""
    mlp_inputs: tuple[str, ...]
    """Linears that read the MLP's input (LLM-Adapters puts a series adapter on their input)."""
    mlp_output: Optional[str]
    """The MLP's output projection (series placement `mlp`: after it, "AdapterP"); None for a mixture of
    experts, whose experts are not linear modules."""


_LLAMA = Family(
    linears=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    attention="self_attn", mlp="mlp", attention_output="o_proj",
    mlp_inputs=("gate_proj", "up_proj"), mlp_output="down_proj",
)

_MIXTURE_OF_EXPERTS = Family(
    linears=("q_proj", "k_proj", "v_proj", "o_proj"),
    attention="self_attn", mlp="mlp", attention_output="o_proj", mlp_inputs=(), mlp_output=None,
)

# BERT-style encoders: layer.N.attention.output.dense ends the attention, layer.N.output.dense the FFN.
_BERT_FFN_OUTPUT = r"^.*layer\.\d+\.output\.dense"


def _bert_like(query: str, key: str, value: str, attention_output: str) -> Family:
    """An encoder layer: attention (ending in its output projection + LayerNorm), then intermediate → output.

    Its FFN is two sibling modules, not one block, so a parallel adapter sits beside the attention
    or beside named linears (placement `linears`), not beside an `mlp`.
    """
    return Family(
        linears=(query, key, value, attention_output, "intermediate.dense", _BERT_FFN_OUTPUT),
        attention="attention", mlp=None, attention_output=attention_output,
        mlp_inputs=("intermediate.dense",), mlp_output=_BERT_FFN_OUTPUT,
    )


_BERT = _bert_like("query", "key", "value", "attention.output.dense")

FAMILIES: dict[str, Family] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    # Later decoders with LLaMA's layer names (Gemma 3 and 4 text, SmolLM3, Granite, OLMo 2). Gemma 4's
    # per-layer-input linears (per_layer_input_gate, per_layer_projection) feed its per-layer embeddings:
    # not targeted by default.
    "gemma3_text": _LLAMA,
    "gemma4_text": _LLAMA,
    "smollm3": _LLAMA,
    "granite": _LLAMA,
    "olmo2": _LLAMA,
    # Qwen3.5: three of four layers are linear attention (a gated delta net); its projections take
    # adapters as the full-attention layers' do, but not in_proj_a / in_proj_b (one row per head: the
    # decay gates). The attention block is whichever of the two a layer has.
    "qwen3_5_text": Family(
        linears=("q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "out_proj",
                 "gate_proj", "up_proj", "down_proj"),
        attention=r"^.*layers\.\d+\.(self_attn|linear_attn)",
        mlp="mlp", attention_output=r"^.*layers\.\d+\.(self_attn\.o_proj|linear_attn\.out_proj)",
        mlp_inputs=("gate_proj", "up_proj"), mlp_output="down_proj",
    ),
    # LFM2: short-convolution layers (conv.in_proj → conv → conv.out_proj) among attention layers, and a
    # SwiGLU feed_forward (w1, w3 → w2).
    "lfm2": Family(
        linears=("q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1", "w3", "w2"),
        attention=r"^.*layers\.\d+\.(self_attn|conv)", mlp="feed_forward",
        attention_output=r"^.*layers\.\d+\.(self_attn|conv)\.out_proj", mlp_inputs=("w1", "w3"), mlp_output="w2",
    ),
    # Mixtures of experts (Qwen3-MoE, gpt-oss): transformers keeps each layer's experts as 3-D parameters,
    # not linear modules, so bitsandbytes leaves them unquantized (in the compute dtype) and adapters
    # cannot wrap them. Adapters go on the attention's linears, or beside the whole MoE block (parallel).
    "qwen3_moe": _MIXTURE_OF_EXPERTS,
    "gpt_oss": _MIXTURE_OF_EXPERTS,
    # Phi-3 / Phi-4: query, key and value in one linear, gate and up in another.
    "phi3": Family(
        linears=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
        attention="self_attn", mlp="mlp", attention_output="o_proj",
        mlp_inputs=("gate_up_proj",), mlp_output="down_proj",
    ),
    "bloom": Family(
        linears=("query_key_value", "self_attention.dense", "dense_h_to_4h", "dense_4h_to_h"),
        attention="self_attention", mlp="mlp", attention_output="self_attention.dense",
        mlp_inputs=("dense_h_to_4h",), mlp_output="dense_4h_to_h",
    ),
    "gptj": Family(
        linears=("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"),
        attention="attn", mlp="mlp", attention_output="out_proj", mlp_inputs=("fc_in",), mlp_output="fc_out",
    ),
    "gpt_neox": Family(
        linears=("query_key_value", "attention.dense", "dense_h_to_4h", "dense_4h_to_h"),
        attention="attention", mlp="mlp", attention_output="attention.dense",
        mlp_inputs=("dense_h_to_4h",), mlp_output="dense_4h_to_h",
    ),
    "opt": Family(
        linears=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
        attention="self_attn", mlp=None, attention_output="out_proj", mlp_inputs=("fc1",), mlp_output="fc2",
    ),
    # GPT-2's projections are transformers' Conv1D (weights stored transposed) unless quantized.
    "gpt2": Family(
        linears=("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"),
        attention="attn", mlp="mlp", attention_output="attn.c_proj", mlp_inputs=("c_fc",), mlp_output="mlp.c_proj",
    ),
    # Encoders, for token classification.
    "bert": _BERT,
    "roberta": _BERT,
    "electra": _BERT,
    "mpnet": _bert_like("attn.q", "attn.k", "attn.v", "attn.o"),
    "deberta-v2": _bert_like("query_proj", "key_proj", "value_proj", "attention.output.dense"),
    "distilbert": Family(
        linears=("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"),
        attention="attention", mlp="ffn", attention_output="out_lin", mlp_inputs=("lin1",), mlp_output="lin2",
    ),
}


def family_of(model: nn.Module, needed_for: str) -> Family:
    """The model's row of the table, or an error saying what to set instead."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        from qadapt.adapters.inject import linear_layer_names

        raise QadaptError(
            f"model type {model_type!r} is not in qadapt's family table ({', '.join(FAMILIES)}), so it has "
            f"no default {needed_for}; set adapter.targets (with placement: linears for series/parallel) "
            f"to some of the model's linear layers: {', '.join(linear_layer_names(model))}"
        )
    return FAMILIES[model_type]
