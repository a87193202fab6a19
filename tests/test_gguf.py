"""GGUF export (qadapt.export.gguf_export, gguf_families, llamacpp): each family written as llama.cpp lays it
out, run in llama.cpp itself beside transformers, and read back by transformers where it can."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
from conftest import run_with_visible_adapter

from qadapt.errors import QadaptError
from qadapt.export import llamacpp
from qadapt.export.gguf_export import export_gguf, read_back_in_transformers, tokenizer_pre, write_gguf
from qadapt.export.gguf_families import FAMILIES, gguf_family
from qadapt.export.gguf_lora import export_gguf_lora
from qadapt.export.merge import merge_run
from qadapt.run_dir import RunDir

needs_llamacpp = pytest.mark.skipif(not llamacpp.installed(), reason="needs llama-cpp-python (the llamacpp extra)")


def write_family(folder, out, gguf_type="f16"):
    config = json.loads((folder / "config.json").read_text())
    family = gguf_family(config)
    write_gguf(folder, out, gguf_type, tokenizer_pre(str(folder), folder, family), name="tiny")
    return family


@needs_llamacpp
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_each_family_runs_in_llamacpp_as_in_transformers(tmp_path, tokenized_family_dir, model_type):
    """A tiny random model of each family, written in f16: llama.cpp tokenizes the check prompts alike, its
    next-token logits agree with transformers' at every position, and its greedy continuations match."""
    folder = tokenized_family_dir(model_type)
    write_family(folder, tmp_path / "model.gguf")
    cpp = llamacpp.summary(llamacpp.run_side_by_side(folder, tmp_path / "model.gguf", _texts(folder, 6), tokens=16))
    assert cpp["same_tokenization"] == cpp["texts"] == 6, cpp
    assert cpp["top1_agreement"] >= 0.99 and cpp["mean_abs_diff"] < 0.01, cpp
    assert cpp["same_greedy_replies"] >= 5, cpp  # a random model's near-ties may part one in f16


@pytest.mark.parametrize("model_type", ["phi3"])  # fused qkv and gate-up: the layout transformers un-fuses
def test_transformers_reads_a_family_gguf_back(tmp_path, tokenized_family_dir, model_type):
    """The check used without llama.cpp, on families beyond LLaMA (slow: transformers converts the vocabulary)."""
    folder = tokenized_family_dir(model_type)
    write_family(folder, tmp_path / "model.gguf")
    check = read_back_in_transformers(folder, tmp_path / "model.gguf", _texts(folder, 2))
    assert check["top1_agreement"] >= 0.99, check


@needs_llamacpp
@pytest.mark.parametrize("model_type, layout", [
    ("llama", {"rotary_pairs": False}), ("gemma3_text", {"norm_shift": 0.0}), ("bloom", {"qkv_by_head": False}),
])
def test_each_layout_rule_is_needed(tmp_path, tokenized_family_dir, smol_tokenizer, monkeypatch, model_type, layout):
    """Fault injection: without the family's layout rule, llama.cpp computes another model. (Attention is
    scaled up first: a random model's is nearly uniform and small, whatever order its rows are in.)"""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tokenized_family_dir(model_type))
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "query_key_value.weight", "o_proj.weight",
                              "attention.dense.weight")):
                weight.mul_(8)
    folder = tmp_path / "sharp"
    model.save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    agreement = {}
    for rule in ("kept", "dropped"):
        if rule == "dropped":
            monkeypatch.setitem(FAMILIES, model_type, dataclasses.replace(FAMILIES[model_type], **layout))
        write_family(folder, tmp_path / f"{rule}.gguf")
        rows = llamacpp.run_side_by_side(folder, tmp_path / f"{rule}.gguf", _texts(folder), tokens=1)
        agreement[rule] = llamacpp.summary(rows)["top1_agreement"]
    assert agreement["kept"] >= 0.99 and agreement["dropped"] < 0.8, agreement


def _texts(folder, count=3):
    from transformers import AutoTokenizer

    from qadapt.export.merge import probe_texts

    return probe_texts("alpaca", AutoTokenizer.from_pretrained(folder), count=count)


@pytest.mark.parametrize("gguf_type", ["f16", "q4_0"])  # exact, and the quantized path with its q8_0 head
def test_a_run_exports_checked_where_it_runs(tmp_path, lora_run, gguf_type):
    import gguf

    checks = export_gguf(lora_run, tmp_path / "model.gguf", gguf_type)
    assert set(checks) == ({"llama.cpp"} if llamacpp.installed() else {"transformers"})
    assert not list(tmp_path.glob(".tmp-*"))
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    fields = {key: reader.get_field(key).contents() for key in
              ["general.architecture", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"]}
    assert fields["general.architecture"] == "llama"
    assert fields["tokenizer.ggml.eos_token_id"] == 2  # SmolLM2's <|im_end|>, what training appends
    assert "### Instruction:" in fields["tokenizer.chat_template"]  # the run's Alpaca prompt
    types = {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == gguf_type.upper()
    # The tied embedding is also the output head: 4-bit types keep it in q8_0, as llama.cpp keeps it higher.
    assert types["token_embd.weight"] == ("Q8_0" if gguf_type == "q4_0" else gguf_type.upper())


@needs_llamacpp
def test_k_quants_come_from_llamacpps_quantizer(tmp_path, smol_tokenizer):
    """q4_k_m of a model whose rows split into 256-wide K blocks: llama.cpp's mix of types, still the model."""
    import gguf
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    folder = tmp_path / "wide"
    config = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=256, intermediate_size=512,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         bos_token_id=smol_tokenizer.bos_token_id, eos_token_id=smol_tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    write_family(folder, tmp_path / "f16.gguf")
    llamacpp.quantize(tmp_path / "f16.gguf", tmp_path / "q4_k_m.gguf", "q4_k_m")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "q4_k_m.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_K" and "Q6_K" in types.values(), types
    rows = llamacpp.run_side_by_side(folder, tmp_path / "q4_k_m.gguf", _texts(folder), tokens=1)
    assert llamacpp.summary(rows)["top1_agreement"] > 0.5  # a random model's logits are close: no more


def test_a_wrong_layout_is_caught_and_nothing_written(tmp_path, lora_run, monkeypatch):
    """Fault injection through the whole export: the checks refuse the file."""
    monkeypatch.setitem(FAMILIES, "llama", dataclasses.replace(FAMILIES["llama"], rotary_pairs=False))
    with pytest.raises(QadaptError, match="the GGUF disagrees with the merged model"):
        export_gguf(lora_run, tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()


def test_k_quants_without_llamacpp_say_how_to_get_it(tmp_path, lora_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed
    with pytest.raises(QadaptError, match=r"--type q4_k_m needs llama.cpp: pip install 'qadapt\[llamacpp\]'"):
        export_gguf(lora_run, tmp_path / "model.gguf", "q4_k_m")
    assert not (tmp_path / "model.gguf").exists()


def test_what_llamacpp_would_compute_differently_is_refused_up_front(tokenized_family_dir):
    def config(model_type, **changes):
        return {**json.loads((tokenized_family_dir(model_type) / "config.json").read_text()), **changes}

    with pytest.raises(QadaptError, match="GGUF export supports llama, mistral, .* models, not gpt2"):
        gguf_family({"model_type": "gpt2"})
    with pytest.raises(QadaptError, match="query_pre_attn_scalar 256 is not what llama.cpp derives"):
        gguf_family(config("gemma3_text", query_pre_attn_scalar=256))
    with pytest.raises(QadaptError, match="no-rope layers are not every fourth layer"):
        gguf_family(config("smollm3", no_rope_layers=[0, 1]))
    with pytest.raises(QadaptError, match="rope scaling 'yarn' is not written by qadapt"):
        gguf_family(config("qwen3", rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}))


def test_the_pre_tokenizer_is_named_by_how_the_tokenizer_splits(tokenized_family_dir):
    """transformers loads the Qwen2 family's tokenizer with Qwen's own split: llama.cpp must use the same."""
    assert tokenizer_pre("x", tokenized_family_dir("qwen2"), FAMILIES["qwen2"]) == "qwen2"
    assert tokenizer_pre("x", tokenized_family_dir("llama"), FAMILIES["llama"]) == "gpt-2"
    assert tokenizer_pre("smollm2-135m", tokenized_family_dir("llama"), FAMILIES["llama"]) == "smollm"  # its GGUF's


@needs_llamacpp
@pytest.mark.parametrize("model_type", ["llama"])  # its B rows reordered for llama.cpp's rotary pairs
def test_a_lora_runs_in_llamacpp_on_the_base_it_was_trained_against(tmp_path, tokenized_family_dir, model_type):
    """--format gguf-lora: llama.cpp applying adapter.gguf to base.gguf computes the merged model; the base
    alone does not (the adapter matters), and the file is what llama.cpp's --lora reads."""
    import gguf

    # A random model's logits are nearly flat, so 16-bit rounding flips its top-1 often (floors: 98 % for the
    # fp16 merge, 99 % in llama.cpp), and any change of the training step moves it: at adapter scale 0.1 the
    # merge kept 99.2 %, then 97.5 % once dropout drew one mask per layer again. At 0.05: 99.0 % and 99.9 %,
    # the base alone still far off. Earlier: at 0.2, 97.9 % for the merge; at 1.0, f16 overflows.
    run = run_with_visible_adapter(tmp_path, tokenized_family_dir(model_type), "lora", "nf4", scale=0.05)
    check = export_gguf_lora(run, tmp_path / "lora")
    assert check["same_tokenization"] == 6 and check["top1_agreement"] >= 0.99, check
    adapter = gguf.GGUFReader(tmp_path / "lora" / "adapter.gguf")
    assert adapter.get_field("general.type").contents() == "adapter"
    alpha = RunDir(run).trained_recipe.adapter.alpha  # llama.cpp's scale alpha / rank is the run's (no rsLoRA)
    assert adapter.get_field("adapter.lora.alpha").contents() == pytest.approx(alpha)
    assert "blk.0.attn_q.weight.lora_a" in {t.name for t in adapter.tensors}
    merged = tmp_path / "merged"
    # In fp32: the merge here only gives the base-only comparison its texts and reference; an fp16 merge's own
    # top-1 check on these near-flat logits sits at its floor (97.2-99.2 %, moved by any change of the step).
    merge_run(run, merged, "fp32", show_written=False)
    base_only = llamacpp.summary(llamacpp.run_side_by_side(merged, tmp_path / "lora" / "base.gguf", _texts(merged), tokens=1))
    assert base_only["mean_abs_diff"] > 10 * check["mean_abs_diff"], (base_only, check)


def test_only_a_lora_exports_alone(tmp_path, tiny_llama_dir):
    run = run_with_visible_adapter(tmp_path, tiny_llama_dir, "dora", "nf4")
    with pytest.raises(QadaptError, match="llama.cpp's adapter files hold LoRA only, not dora"):
        export_gguf_lora(run, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()
