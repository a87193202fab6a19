"""Many adapters on one loaded base: switching gives each adapter's own outputs; LoRA rows mix in a batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA, train_tiny_run
from qadapt.inference.adapter_bank import AdapterBank
from qadapt.errors import QadaptError
from qadapt.inference.loader import load_trained_model

WNUT_TRAIN = SHARED_DATA / "wnut17" / "wnut17train.conll"
NUMBERS = "one\tB-NUM\nhundred\tI-NUM\ncats\tO\n\nseven\tB-NUM\ndogs\tO\nbark\tO\n\n"


def train_run(folder: Path, model_dir: Path, data: Path, seed: int, **adapter) -> Path:
    return train_tiny_run(folder, model_dir, task="token-classification", model={"compute_dtype": "fp32"},
                          adapter={"dropout": 0.0, **adapter},
                          data={"path": str(data), "max_examples": 32, "cutoff_len": 48},
                          train={"max_steps": 3, "micro_batch_size": 8, "lr": 5e-2, "warmup_steps": 0, "seed": seed})


@pytest.fixture(scope="module")
def numbers_file(tmp_path_factory) -> Path:
    """A CoNLL file written here: number words tagged B-NUM / I-NUM (3 labels), no shared data needed."""
    path = tmp_path_factory.mktemp("numbers") / "numbers.conll"
    path.write_text(NUMBERS * 8)
    return path


@pytest.fixture(scope="module")
def runs(tiny_bert_dir, numbers_file, tmp_path_factory) -> dict[str, Path]:
    """Three adapters trained on one tiny BERT: two LoRA on WNUT-17 (13 labels), a series one on 3 labels."""
    if not WNUT_TRAIN.is_file():
        pytest.skip(f"WNUT-17 not found at {WNUT_TRAIN}")
    root = tmp_path_factory.mktemp("bank")
    return {
        "lora-a": train_run(root / "lora-a", tiny_bert_dir, WNUT_TRAIN, seed=1, kind="lora", rank=4),
        "lora-b": train_run(root / "lora-b", tiny_bert_dir, WNUT_TRAIN, seed=2, kind="lora", rank=8),
        "series": train_run(root / "series", tiny_bert_dir, numbers_file, seed=3, kind="series", bottleneck_size=8),
    }


@pytest.fixture(scope="module")
def numbers_lora(tiny_bert_dir, numbers_file, tmp_path_factory) -> Path:
    """A LoRA tagging run on the numbers file: for the tests that need a run but no shared data."""
    return train_run(tmp_path_factory.mktemp("bank") / "numbers-lora", tiny_bert_dir, numbers_file, seed=1,
                     kind="lora", rank=4)


def batch(tokenizer) -> dict:
    words = [["Obama", "visits", "Paris"], ["seven", "dogs", "bark", "loudly"], ["a", "b"], ["Apple", "Inc", "."]]
    encoded = tokenizer(words, is_split_into_words=True, padding=True, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


@torch.no_grad()
def logits(model, inputs: dict) -> torch.Tensor:
    return model(**inputs).logits


def test_switching_adapters_on_one_base_gives_each_its_own_outputs(runs):
    references = {}
    for name, run in runs.items():  # each adapter on a base of its own: what the bank must reproduce
        model, tokenizer, _ = load_trained_model(run)
        references[name] = logits(model, batch(tokenizer))
    assert references["series"].shape[-1] == 3 and references["lora-a"].shape[-1] == 13
    assert not torch.allclose(references["lora-a"], references["lora-b"], atol=1e-3)

    bank = AdapterBank.from_runs(list(runs.values()))
    inputs = batch(tokenizer)
    frozen = bank.model.get_input_embeddings().weight
    quantized = [m.weight for m in bank.model.modules() if type(m).__name__ == "Linear4bit"]
    for name in ["lora-a", "series", "lora-b", "lora-a", "lora-b", "series"]:
        bank.activate(name)
        assert bank.active == name
        torch.testing.assert_close(logits(bank.model, inputs), references[name], rtol=1e-5, atol=1e-5)
        assert bank.model.config.num_labels == references[name].shape[-1]
    # The base was never reloaded: the same embedding and 4-bit weight objects throughout.
    assert bank.model.get_input_embeddings().weight is frozen
    assert [m.weight for m in bank.model.modules() if type(m).__name__ == "Linear4bit"] == quantized
    for loaded in bank.adapters.values():
        assert loaded.file_bytes > 0 and loaded.load_s < bank.base_load_s


def test_a_mixed_batch_runs_each_row_through_its_own_lora(runs, tiny_bert_dir):
    bank = AdapterBank.from_runs([runs["lora-a"], runs["lora-b"], runs["series"]])
    _, tokenizer, _ = load_trained_model(runs["lora-a"])
    inputs = batch(tokenizer)
    own = {}
    for name in ("lora-a", "lora-b"):
        bank.activate(name)
        own[name] = logits(bank.model, inputs)
    rows = ["lora-b", "lora-a", "lora-a", "lora-b"]
    with bank.mixed(rows) as model:
        mixed = logits(model, inputs)
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], own[name][i], rtol=1e-5, atol=1e-5)
    bank.activate("lora-a")  # the mixed modules are gone again
    torch.testing.assert_close(logits(bank.model, inputs), own["lora-a"])
    with pytest.raises(QadaptError, match="LoRA adapters only"):
        with bank.mixed(["lora-a", "series"]):
            pass
    with pytest.raises(QadaptError, match="no adapter named 'nope'"):
        bank.activate("nope")


def test_an_adapter_of_another_base_is_refused(numbers_lora, tiny_encoder_dir):
    from qadapt.base_identity import base_identity
    from qadapt.models import load_base
    from qadapt.recipe import ModelConfig

    other = load_base(ModelConfig(name=str(tiny_encoder_dir("bert")), compute_dtype="fp32"), labels=["O"])
    bank = AdapterBank(other, base_identity(other, "tiny-bert-256"))
    with pytest.raises(QadaptError, match="was trained on"):
        bank.load("numbers", numbers_lora / "adapter")


def test_tagging_runs_are_not_merged_or_used_for_generation(numbers_lora):
    from qadapt.inference.loader import load_target
    from qadapt.export.merge import merge_run

    with pytest.raises(QadaptError, match="cannot merge a token-classification run"):
        merge_run(numbers_lora, numbers_lora.parent / "merged")
    with pytest.raises(QadaptError, match="tags words and does not answer prompts"):
        load_target(str(numbers_lora))
