"""What qadapt decides for a GPU, checked without one: a stand-in answers for torch.cuda (conftest.CudaStandIn),
captures what loading is asked, and builds the model on the CPU so that what follows runs here."""

from __future__ import annotations

import pytest
import torch
from conftest import token_batch, tiny_recipe

from qadapt import lean_cpu
from qadapt.recipe import ModelConfig, recipe_from_dict


@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float16), ((7, 0), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_picks_fp16_on_gpus_that_only_emulate_bf16(cuda_stand_in, capability, expected):
    """A T4 (7.5) or V100 (7.0) answers is_bf16_supported() with True, by emulation; bf16 from Ampere (8.0)."""
    from qadapt.models import resolve_compute_dtype

    cuda_stand_in.capability = capability
    assert resolve_compute_dtype("auto") is expected
    assert resolve_compute_dtype("bf16") is torch.bfloat16  # asked for: given


@pytest.mark.parametrize("quant", ["nf4", "int8", "none"])
def test_a_base_is_loaded_onto_the_gpu_by_its_index(cuda_stand_in, tiny_llama_dir, quant):
    """accelerate names a lone GPU `cuda`; the device map names it `cuda:0`. An unquantized base goes to the GPU
    too (it stayed on the CPU, where qadapt eval then ran it)."""
    from qadapt.inference.loader import load_target
    from qadapt.models import load_base

    load_base(ModelConfig(name=str(tiny_llama_dir), quant=quant), torch.device("cuda"))
    load_target(str(tiny_llama_dir), quant=quant)  # a bare model, as qadapt eval loads it
    assert [load["device_map"] for load in cuda_stand_in.loads] == [{"": torch.device("cuda", 0)}] * 2


def test_a_run_is_evaluated_on_the_gpu(cuda_stand_in, lora_run):
    from qadapt.inference.loader import load_target

    load_target(str(lora_run))
    assert cuda_stand_in.loads[-1]["device_map"] == {"": torch.device("cuda", 0)}


class Recorder:
    """Stands in for the CPU measures behind lean_cpu's door, recording which were called."""

    MEASURES = ("bound_heap_retention", "copy_out_of_file_mappings", "release_freed_memory", "trim_heap",
                "use_cheap_dropout", "share_masks_within_blocks", "fuse_lora_forwards", "unpack_for_decoding")

    def __init__(self, monkeypatch):
        self.called: set[str] = set()
        for name in self.MEASURES:
            real = getattr(lean_cpu, name)
            monkeypatch.setattr(lean_cpu, name, self.recording(name, real))

    def recording(self, name, real):
        def measure(*args, **kwargs):
            self.called.add(name)
            return real(*args, **kwargs)
        return measure


def train_and_answer(recipe, device: torch.device, run) -> torch.nn.Module:
    """prepare_model for `device`, a training step's forward and backward, then the run loaded to answer."""
    from qadapt.inference.loader import load_target
    from qadapt.tasks.causal_lm import summed_token_loss
    from qadapt.training.prepare import prepare_model

    model, _, _ = prepare_model(recipe, device)
    model.train()
    summed_token_loss(model, token_batch(batch=2, length=24)).backward()
    load_target(str(run))
    return model


def test_a_gpu_run_calls_none_of_the_cpu_measures(monkeypatch, tiny_llama_dir, lora_run):
    """The same steps for the CPU call every measure (so this can fail); for a GPU, none, and the adapters
    keep their plain forward and torch's dropout."""
    from qadapt.adapters import LoRALinear

    recipe = recipe_from_dict(tiny_recipe(tiny_llama_dir, adapter={"rank": 4, "dropout": 0.1},
                                          train={"shared_dropout_masks": True}))
    on_cpu = Recorder(monkeypatch)
    train_and_answer(recipe, torch.device("cpu"), lora_run)
    assert on_cpu.called == set(Recorder.MEASURES)

    from conftest import CudaStandIn

    CudaStandIn(monkeypatch)
    on_gpu = Recorder(monkeypatch)
    model = train_and_answer(recipe, torch.device("cuda"), lora_run)
    assert on_gpu.called == set()
    loras = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert loras and all("forward" not in vars(m) and type(m.dropout) is torch.nn.Dropout for m in loras)
    assert not model.base_model._forward_hooks and not model.base_model._forward_pre_hooks


def test_the_peak_memory_of_a_gpu_run_is_counted_after_loading_allocated_and_reserved(cuda_stand_in):
    from qadapt.devices import peak_memory_mb, start_peak_memory
    from qadapt.training.train import _peak_memory_figures, format_summary

    start_peak_memory(torch.device("cuda"))
    assert cuda_stand_in.peak_resets == [0]
    assert peak_memory_mb(torch.device("cuda")) == {"allocated": 3072.0, "reserved": 4096.0}
    figures = _peak_memory_figures(torch.device("cuda"))
    assert figures == {"peak_memory_mb": 3072.0, "peak_reserved_mb": 4096.0}
    summary = {"trainable_params": 1, "total_params": 2, "trainable_share": 0.5, "wrapped_modules": 1,
               "adapter_kind": "lora", "steps": 1, "global_batch": 1, "processes": 1, "tokens_seen": 1,
               "wall_s": 1.0, "s_per_step": 1.0, "first_loss": 1.0, "last_loss": 1.0, "eval_loss": None,
               "adapter": "a", **figures}
    assert "peak memory: 3,072 MB allocated, 4,096 MB reserved" in format_summary(summary)


def test_training_counts_its_peak_from_after_loading(monkeypatch, tiny_llama_dir, tmp_path):
    import qadapt.training.train as train_module

    events = []
    real_prepare = train_module.prepare_model
    monkeypatch.setattr(train_module, "prepare_model", lambda *a, **k: events.append("load") or real_prepare(*a, **k))
    monkeypatch.setattr(train_module, "start_peak_memory", lambda device: events.append(("count from", device.type)))
    train_module.train(recipe_from_dict(tiny_recipe(tiny_llama_dir, tmp_path / "run")))
    assert events == ["load", ("count from", "cpu")]


def test_merge_folds_into_the_host_copy_when_the_trained_model_is_elsewhere(lora_run):
    """On a GPU machine the trained model is on the GPU and the full-precision base on the host: every
    de-quantized weight must land on the base's device. The meta device stands in for the host here."""
    from qadapt.export.merge import copy_trained_weights
    from qadapt.inference.loader import load_trained_model
    from qadapt.models import meta_model

    trained, _, recipe = load_trained_model(lora_run, compute_dtype="fp32")
    full = meta_model(recipe.model)
    assert copy_trained_weights(trained, full) == 2 * 7
    assert {p.device.type for p in full.parameters()} == {"meta"}


def test_merge_says_what_host_memory_it_needs_and_refuses_without_it(monkeypatch, lora_run, tmp_path):
    import qadapt.devices
    from qadapt.errors import QadaptError
    from qadapt.export.merge import merge_run

    monkeypatch.setattr(qadapt.devices, "free_memory", lambda device: 2**20)
    with pytest.raises(QadaptError, match=r"merging needs about 0\.\d GiB of host memory for the base in float32 "
                                          r"\(0\.\d GiB\) beside the trained model .* 0\.0 GiB is available"):
        merge_run(lora_run, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def llama2_7b_on_meta(dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        return LlamaForCausalLM(config).to(dtype)


def test_the_decoder_batch_is_sized_by_the_kv_cache_that_fits():
    """LLaMA-2-7B caches 0.5 MiB a token in bf16: 64 rows of 450 positions (~14 GiB, 21 GiB with the decoder's
    room to grow) do not fit the ~19 GiB a 24 GB card has left beside the NF4 model; 46 rows do (23 in fp32)."""
    from qadapt.decoding.memory import KV_ROOM, decode_batch_size, kv_bytes_per_token

    free = 19 * 2**30
    for dtype, rows in [(torch.bfloat16, 46), (torch.float32, 23)]:
        model = llama2_7b_on_meta(dtype)
        assert kv_bytes_per_token(model.config, dtype) == 2 * 32 * 32 * 128 * dtype.itemsize
        assert decode_batch_size(model, 64, 450, free) == rows
        assert rows * kv_bytes_per_token(model.config, dtype) * 450 * KV_ROOM <= 0.8 * free
    assert decode_batch_size(llama2_7b_on_meta(torch.bfloat16), 16, 450, free) == 16  # asked for fewer: kept


def test_out_of_memory_halves_the_batch_and_loses_no_answer(load_tiny, smol_tokenizer):
    """A model that runs out of memory above 2 rows (as a GPU would): the batch of 8 is halved twice, the prompts
    in flight start again, and every answer equals the one decoded 2 at a time from the start."""
    import functools

    from qadapt.decoding.generation import greedy_generate

    model = load_tiny("nf4").eval()
    prompts = [f"Question {i}: what is {i} + {2 * i}?" * (1 + i % 3) for i in range(8)]
    expected = greedy_generate(model, smol_tokenizer, prompts, max_new_tokens=12, batch_size=2)
    real_forward, rows_seen = model.forward, []

    @functools.wraps(real_forward)
    def forward(*args, **kwargs):
        rows_seen.append(kwargs["input_ids"].shape[0])
        if rows_seen[-1] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        return real_forward(*args, **kwargs)

    model.forward = forward
    done = []
    assert greedy_generate(model, smol_tokenizer, prompts, max_new_tokens=12, batch_size=8,
                           on_done=done.append) == expected
    assert max(rows_seen) > 2 and sum(done) == len(prompts)


def adapter_gradients(model_dir, compute_dtype: str, scaler) -> torch.Tensor:
    """The LoRA gradients of one 16 × 256-token step of a tiny LLaMA (unquantized), B drawn ≠ 0."""
    from accelerate import Accelerator

    from qadapt.adapters import LoRALinear
    from qadapt.training.loss import accumulate_gradients
    from qadapt.training.prepare import prepare_model

    torch.manual_seed(0)
    recipe = recipe_from_dict(tiny_recipe(model_dir, model={"quant": "none", "compute_dtype": compute_dtype},
                                          adapter={"rank": 4, "dropout": 0.0},
                                          train={"gradient_checkpointing": False}))
    model, _, _ = prepare_model(recipe, torch.device("cpu"))
    for module in model.modules():
        if isinstance(module, LoRALinear):
            torch.nn.init.normal_(module.lora_b.weight, std=0.01)
    model.train()
    accumulate_gradients(model, [token_batch(batch=16, length=256, vocab=256)], Accelerator(cpu=True), scaler=scaler)
    scale = scaler.get_scale() if scaler is not None else 1.0
    return torch.cat([p.grad.flatten() / scale for p in model.parameters() if p.requires_grad])


def test_fp16_training_needs_its_loss_scaled(tiny_family_dir):
    """The loss of a step is divided by its ~4000 target tokens: in fp16 the gradients flowing back through the
    base lose precision to underflow (measured: 1.2e-2 relative error against fp32), scaled they do not (9.8e-4,
    fp16's rounding)."""
    from qadapt.training.loss_scale import grad_scaler

    model_dir = tiny_family_dir("llama")  # a 256-token vocabulary: fp16 matmuls are slow on a CPU
    reference = adapter_gradients(model_dir, "fp32", None)
    scaler = grad_scaler(torch.float16, torch.device("cpu"))
    assert scaler.is_enabled() and not grad_scaler(torch.bfloat16, torch.device("cpu")).is_enabled()
    errors = {name: ((adapter_gradients(model_dir, "fp16", s) - reference).norm() / reference.norm()).item()
              for name, s in [("unscaled", None), ("scaled", scaler)]}
    assert errors["scaled"] < 2e-3 and errors["unscaled"] > 4 * errors["scaled"], errors


def test_fp16_overflow_skips_steps_and_a_resumed_run_keeps_its_loss_scale(monkeypatch, tiny_llama_dir, tmp_path):
    """Started at a scale too high (2¹⁹), the first steps overflow: skipped and the scale halved, not a diverged
    run. The checkpoint keeps the scale, so a run resumed there repeats the uninterrupted one step for step."""
    import json

    import qadapt.training.train as train_module

    real = train_module.grad_scaler

    def scaler_from_2_19(*args, **kwargs):
        scaler = real(*args, **kwargs)
        scaler._init_scale = 2.0**19
        return scaler

    monkeypatch.setattr(train_module, "grad_scaler", scaler_from_2_19)
    recipe = recipe_from_dict(tiny_recipe(tiny_llama_dir, tmp_path / "run",
                                          model={"quant": "none", "compute_dtype": "fp16"}, data={"max_examples": 32},
                                          train={"max_steps": 4, "lr": 1e-2, "save_every": 2}))
    train_module.train(recipe)

    def rows():
        lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        return [(row["loss"], row["grad_norm"], row["loss_scale"]) for row in map(json.loads, lines)]

    uninterrupted = rows()
    scales = [scale for _, _, scale in uninterrupted]
    assert scales[0] < 2.0**19 and scales[-1] == scales[-2] < scales[0]  # halved while overflowing, then kept
    assert any(norm != norm or norm == float("inf") for _, norm, _ in uninterrupted)
    train_module.train(recipe, resume=str(tmp_path / "run" / "checkpoints" / "step-000002"))
    assert rows() == uninterrupted


def test_fsdp_refuses_an_8bit_base_before_loading_it():
    from qadapt.errors import QadaptError
    from qadapt.training.distributed import load_base_to_shard

    with pytest.raises(QadaptError, match="bitsandbytes supports FSDP for its 4-bit layers only"):
        load_base_to_shard(ModelConfig(quant="int8"), accelerator=None)


def test_a_paged_optimizer_is_said_to_run_unpaged_off_cuda_only():
    """bitsandbytes' own warning is silenced (qadapt.console); qadapt says it once, and only off a GPU."""
    import warnings

    import torch

    from qadapt.console import quiet_known_noise
    from qadapt.quant import unpaged_here

    assert "runs unpaged" in unpaged_here("paged_adamw_8bit", torch.device("cpu"))
    assert unpaged_here("paged_adamw_8bit", torch.device("cuda", 0)) is None
    assert unpaged_here("adamw_8bit", torch.device("cpu")) is None
    quiet_known_noise()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_known_noise()  # the filter goes in front again after simplefilter
        warnings.warn("Paged optimizers are not supported on CPU. Falling back to non-paged optimizer behavior.")
        warnings.warn("a real warning")
    assert [str(w.message) for w in caught] == ["a real warning"]
