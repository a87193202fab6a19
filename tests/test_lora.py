"""LoRA invariants on a tiny random LLaMA with real bitsandbytes NF4 / int8 layers on the CPU."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import token_batch

from qadapt.adapters import (
    FAMILIES,
    LoRALinear,
    adapter_params,
    attach_adapters,
    count_parameters,
    inject_adapters,
)
from qadapt.errors import QadaptError
from qadapt.adapters.spec import adapter_spec
from qadapt.tasks.causal_lm import summed_token_loss

QUANTS = ["nf4", "int8", "none"]


def base_state(model) -> dict[str, torch.Tensor]:
    """Every tensor of the model that is not an adapter parameter, quantization constants included."""
    adapter_names = set(adapter_params(model))
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in adapter_names}


def train_steps(model, steps: int = 2, lr: float = 1e-2) -> None:
    optimizer = torch.optim.AdamW(list(adapter_params(model).values()), lr=lr)
    model.train()
    for step in range(steps):
        summed_token_loss(model, token_batch(seed=step)).backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("quant", QUANTS)
def test_identity_at_init(load_tiny, quant):
    model = load_tiny(quant)
    batch = token_batch()
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"]).logits
        attach_adapters(model, adapter_spec(rank=4, alpha=8, dropout=0.0))
        after = model(input_ids=batch["input_ids"]).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("quant", QUANTS)
def test_training_moves_only_adapters(load_tiny, quant):
    model = load_tiny(quant)
    attach_adapters(model, adapter_spec(rank=4, alpha=8, dropout=0.1))
    frozen_before = base_state(model)
    adapters_before = {k: v.detach().clone() for k, v in adapter_params(model).items()}
    train_steps(model)  # two steps: B leaves zero on the first, A moves once B is non-zero
    frozen_after = base_state(model)
    assert frozen_before.keys() == frozen_after.keys()
    for name, tensor in frozen_before.items():
        assert torch.equal(tensor, frozen_after[name]), f"frozen tensor {name} changed"
    for name, param in adapter_params(model).items():
        assert not torch.equal(adapters_before[name], param), f"adapter weight {name} did not move"


@pytest.mark.parametrize("quant", QUANTS)
def test_trainable_count_matches_formula(load_tiny, quant):
    model = load_tiny(quant)
    rank = 8
    wrapped = attach_adapters(model, adapter_spec(rank=rank))
    expected = 0
    for name in wrapped:
        layer = model.get_submodule(name)
        assert isinstance(layer, LoRALinear)
        expected += rank * (layer.base.in_features + layer.base.out_features)
    trainable, total = count_parameters(model)
    assert trainable == expected
    # 2 layers x 7 projections: every linear layer but the LM head.
    assert len(wrapped) == 2 * len(FAMILIES["llama"].linears)
    assert not any(name.endswith("lm_head") for name in wrapped)
    assert total > trainable


def test_quantized_base_layers_are_bitsandbytes(load_tiny):
    import bitsandbytes as bnb

    for quant, cls in [("nf4", bnb.nn.Linear4bit), ("int8", bnb.nn.Linear8bitLt)]:
        model = load_tiny(quant)
        wrapped = attach_adapters(model, adapter_spec(rank=4))
        assert all(isinstance(model.get_submodule(name).base, cls) for name in wrapped)


def test_missing_target_raises_with_the_models_linear_names(load_tiny):
    model = load_tiny("nf4")
    with pytest.raises(QadaptError, match=r"q_prj.*match no linear layer.*down_proj.*q_proj"):
        attach_adapters(model, adapter_spec(targets=["q_proj", "q_prj"]))


def test_unknown_model_type_needs_explicit_targets(load_tiny):
    model = load_tiny("none")
    model.config.model_type = "something-new"
    with pytest.raises(QadaptError, match="something-new.*no default adapter targets.*gate_proj"):
        attach_adapters(model, adapter_spec())
    assert len(attach_adapters(model, adapter_spec(targets=["v_proj"]))) == 2


@pytest.mark.parametrize("rslora, expected", [(False, 16 / 4), (True, 16 / math.sqrt(4))])
def test_scaling(rslora, expected):
    layer = LoRALinear(torch.nn.Linear(8, 8), rank=4, alpha=16, rslora=rslora)
    assert layer.scale == pytest.approx(expected)


def test_forward_is_the_lora_equation():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    layer = LoRALinear(base, rank=2, alpha=4)
    torch.nn.init.normal_(layer.lora_b.weight)
    x = torch.randn(3, 6)
    expected = base(x) + 2.0 * x @ layer.lora_a.weight.T @ layer.lora_b.weight.T
    torch.testing.assert_close(layer(x), expected)


def test_gradient_checkpointing_reaches_every_adapter(load_tiny):
    model = load_tiny("nf4", gradient_checkpointing=True)
    assert model.is_gradient_checkpointing
    attach_adapters(model, adapter_spec(rank=4, dropout=0.0))
    model.train()
    summed_token_loss(model, token_batch()).backward()
    for name, param in adapter_params(model).items():
        if name.endswith("lora_b.weight"):
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_eval_forward_then_training_on_4bit(load_tiny):
    """Known trap: on an AVX512-BF16 CPU, an eval-mode no_grad forward used to repack the 4-bit
    weights in place and break the next backward. prepare_for_kbit_training switches that off."""
    model = load_tiny("nf4", compute_dtype="bf16")
    attach_adapters(model, adapter_spec(rank=4))
    packed_before = base_state(model)
    model.eval()
    with torch.no_grad():
        model(input_ids=token_batch()["input_ids"])
    train_steps(model, steps=1)
    for name, tensor in packed_before.items():
        assert torch.equal(tensor, base_state(model)[name]), f"{name} was repacked"


def test_inject_reports_the_names_it_wrapped():
    model = torch.nn.Sequential()
    model.add_module("block", torch.nn.ModuleDict({"q_proj": torch.nn.Linear(4, 4), "other": torch.nn.Linear(4, 4)}))
    names = inject_adapters(model, ["q_proj"], lambda base: LoRALinear(base, 2, 4))
    assert names == ["block.q_proj"]
    assert isinstance(model.block["q_proj"], LoRALinear)
    assert not isinstance(model.block["other"], LoRALinear)
    assert [p.requires_grad for p in model.block["other"].parameters()] == [False, False]


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
def test_every_optimizer_trains_the_adapters_on_4bit(load_tiny, name):
    from qadapt.quant import optimizer_class

    model = load_tiny("nf4")
    # bitsandbytes keeps tensors under 4096 elements in 32-bit state; rank 64 makes A 64 x 64 = 4096.
    attach_adapters(model, adapter_spec(rank=64, dropout=0.0))
    params = adapter_params(model)
    optimizer = optimizer_class(name)(list(params.values()), lr=1e-2)
    before = {k: v.detach().clone() for k, v in params.items()}
    model.train()
    for step in range(2):
        loss = summed_token_loss(model, token_batch(seed=step))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(not torch.equal(before[k], p) for k, p in params.items())
    assert torch.isfinite(summed_token_loss(model, token_batch(seed=5)))
    state_dtypes = {v.dtype for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)}
    assert (torch.uint8 in state_dtypes) == name.endswith("_8bit")
