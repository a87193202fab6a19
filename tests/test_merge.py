"""qadapt merge: LoRA / DoRA folded into a de-quantized or original base, saved, reloaded, verified."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_with_visible_adapter
from safetensors.torch import load_file, save_file

from qadapt.errors import QadaptError
from qadapt.export.merge import compare_logits, logits_on, merge_run, probe_texts
from qadapt.inference.loader import load_trained_model
from qadapt.run_dir import RunDir


def plain_base_logits(run: Path, texts: list[str]) -> torch.Tensor:
    from qadapt.models import load_full_precision, load_tokenizer
    from qadapt.recipe import load_recipe

    recipe = load_recipe(run / "recipe.yaml")
    return logits_on(load_full_precision(recipe.model, "fp32"), load_tokenizer(recipe.model), texts)


@pytest.mark.parametrize("kind, quant, family", [
    ("lora", "nf4", "llama"), ("dora", "nf4", "llama"), ("lora", "int8", "llama"), ("dora", "none", "llama"),
    ("lora", "nf4", "gpt2"), ("dora", "int8", "gpt2"),
])
def test_merged_folder_equals_the_adapter_on_its_base(tmp_path, tiny_llama_dir, tiny_gpt2_dir, kind, quant, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = run_with_visible_adapter(tmp_path, tiny_llama_dir if family == "llama" else tiny_gpt2_dir, kind, quant)
    info = merge_run(run, tmp_path / "merged", dtype="fp32")
    assert info["vs_adapter_on_same_base"]["top1_agreement"] == 1.0
    assert info["vs_adapter_on_same_base"]["max_abs_diff"] < 1e-3
    quantized_linears = {"llama": 14, "gpt2": 8}[family]  # every linear but the head, 2 layers
    assert info["dequantized_layers"] == (0 if quant == "none" else quantized_linears)

    # A standard folder: transformers loads it unquantized; it prompts and stops as the run was trained.
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert not hasattr(merged.config, "quantization_config")
    assert "### Instruction:" in tokenizer.chat_template
    eos = merged.generation_config.eos_token_id
    assert tokenizer.eos_token_id in (eos if isinstance(eos, list) else [eos])
    assert json.loads((tmp_path / "merged" / "qadapt_merge.json").read_text())["adapter_kind"] == kind

    # It is the trained model (fp32 compute), and clearly not the base without its adapter.
    trained, tokenizer, recipe = load_trained_model(run, compute_dtype="fp32")
    texts = probe_texts(recipe.data.template, tokenizer, count=3)
    merged_logits = logits_on(merged, tokenizer, texts)
    # LLM.int8() also rounds the activations to 8 bits, which no full-precision weight can reproduce.
    least_agreement = 0.9 if quant == "int8" else 0.99
    assert compare_logits(logits_on(trained, tokenizer, texts), merged_logits)["top1_agreement"] >= least_agreement
    assert compare_logits(plain_base_logits(run, texts), merged_logits)["max_abs_diff"] > 0.05


@pytest.mark.parametrize("base", ["dequantized", "original"])
def test_fold_is_exactly_w_plus_scaled_ba_on_the_chosen_base(tmp_path, tiny_llama_dir, base):
    """The merged weight is the trained 4-bit weight (quantized from bf16, as in training) or the original, + s·BA."""
    from transformers import AutoModelForCausalLM

    from qadapt.models import load_base
    from qadapt.quant import dequantized_weight
    from qadapt.recipe import load_recipe

    run = run_with_visible_adapter(tmp_path, tiny_llama_dir, "lora", "nf4", compute_dtype="bf16")
    merge_run(run, tmp_path / "merged", dtype="fp32", base=base)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    as_trained = load_base(load_recipe(run / "recipe.yaml").model)
    adapter = load_file(RunDir(run).adapter.weights_file)
    name = "model.layers.1.mlp.down_proj"
    delta = 8.0 * adapter[f"{name}.lora_b.weight"] @ adapter[f"{name}.lora_a.weight"]  # s = alpha / rank = 32 / 4
    if base == "dequantized":
        weight = dequantized_weight(as_trained.get_submodule(name))
    else:
        weight = original.get_submodule(name).weight
    torch.testing.assert_close(merged.get_submodule(name).weight, weight + delta, rtol=0, atol=1e-6)
    norm = "model.layers.1.post_attention_layernorm"  # not quantized: as loaded for training (bf16), or original
    expected = (as_trained if base == "dequantized" else original).get_submodule(norm).weight.float()
    assert torch.equal(merged.get_submodule(norm).weight, expected)


def test_sixteen_bit_merges_are_verified_and_report_their_cost(tmp_path, lora_run):
    for dtype in ["bf16", "fp16"]:
        info = merge_run(lora_run, tmp_path / dtype, dtype=dtype)
        assert info["dtype"] == {"bf16": "bfloat16", "fp16": "float16"}[dtype]
        assert json.loads((tmp_path / dtype / "config.json").read_text())["dtype"] == info["dtype"]
        assert info["vs_adapter_on_same_base"]["top1_agreement"] >= 0.95


def test_a_sixteen_bit_check_computes_in_fp32_where_the_cpu_is_slow_at_it_and_restores_every_bit(
        monkeypatch, tiny_llama_dir):
    """On a CPU without fast 16-bit kernels the check upcasts the stored 16-bit weights (exact) and puts
    them back bit for bit; fp32 adapters are untouched; without host room for the copy it stays in 16 bits."""
    from transformers import AutoModelForCausalLM

    import qadapt.devices
    from qadapt.export.merge import check_dtype, computed_in
    from qadapt.quant import auto_compute_dtype

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float16)
    model.model.norm.extra = torch.nn.Parameter(torch.ones(3))  # an fp32 tensor, as an adapter's is
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with computed_in(model, torch.float32):
        assert model.dtype == torch.float32 and model.lm_head.weight.dtype == torch.float32
        assert torch.equal(model.lm_head.weight.to(torch.float16), before["lm_head.weight"])
    after = model.state_dict()
    assert all(after[name].dtype == t.dtype and torch.equal(after[name], t) for name, t in before.items())

    for fast in (torch.float32, auto_compute_dtype()):
        assert check_dtype(fast, 10) == fast
    assert check_dtype(torch.float16, 10) == torch.float32  # a CPU's `auto` is fp32 or bf16, never fp16
    monkeypatch.setattr(qadapt.devices, "free_memory", lambda device: 30.0)
    assert check_dtype(torch.float16, 10) == torch.float16  # 40 bytes of fp32 do not fit in 30


def test_a_merged_head_is_untied_from_the_embeddings(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    run = run_with_visible_adapter(tmp_path, tiny_llama_dir, "lora", "none", targets=["q_proj", "lm_head"])
    info = merge_run(run, tmp_path / "merged", dtype="fp32")
    assert info["vs_adapter_on_same_base"]["top1_agreement"] == 1.0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert merged.config.tie_word_embeddings is False
    assert not torch.equal(merged.lm_head.weight, merged.model.embed_tokens.weight)
    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    assert torch.equal(merged.model.embed_tokens.weight, original.model.embed_tokens.weight)


def test_bottleneck_adapters_refuse_to_merge(tmp_path, tiny_llama_dir):
    run = run_with_visible_adapter(tmp_path, tiny_llama_dir, "series", "nf4")
    with pytest.raises(QadaptError, match="cannot merge a series adapter: it applies a non-linear function"):
        merge_run(run, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_broken_adapter_weights_write_nothing(tmp_path, tiny_llama_dir):
    run = run_with_visible_adapter(tmp_path, tiny_llama_dir, "lora", "nf4")
    weights_file = RunDir(run).adapter.weights_file
    weights = load_file(weights_file)
    name = next(k for k in weights if k.endswith("lora_b.weight"))
    weights[name][0, 0] = float("nan")
    save_file(weights, weights_file)
    with pytest.raises(QadaptError, match=r"the merged weight has NaN or inf values"):
        merge_run(run, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert not list(tmp_path.glob(".tmp-*"))

    weights[name][0, 0] = 1e6  # 8 · 1e6 · A: far beyond fp16's 65504
    save_file(weights, weights_file)
    with pytest.raises(QadaptError, match=r"exceeds the torch.float16 range; merge with --dtype bf16 or fp32"):
        merge_run(run, tmp_path / "merged", dtype="fp16")
    assert not (tmp_path / "merged").exists()


def test_merge_mistakes_are_clear(tmp_path, lora_run):
    with pytest.raises(QadaptError, match=f"{tmp_path} is not a run directory: it has no recipe.yaml"):
        merge_run(tmp_path, tmp_path / "merged")
    with pytest.raises(QadaptError, match="--base 'quantized' is not one of dequantized, original"):
        merge_run(lora_run, tmp_path / "merged", base="quantized")
    with pytest.raises(QadaptError, match="--dtype 'int4' is not one of auto, bf16, fp16, fp32"):
        merge_run(lora_run, tmp_path / "merged", dtype="int4")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("keep me")
    with pytest.raises(QadaptError, match="already exists; remove it or choose another --out"):
        merge_run(lora_run, tmp_path / "taken")
    assert (tmp_path / "taken" / "file").read_text() == "keep me"
