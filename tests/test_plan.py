"""qadapt plan: memory predicted from a config alone; weights counted exactly; advice when it won't fit."""

from __future__ import annotations

import json

import pytest

from qadapt.training.plan import GIB, advice, format_plan, plan_memory
from qadapt.recipe import load_recipe, recipe_from_dict

LLAMA2_7B = {  # the published LLaMA-2-7B config
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
    "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}


@pytest.fixture
def llama2_7b_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_7B))
    return str(tmp_path)


@pytest.mark.parametrize("quant", ["nf4", "int8", "none"])
def test_base_weights_match_the_loaded_model(tiny_llama_dir, load_tiny, quant):
    recipe = recipe_from_dict({"model": {"name": str(tiny_llama_dir), "quant": quant, "compute_dtype": "fp32"}})
    planned = plan_memory(recipe).parts["base weights"]
    model = load_tiny(quant)
    real = 0
    for param in model.parameters():
        real += param.numel() * param.element_size()
        state = getattr(param, "quant_state", None)  # 4-bit block scales live beside the packed weight
        if state is not None:
            real += state.absmax.numel() * state.absmax.element_size()
            if state.state2 is not None:
                real += state.state2.absmax.numel() * state.state2.absmax.element_size()
        if getattr(param, "SCB", None) is not None:
            real += param.SCB.numel() * param.SCB.element_size()
    assert planned == pytest.approx(real, rel=0.03)


def test_the_7b_qlora_recipe_fits_24_gb_and_a_careless_one_does_not(llama2_7b_config):
    recipe = load_recipe("recipes/llama2-7b-qlora-24gb.yaml", [f"model.name={llama2_7b_config}"])
    plan = plan_memory(recipe, gpu_memory_gib=24)
    assert 3.4 * GIB < plan.parts["base weights"] < 4.0 * GIB  # 6.5B linear weights at ~4.1 bits + embeddings
    assert plan.fits and plan.needed < 12 * GIB
    careless = load_recipe("recipes/llama2-7b-qlora-24gb.yaml", [
        f"model.name={llama2_7b_config}", "train.gradient_checkpointing=false", "train.micro_batch_size=8",
        "data.cutoff_len=2048", "train.optimizer=adamw"])
    plan = plan_memory(careless, gpu_memory_gib=24)
    assert not plan.fits
    tips = advice(plan, careless)
    assert tips[0].startswith("train.gradient_checkpointing=true") and "paged_adamw_8bit" in " ".join(tips)
    assert "does NOT fit" in format_plan(plan, careless)


def test_checkpointing_and_batch_move_the_activations(llama2_7b_config):
    def activations(*overrides):
        recipe = load_recipe("recipes/llama2-7b-qlora-24gb.yaml", [f"model.name={llama2_7b_config}", *overrides])
        return plan_memory(recipe).parts["activations"]

    with_checkpointing = activations()
    assert activations("train.gradient_checkpointing=false") > 10 * with_checkpointing
    assert activations("train.micro_batch_size=8") == pytest.approx(2 * with_checkpointing, rel=0.01)


LLAMA2_70B = {**LLAMA2_7B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64, "num_key_value_heads": 8}  # the published LLaMA-2-70B config


def test_fsdp_splits_the_70b_base_over_gpus(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_70B))
    recipe = load_recipe("recipes/llama2-70b-fsdp-qlora.yaml", [f"model.name={tmp_path}"])
    alone, two, four = (plan_memory(recipe, 24, fsdp_gpus=n) for n in (1, 2, 4))
    assert 33 * GIB < alone.parts["base weights"] < 35 * GIB and not alone.fits
    assert two.parts["base weights"] == pytest.approx(alone.parts["base weights"] / 2)
    assert two.parts["optimizer state"] == pytest.approx(alone.parts["optimizer state"] / 2)
    assert two.parts["activations"] == alone.parts["activations"]  # each GPU runs its own micro-batch
    assert 0.5 * GIB < two.parts["layers gathered by FSDP"] < 1.0 * GIB  # two NF4 decoder layers
    assert two.fits and four.needed < two.needed


def test_auto_checkpointing_is_off_when_the_run_fits_without_it_and_on_when_it_would_not(llama2_7b_config):
    import torch

    from qadapt.training.plan import choose_gradient_checkpointing

    def choice(batch: int, length: int, setting="auto") -> tuple[bool, str]:
        recipe = recipe_from_dict({"model": {"name": llama2_7b_config, "compute_dtype": "fp32"},
                                   "data": {"cutoff_len": length},
                                   "train": {"micro_batch_size": batch, "gradient_checkpointing": setting}})
        return choose_gradient_checkpointing(recipe, torch.device("cpu"))

    small, why = choice(1, 16)
    assert small is False and why.startswith("auto: without it the plan needs")
    assert choice(64, 4096)[0] is True  # terabytes of activations without checkpointing
    assert choice(1, 16, True) == (True, "as the recipe says")


def test_checkpointing_takes_true_false_or_auto():
    from qadapt.errors import QadaptError

    assert recipe_from_dict({"train": {"gradient_checkpointing": "auto"}}).train.gradient_checkpointing == "auto"
    with pytest.raises(QadaptError, match="train.gradient_checkpointing"):
        recipe_from_dict({"train": {"gradient_checkpointing": "sometimes"}})
