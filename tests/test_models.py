"""Resolving and loading a base: embedded GGUF, local folders, hub ids, quantization and freezing."""

from __future__ import annotations

import pytest
import torch

from conftest import token_batch

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


def test_a_cache_folder_two_processes_fill_at_once_keeps_the_first_one_written(tmp_path):
    """Two ranks of `accelerate launch` (or two test workers) converting the embedded model at once: the
    second to finish keeps the first one's folder and leaves no temporary folder behind."""
    from qadapt.files import atomic_folder

    cache = tmp_path / "model"
    with atomic_folder(cache, replace=False) as second:
        (second / "config.json").write_text("second")
        with atomic_folder(cache, replace=False) as first:
            (first / "config.json").write_text("first")
    assert (cache / "config.json").read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["model"]
    with atomic_folder(cache) as replacing:
        (replacing / "config.json").write_text("new")
    assert (cache / "config.json").read_text() == "new"


def test_compute_dtype():
    assert resolve_compute_dtype("fp32") is torch.float32
    assert resolve_compute_dtype("bf16") is torch.bfloat16
    # A CPU with AVX512-BF16 computes bf16 fast: auto picks it there, fp32 elsewhere (GPUs: test_gpu_path).
    with_bf16 = "avx512_bf16" in open("/proc/cpuinfo").read()
    assert resolve_compute_dtype("auto") is (torch.bfloat16 if with_bf16 else torch.float32)


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


@pytest.mark.parametrize("quant,compute_dtype", [("nf4", "fp32"), ("fp4", "fp32"), ("nf4", "bf16"), ("int8", "fp32")])
def test_unpacked_4bit_layers_compute_exactly_what_the_packed_ones_did(load_tiny, quant, compute_dtype):
    import bitsandbytes as bnb

    from qadapt.quant import unpack_quantized_layers, unpacked_bytes

    model = load_tiny(quant, compute_dtype).eval()
    batch = token_batch(batch=3, length=17, vocab=200)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"]).logits
    expected_bytes = unpacked_bytes(model)
    assert unpack_quantized_layers(model) == expected_bytes
    with torch.no_grad():
        unpacked = model(input_ids=batch["input_ids"]).logits
    assert torch.equal(unpacked, packed)  # bit for bit: greedy answers cannot change
    layer = model.model.layers[0].mlp.down_proj
    if quant == "int8":  # its forward is an int8 product, not one with the de-quantized weight: kept
        assert isinstance(layer, bnb.nn.Linear8bitLt) and expected_bytes == 0
    else:
        assert type(layer) is torch.nn.Linear and not layer.weight.requires_grad
        assert layer.weight.dtype == (torch.bfloat16 if compute_dtype == "bf16" else torch.float32)
        assert expected_bytes == sum(m.weight.numel() * m.weight.element_size() - m.weight.numel() // 2
                                     for m in model.modules() if type(m) is torch.nn.Linear and m is not model.lm_head)


def test_decoding_unpacks_the_base_only_when_half_the_free_memory_holds_it(load_tiny):
    import bitsandbytes as bnb

    from qadapt.lean_cpu import unpack_for_decoding

    model = load_tiny("nf4").eval()
    assert not unpack_for_decoding(model, free_bytes=1e5)  # the tiny model needs ~0.25 MB
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert unpack_for_decoding(model, free_bytes=1e9)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_bitsandbytes_is_imported_without_starting_torchs_compiler():
    """qadapt.quant imports bitsandbytes with torch.compile set aside (its import-time wrapping of fallback kernels
    costs ~3 s per process); torch.compile is restored, and the quantized layers still work."""
    import subprocess
    import sys

    probe = ("import sys, torch; compile_ = torch.compile; from qadapt.quant import _bitsandbytes; bnb = _bitsandbytes(); "
             "assert torch.compile is compile_; assert 'torch._inductor.compile_fx' not in sys.modules, 'inductor'; "
             "layer = bnb.nn.Linear4bit(64, 32, quant_type='nf4').to('cpu'); layer.weight = bnb.nn.Params4bit("
             "torch.randn(32, 64), requires_grad=False, quant_type='nf4').to('cpu'); "
             "print(tuple(layer(torch.randn(3, 64)).shape))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "(3, 32)", result.stderr[-2000:]
