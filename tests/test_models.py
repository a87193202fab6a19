"""Resolving and loading a base: embedded GGUF, local folders, hub ids, quantization and freezing."""

from __future__ import annotations

import pytest
import torch

from qadapt.errors import QadaptError
from qadapt.models import embedded_model, resolve_compute_dtype, resolve_model_path


def test_hub_ids_pass_through_and_paths_must_exist(tmp_path):
    for hub_id in ["Qwen/Qwen2.5-0.5B", "meta-llama/Llama-2-7b-hf", "gpt2"]:
        assert resolve_model_path(hub_id) == hub_id
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    for missing in ["./no-model", "/no/such/model", "a/b/c", str(tmp_path / "m.gguf")]:
        with pytest.raises(QadaptError, match="not found"):
            resolve_model_path(missing)


def test_embedded_model_is_converted_once_to_a_safetensors_folder(smol_tokenizer):
    from pathlib import Path

    assert embedded_model("smollm2-135m").name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    folder = Path(resolve_model_path("smollm2-135m"))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert resolve_model_path("smollm2-135m") == str(folder)  # cached: same folder, no second conversion
    assert smol_tokenizer.eos_token == "<|im_end|>" and smol_tokenizer.pad_token_id is not None


def test_compute_dtype():
    assert resolve_compute_dtype("fp32") is torch.float32
    assert resolve_compute_dtype("bf16") is torch.bfloat16
    from qadapt.quant import fast_bf16_available

    assert resolve_compute_dtype("auto") is (torch.bfloat16 if fast_bf16_available() else torch.float32)
    # This machine's CPU has AVX512-BF16 (as the issue measured); auto must then pick bf16.
    if "avx512_bf16" in open("/proc/cpuinfo").read():
        assert fast_bf16_available()


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8", "none"])
def test_base_is_frozen_and_quantized_as_asked(load_tiny, quant):
    import bitsandbytes as bnb

    model = load_tiny(quant)
    assert not any(p.requires_grad for p in model.parameters())
    layer = model.model.layers[0].mlp.down_proj
    expected = {"nf4": bnb.nn.Linear4bit, "fp4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt, "none": torch.nn.Linear}
    assert type(layer) is expected[quant] or (quant != "none" and isinstance(layer, expected[quant]))
    if quant in ("nf4", "fp4"):
        assert layer.weight.quant_state.quant_type == quant
        assert layer.weight.quant_state.nested  # double quantization, the default
    assert not isinstance(model.lm_head, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))  # the head stays as it is
