"""qadapt export (PEFT; GGUF's refusals) and import-peft, checked with the real peft package and transformers.
The GGUF files themselves: tests/test_gguf.py."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_with_visible_adapter

from qadapt.errors import QadaptError
from qadapt.export.gguf_export import export_gguf
from qadapt.export.merge import compare_logits, logits_on, probe_texts
from qadapt.export.peft_format import export_peft, import_peft
from qadapt.inference.loader import load_trained_model

peft = pytest.importorskip("peft")


def peft_on_base(run, peft_dir):
    """PEFT's model: the base loaded by transformers from the adapter's own base_model_name_or_path."""
    from qadapt.models import load_base
    from qadapt.quant import disable_cpu_weight_repacking, set_compute_dtype
    from qadapt.recipe import load_recipe

    model_cfg = load_recipe(run / "recipe.yaml").model
    model_cfg.name = json.loads((peft_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    if model_cfg.quant == "none":
        model_cfg.compute_dtype = "fp32"  # nothing quantized: load straight in fp32, as qadapt does
    base = load_base(model_cfg)  # else quantized from the dtype it was trained in, as qadapt does
    disable_cpu_weight_repacking(base)
    set_compute_dtype(base, torch.float32)
    return peft.PeftModel.from_pretrained(base, peft_dir).eval()


@pytest.mark.parametrize("kind, quant, family", [
    ("lora", "nf4", "llama"), ("dora", "nf4", "llama"), ("lora", "int8", "llama"), ("lora", "none", "gpt2"),
])
def test_peft_export_loads_in_peft_with_the_same_logits(tmp_path, tiny_llama_dir, tiny_gpt2_dir, kind, quant, family):
    run = run_with_visible_adapter(tmp_path, tiny_llama_dir if family == "llama" else tiny_gpt2_dir, kind, quant)
    export_peft(run, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["use_dora"] == (kind == "dora") and config["fan_in_fan_out"] == (family == "gpt2")

    ours, tokenizer, recipe = load_trained_model(run, compute_dtype="fp32")
    texts = probe_texts(recipe.data.template, tokenizer, count=3)
    check = compare_logits(logits_on(ours, tokenizer, texts), logits_on(peft_on_base(run, tmp_path / "peft"),
                                                                         tokenizer, texts))
    assert check["top1_agreement"] == 1.0
    # PEFT's DoRA takes the norm of a de-quantized weight it rounds to the load dtype (bf16).
    assert check["max_abs_diff"] < (2e-2 if kind == "dora" else 1e-4), check


@pytest.mark.parametrize("use_dora", [False, True])
def test_a_peft_adapter_imports_into_a_run_directory(tmp_path, tiny_llama_dir, use_dora):
    """An adapter made and saved by peft itself becomes a run that qadapt loads with the same logits."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                             use_dora=use_dora, init_lora_weights=False)  # random B: not the identity
    peft_model = peft.get_peft_model(base, config).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    import_peft(tmp_path / "peft", tmp_path / "run", base=str(tiny_llama_dir), quant="none")

    ours, tokenizer, recipe = load_trained_model(tmp_path / "run", compute_dtype="fp32")
    assert recipe.adapter.kind == ("dora" if use_dora else "lora")
    assert recipe.adapter.targets == ["down_proj", "q_proj", "v_proj"]
    texts = probe_texts("alpaca", tokenizer, count=3)
    check = compare_logits(logits_on(peft_model, tokenizer, texts), logits_on(ours, tokenizer, texts))
    assert check["max_abs_diff"] < 1e-4, check


def test_peft_import_refuses_what_it_cannot_carry(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    peft.get_peft_model(base, config).save_pretrained(tmp_path / "peft")
    with pytest.raises(QadaptError, match=r"modules_to_save=\['lm_head'\] is not supported by qadapt"):
        import_peft(tmp_path / "peft", tmp_path / "run")
    with pytest.raises(QadaptError, match="not a PEFT adapter folder: .*adapter_config.json not found"):
        import_peft(tmp_path, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_exports_refuse_what_they_cannot_write(tmp_path, tiny_llama_dir, tiny_gpt2_dir):
    series = run_with_visible_adapter(tmp_path, tiny_llama_dir, "series", "nf4")
    with pytest.raises(QadaptError, match="cannot export to PEFT .* a series adapter"):
        export_peft(series, tmp_path / "peft")
    gpt2 = run_with_visible_adapter(tmp_path, tiny_gpt2_dir, "lora", "nf4")
    with pytest.raises(QadaptError, match="GGUF export supports llama, mistral, .*, bloom models, not gpt2"):
        export_gguf(gpt2, tmp_path / "model.gguf")
    with pytest.raises(QadaptError, match="--type 'q4_k' is not one of f16, bf16, q8_0, .*q4_k_m"):
        export_gguf(gpt2, tmp_path / "model.gguf", "q4_k")


def test_exports_never_overwrite(tmp_path, lora_run):
    (tmp_path / "taken.gguf").write_text("keep me")
    with pytest.raises(QadaptError, match="taken.gguf already exists; remove it or choose another --out"):
        export_gguf(lora_run, tmp_path / "taken.gguf")
    assert (tmp_path / "taken.gguf").read_text() == "keep me"
    with pytest.raises(QadaptError, match="already exists"):
        export_peft(lora_run, lora_run)  # the lora_run directory itself
