"""Shared fixtures: tiny random models built from a config, loaded through qadapt's real loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)  # CI has two cores; a fixed count keeps timings and results comparable

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The embedded model's real tokenizer (converts the GGUF once into the qadapt cache)."""
    from qadapt.models import load_tokenizer
    from qadapt.recipe import ModelConfig

    return load_tokenizer(ModelConfig())


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smol_tokenizer) -> Path:
    """A 2-layer LLaMA with random weights (fixed seed) and the SmolLM2 tokenizer, as a model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=smol_tokenizer.bos_token_id, eos_token_id=smol_tokenizer.eos_token_id,
        pad_token_id=smol_tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def load_tiny(tiny_llama_dir):
    """load_tiny(quant, compute_dtype="fp32"): the tiny LLaMA, frozen and quantized by qadapt."""
    from qadapt.models import load_base
    from qadapt.quant import prepare_for_kbit_training
    from qadapt.recipe import ModelConfig

    def load(quant: str, compute_dtype: str = "fp32", gradient_checkpointing: bool = True):
        model = load_base(ModelConfig(name=str(tiny_llama_dir), quant=quant, compute_dtype=compute_dtype))
        prepare_for_kbit_training(model, gradient_checkpointing)
        return model

    return load


def token_batch(seed: int = 0, batch: int = 2, length: int = 12, vocab: int = 1000) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(10, vocab, (batch, length), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}
