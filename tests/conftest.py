"""Shared fixtures: tiny random models built from a config, loaded through qadapt's real loader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# CI has two cores and the suite runs on two workers (pytest-xdist, pyproject.toml): one thread each, and
# the same count in every process a test starts. A fixed count keeps results comparable between machines.
THREADS = 2 // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) or 1
torch.set_num_threads(THREADS)
os.environ["OMP_NUM_THREADS"] = str(THREADS)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def qadapt(*args: str, timeout: int = 600, stdin: str | None = None,
           offline: bool = False) -> subprocess.CompletedProcess:
    """`qadapt ARGS` in a subprocess from the repository root, on THREADS threads (offline: no hub)."""
    env = {**os.environ, **({"HF_HUB_OFFLINE": "1"} if offline else {})}
    return subprocess.run([sys.executable, "-m", "qadapt", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env, input=stdin)


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The embedded model's real tokenizer (converts the GGUF once into the qadapt cache)."""
    from qadapt.models import load_tokenizer
    from qadapt.recipe import ModelConfig

    return load_tokenizer(ModelConfig())


def build_tiny_llama(folder: Path, tokenizer) -> Path:
    """A 2-layer LLaMA with random weights (fixed seed) and `tokenizer`, saved as a model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smol_tokenizer) -> Path:
    """A 2-layer LLaMA with random weights (fixed seed) and the SmolLM2 tokenizer, as a model folder."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smol_tokenizer)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, smol_tokenizer) -> Path:
    """A 2-layer GPT-2 (Conv1D layers: weights stored transposed) with the SmolLM2 tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(smol_tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=256,
                        bos_token_id=smol_tokenizer.bos_token_id, eos_token_id=smol_tokenizer.eos_token_id)
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(config).save_pretrained(folder)
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


# The smallest real run: a few examples, one step, nothing saved or scored on the way.
TINY_RUN = {
    "model": {"quant": "nf4"},
    "adapter": {"rank": 4},
    "data": {"max_examples": 8, "val_size": 0},
    # No warm-up: its first step has the rate 0, and a one-step run must move the adapter.
    "train": {"max_steps": 1, "micro_batch_size": 2, "grad_accum": 1, "warmup_steps": 0, "eval_every": 0,
              "save_every": 0},
}


def tiny_recipe(model_dir: Path | str, output_dir: Path | None = None, **sections) -> dict:
    """A recipe for a tiny real run on `model_dir`: TINY_RUN, each section updated by its keyword
    (`train={"max_steps": 3}` changes that key only); other keywords (task, eval) are set as given."""
    recipe = {section: dict(values) for section, values in TINY_RUN.items()}
    recipe["model"]["name"] = str(model_dir)
    for key, value in sections.items():
        recipe[key] = {**recipe[key], **value} if key in TINY_RUN else value
    if output_dir is not None:
        recipe["output_dir"] = str(output_dir)
    return recipe


def write_tiny_recipe(path: Path, model_dir: Path | str, output_dir: Path | None = None, **sections) -> Path:
    """tiny_recipe() as a YAML file, for runs started in a subprocess."""
    import yaml

    path.write_text(yaml.safe_dump(tiny_recipe(model_dir, output_dir, **sections)))
    return path


def write_pairs_file(folder: Path, count: int = 12) -> Path:
    """`count` preference pairs of sums ({prompt, chosen, rejected}, JSONL): the chosen answer works it out."""
    path = folder / "pairs.jsonl"
    rows = [{"prompt": f"What is {n} plus {n + 3}?", "chosen": f"{n} + {n + 3} = {2 * n + 3}. The answer is {2 * n + 3}.",
             "rejected": f"The answer is {2 * n + 4}."} for n in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def train_tiny_run(output_dir: Path, model_dir: Path | str, **sections) -> Path:
    """Train tiny_recipe() in this process (qadapt.training.train, the real quantized path); return the run folder."""
    from qadapt.recipe import recipe_from_dict
    from qadapt.training.train import train

    train(recipe_from_dict(tiny_recipe(model_dir, output_dir, **sections)))
    return output_dir


def run_with_visible_adapter(folder: Path, model_dir: Path, kind: str = "lora", quant: str = "nf4",
                             compute_dtype: str = "bf16", targets: list[str] | None = None,
                             scale: float = 0.05) -> Path:
    """A real run (one training step), then adapter weights big enough that merging visibly matters."""
    from safetensors.torch import load_file, save_file

    from qadapt.run_dir import RunDir

    adapter = {"kind": kind, "rank": 4, "bottleneck_size": 16}
    if targets:
        adapter["targets"] = targets
    run = train_tiny_run(folder / f"{kind}-{quant}", model_dir, model={"quant": quant, "compute_dtype": compute_dtype},
                         adapter=adapter)
    weights_file = RunDir(run).adapter.weights_file
    generator = torch.Generator().manual_seed(1)
    weights = {name: value + scale * torch.randn(value.shape, generator=generator)
               for name, value in load_file(weights_file).items()}
    save_file(weights, weights_file)
    return run


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, tiny_llama_dir) -> Path:
    """run_with_visible_adapter on the tiny LLaMA (LoRA, NF4), trained once for the tests that only read it
    (merge, export): do not change it."""
    return run_with_visible_adapter(tmp_path_factory.mktemp("lora-run"), tiny_llama_dir, "lora", "nf4")


def token_batch(seed: int = 0, batch: int = 2, length: int = 12, vocab: int = 1000) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(10, vocab, (batch, length), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


TINY_VOCAB = 256


def _tiny_config(family: str):
    """A 2-layer, 64-wide random model config of `family` (config.model_type)."""
    import transformers as t

    llama_like = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    small_ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # inside the tiny vocabulary
    configs = {
        "llama": lambda: t.LlamaConfig(**llama_like),
        "mistral": lambda: t.MistralConfig(**llama_like),
        "qwen2": lambda: t.Qwen2Config(**llama_like),
        "qwen3": lambda: t.Qwen3Config(**llama_like, head_dim=16),
        # Granite's logits are divided and Gemma's capped before the loss: set both, to test that path.
        "gemma3_text": lambda: t.Gemma3TextConfig(**llama_like, **small_ids, head_dim=16, sliding_window=8,
                                                  query_pre_attn_scalar=16, final_logit_softcapping=0.3),
        "gemma4_text": lambda: t.Gemma4TextConfig(**llama_like, **small_ids, head_dim=16, sliding_window=8,
                                                  hidden_size_per_layer_input=16, vocab_size_per_layer_input=TINY_VOCAB),
        "lfm2": lambda: t.Lfm2Config(**llama_like, **small_ids, layer_types=["conv", "full_attention"]),
        "smollm3": lambda: t.SmolLM3Config(**llama_like, **small_ids),
        "granite": lambda: t.GraniteConfig(**llama_like, **small_ids, logits_scaling=4.0),
        "olmo2": lambda: t.Olmo2Config(**llama_like, **small_ids),
        "phi3": lambda: t.Phi3Config(**llama_like, **small_ids),
        # One linear-attention (gated delta net) and one full-attention layer.
        "qwen3_5_text": lambda: t.Qwen3_5TextConfig(**llama_like, **small_ids, head_dim=16, linear_num_value_heads=4,
                                                    linear_num_key_heads=2, linear_key_head_dim=16,
                                                    linear_value_head_dim=16,
                                                    layer_types=["linear_attention", "full_attention"]),
        "qwen3_moe": lambda: t.Qwen3MoeConfig(**llama_like, **small_ids, head_dim=16, moe_intermediate_size=32,
                                              num_experts=4, num_experts_per_tok=2),
        "gpt_oss": lambda: t.GptOssConfig(**llama_like, **small_ids, head_dim=16, num_local_experts=4,
                                          num_experts_per_tok=2, rope_parameters={"rope_type": "default",
                                                                                  "rope_theta": 150000.0}),
        "bloom": lambda: t.BloomConfig(vocab_size=TINY_VOCAB, hidden_size=64, n_layer=2, n_head=4),
        "gptj": lambda: t.GPTJConfig(vocab_size=TINY_VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                                     n_positions=128, bos_token_id=0, eos_token_id=0),
        "gpt_neox": lambda: t.GPTNeoXConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            max_position_embeddings=128),
        "opt": lambda: t.OPTConfig(vocab_size=TINY_VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                   num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=128),
        "gpt2": lambda: t.GPT2Config(vocab_size=TINY_VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                     bos_token_id=0, eos_token_id=0),
    }
    return configs[family]()


def _model_folders(tmp_path_factory, build):
    """folder_for(family): a folder holding `build(family)` saved (built once per family, seed 0)."""
    folders: dict[str, Path] = {}

    def folder_for(family: str) -> Path:
        if family not in folders:
            torch.manual_seed(0)
            folder = tmp_path_factory.mktemp(f"tiny-{family}")
            build(family).save_pretrained(folder)
            folders[family] = folder
        return folders[family]

    return folder_for


@pytest.fixture(scope="session")
def tiny_family_dir(tmp_path_factory):
    """tiny_family_dir(family) -> a folder with a tiny random decoder of that family (made once, seed 0)."""
    from transformers import AutoModelForCausalLM

    return _model_folders(tmp_path_factory, lambda family: AutoModelForCausalLM.from_config(_tiny_config(family)))


@pytest.fixture(scope="session")
def tokenized_family_dir(tmp_path_factory, smol_tokenizer):
    """tokenized_family_dir(family) -> a folder with a tiny random decoder of that family, its vocabulary
    the SmolLM2 tokenizer's (saved beside it): a model that reads text, for exports (made once, seed 0)."""
    from transformers import AutoModelForCausalLM

    def build(family: str):
        config = _tiny_config(family)
        config.vocab_size = len(smol_tokenizer)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(config, name, getattr(smol_tokenizer, name))
        return AutoModelForCausalLM.from_config(config)

    folder_for = _model_folders(tmp_path_factory, build)

    def folder_with_tokenizer(family: str) -> Path:
        folder = folder_for(family)
        smol_tokenizer.save_pretrained(folder)
        return folder

    return folder_with_tokenizer


@pytest.fixture
def load_family(tiny_family_dir, tiny_encoder_dir):
    """load_family(family, quant): a tiny random model of that family, frozen and quantized by qadapt
    (a decoder with its LM head, or an encoder with a token-classification head for TINY_TAGS)."""
    from qadapt.models import load_base
    from qadapt.quant import prepare_for_kbit_training
    from qadapt.recipe import ModelConfig

    def load(family: str, quant: str):
        if family in ENCODER_FAMILIES:  # a token classifier with a new 3-label head
            model = load_base(ModelConfig(name=str(tiny_encoder_dir(family)), quant=quant, compute_dtype="fp32"),
                              labels=list(TINY_TAGS))
        else:
            model = load_base(ModelConfig(name=str(tiny_family_dir(family)), quant=quant, compute_dtype="fp32"))
        # transformers' MPNet cannot checkpoint; prepare_for_kbit_training says so (tested in test_token_...).
        prepare_for_kbit_training(model, gradient_checkpointing=model.supports_gradient_checkpointing)
        return model

    return load


def _tiny_encoder_config(family: str, vocab_size: int = TINY_VOCAB):
    """A 2-layer, 64-wide random encoder config of `family` (config.model_type)."""
    import transformers as t

    bert_like = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=128)
    configs = {
        "bert": lambda: t.BertConfig(**bert_like),
        "roberta": lambda: t.RobertaConfig(**bert_like, pad_token_id=1),
        "electra": lambda: t.ElectraConfig(**bert_like, embedding_size=64),
        "mpnet": lambda: t.MPNetConfig(**bert_like),
        "deberta-v2": lambda: t.DebertaV2Config(**bert_like),
        "distilbert": lambda: t.DistilBertConfig(vocab_size=vocab_size, dim=64, hidden_dim=128, n_layers=2,
                                                 n_heads=2, max_position_embeddings=128),
    }
    return configs[family]()


ENCODER_FAMILIES = ("bert", "roberta", "electra", "mpnet", "deberta-v2", "distilbert")
TINY_TAGS = ("O", "B-X", "I-X")


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory):
    """tiny_encoder_dir(family) -> a folder with a tiny random encoder of that family (made once, seed 0)."""
    from transformers import AutoModel

    return _model_folders(tmp_path_factory, lambda family: AutoModel.from_config(_tiny_encoder_config(family)))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer random BERT with the embedded MiniLM's (uncased WordPiece) tokenizer, as a model folder."""
    from transformers import AutoModel

    from qadapt.models import load_tokenizer
    from qadapt.recipe import ModelConfig

    tokenizer = load_tokenizer(ModelConfig(name="all-minilm-l6-v2"), generates=False)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-bert")
    AutoModel.from_config(_tiny_encoder_config("bert", len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class CudaStandIn:
    """What qadapt asks of torch.cuda, answered as one GPU would (monkeypatched), with what it was asked
    recorded. `from_pretrained` keyword arguments are captured and the model is built on the CPU, so that
    whatever qadapt decides for a GPU runs here: `loads` holds each load's keyword arguments."""

    def __init__(self, monkeypatch, capability=(8, 6), free_bytes=20 * 2**30, total_bytes=24 * 2**30):
        self.capability, self.free_bytes, self.total_bytes = capability, free_bytes, total_bytes
        self.loads: list[dict] = []
        self.peak_resets: list = []
        self.allocated_peak, self.reserved_peak = 3 * 2**30, 4 * 2**30
        from qadapt.quant import _bitsandbytes

        _bitsandbytes()  # imported for this CPU first: with a GPU in sight it would load its CUDA kernels
        cuda = torch.cuda
        answers = {
            "is_available": lambda: True,
            "device_count": lambda: 1,
            "current_device": lambda: 0,
            "get_device_capability": lambda device=None: self.capability,
            "is_bf16_supported": lambda including_emulation=True: True,  # as torch answers on a T4 too
            "get_device_name": lambda device=None: "CUDA stand-in",
            "mem_get_info": lambda device=None: (self.free_bytes, self.total_bytes),
            "memory_reserved": lambda device=None: 0,
            "memory_allocated": lambda device=None: 0,
            "max_memory_allocated": lambda device=None: self.allocated_peak,
            "max_memory_reserved": lambda device=None: self.reserved_peak,
            "reset_peak_memory_stats": lambda device=None: self.peak_resets.append(device),
            "empty_cache": lambda: None,
        }
        for name, answer in answers.items():
            monkeypatch.setattr(cuda, name, answer)
        import qadapt.models

        real = qadapt.models._from_pretrained

        def from_pretrained(auto_class, path, cfg, **kwargs):
            if "dtype" in kwargs:  # a model (not its tokenizer or config)
                self.loads.append(kwargs)
            on_cpu = {**kwargs, "device_map": {"": "cpu"}} if "quantization_config" in kwargs else \
                {k: v for k, v in kwargs.items() if k != "device_map"}
            return real(auto_class, path, cfg, **on_cpu)

        monkeypatch.setattr(qadapt.models, "_from_pretrained", from_pretrained)


@pytest.fixture
def cuda_stand_in(monkeypatch):
    """A CudaStandIn: qadapt sees one GPU (Ampere, 20 of 24 GiB free) that does not exist."""
    return CudaStandIn(monkeypatch)
