"""qadapt's LoRA, DoRA, rsLoRA and LoRA+ step for step against the real peft package, on the same tensors.

If a layer computes what PEFT's computes (outputs and gradients, dropout included) and a run takes the
steps a PEFT run takes from the same initial weights (every step's loss, the final adapter), then what is
published for PEFT's LoRA and DoRA holds for qadapt's. Tolerances are fp32 rounding: the two sides sum the
same products in another order (PEFT adds the bias inside the base layer's matmul, qadapt measures DoRA's
norm through the base layer instead of de-quantizing it), ~1e-7 relative per operation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_recipe
from torch import nn

from qadapt.adapters import DoRALinear, LoRALinear, adapter_params, attach_adapters
from qadapt.adapters.spec import adapter_spec
from qadapt.recipe import recipe_from_dict

peft = pytest.importorskip("peft")
sys.path.insert(0, str(REPO / "tools"))


def plain_base(kind: str) -> nn.Module:
    """A 48 → 40 layer with a bias: nn.Linear, or GPT-2's Conv1D (weight stored as (in, out))."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(48, 40)
    layer = Conv1D(40, 48)
    nn.init.normal_(layer.weight, std=0.1)
    nn.init.normal_(layer.bias, std=0.1)
    return layer


def quantized_pairs(load_tiny, quant: str) -> list[tuple[nn.Module, nn.Module]]:
    """q_proj (square) and up_proj (wide) of the tiny LLaMA as qadapt loads it in 4 or 8 bits, each twice
    from two loads (the same codes): bitsandbytes layers, one for each side (PEFT's DoRA set-up writes into
    an 8-bit layer's state, and a deep copy of one does not run)."""
    ours, theirs = (load_tiny(quant).model.layers[0] for _ in range(2))
    return [(ours.self_attn.q_proj, theirs.self_attn.q_proj), (ours.mlp.up_proj, theirs.mlp.up_proj)]


def peft_wrapped(base: nn.Module, dora: bool, rslora: bool, dropout: float, fan_in_fan_out: bool) -> nn.Module:
    """PEFT's own LoRA layer around `base` (its dispatch picks the layer class for the base's type)."""
    holder = nn.Module()
    holder.proj = base
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["proj"], use_dora=dora,
                             use_rslora=rslora, fan_in_fan_out=fan_in_fan_out)
    return peft.inject_adapter_in_model(config, holder).proj


def same_start(ours: LoRALinear, theirs: nn.Module) -> None:
    """B ≠ 0 (so every gradient is live) and DoRA's magnitude off ‖W‖, then PEFT's copies of ours."""
    torch.manual_seed(3)
    with torch.no_grad():
        nn.init.normal_(ours.lora_b.weight, std=0.2)
        theirs.lora_A["default"].weight.copy_(ours.lora_a.weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_b.weight)
        if isinstance(ours, DoRALinear):
            ours.magnitude.mul_(torch.rand_like(ours.magnitude) + 0.5)
            theirs.lora_magnitude_vector["default"].weight.copy_(ours.magnitude)


def forward_and_gradients(layer: nn.Module, trained: list[torch.Tensor], dropout_seed: int = 7):
    """The layer's output on a fixed input (dropout drawn from a fixed seed) and the gradients of the input
    and of `trained` for a loss that weighs every output."""
    in_features = 48 if not hasattr(layer, "base_layer") and not hasattr(layer, "base") else None
    x = torch.randn(3, 5, in_features or _in_features(layer), generator=torch.Generator().manual_seed(1),
                    requires_grad=True)
    torch.manual_seed(dropout_seed)
    out = layer(x).float()
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad((out * weights).sum(), [x, *trained])
    return out.detach(), grads


def _in_features(layer: nn.Module) -> int:
    from qadapt.adapters.base import layer_dims

    return layer_dims(getattr(layer, "base", None) or layer.base_layer)[0]


def assert_same_layer(ours: LoRALinear, theirs: nn.Module, tolerance: float = 1e-6, dropout_seed: int = 7) -> None:
    """Each output and gradient within `tolerance` of PEFT's, relative (the norm of the difference over PEFT's)."""
    our_params = [ours.lora_a.weight, ours.lora_b.weight]
    their_params = [theirs.lora_A["default"].weight, theirs.lora_B["default"].weight]
    if isinstance(ours, DoRALinear):
        our_params.append(ours.magnitude)
        their_params.append(theirs.lora_magnitude_vector["default"].weight)
    our_out, our_grads = forward_and_gradients(ours, our_params, dropout_seed)
    their_out, their_grads = forward_and_gradients(theirs, their_params, dropout_seed)
    for name, mine, peers in zip(["output", "grad of x", "grad of A", "grad of B", "grad of m"],
                                 [our_out, *our_grads], [their_out, *their_grads]):
        error = ((mine - peers).norm() / peers.norm()).item()
        print(f"{name}: {error:.1e}")
        assert error < tolerance, f"{name}: {error:.1e} apart"


KINDS = [(LoRALinear, False), (LoRALinear, True), (DoRALinear, False), (DoRALinear, True)]


@pytest.mark.parametrize("base_kind", ["linear", "conv1d"])
@pytest.mark.parametrize("layer, rslora", KINDS)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_a_layer_computes_peft_s_on_plain_and_conv1d_bases(base_kind, layer, rslora, dropout):
    """Outputs and the gradients of x, A, B (DoRA: and m), in training with dropout: PEFT draws one mask per
    layer from torch's generator, as qadapt's layer does off the CPU door; DoRA corrects W·dropout(x)."""
    base = plain_base(base_kind)
    ours = layer(base, rank=4, alpha=8, dropout=dropout, rslora=rslora).train()
    theirs = peft_wrapped(base, layer is DoRALinear, rslora, dropout, fan_in_fan_out=base_kind == "conv1d").train()
    same_start(ours, theirs)
    assert_same_layer(ours, theirs)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
@pytest.mark.parametrize("layer, rslora", KINDS)
def test_a_layer_computes_peft_s_on_bitsandbytes_bases(load_tiny, quant, layer, rslora):
    for our_base, their_base in quantized_pairs(load_tiny, quant):
        ours = layer(our_base, rank=4, alpha=8, dropout=0.3, rslora=rslora).train()
        theirs = peft_wrapped(their_base, layer is DoRALinear, rslora, 0.3, fan_in_fan_out=False).train()
        same_start(ours, theirs)
        # DoRA's W·dropout(x) on an 8-bit base: PEFT multiplies by the de-quantized weight, qadapt passes the
        # input through the layer, whose kernel also rounds the input to 8 bits (LLM.int8): ~5e-6 apart.
        assert_same_layer(ours, theirs, tolerance=2e-5 if (quant, layer) == ("int8", DoRALinear) else 1e-6)


def test_dora_corrects_the_dropped_input_as_peft_does():
    """Fails with the magnitude correction on the undropped base output (qadapt before 0.x): the check
    above is not blind to it."""
    base = plain_base("linear")
    ours = DoRALinear(base, rank=4, alpha=8, dropout=0.3).train()
    theirs = peft_wrapped(base, True, False, 0.3, fan_in_fan_out=False).train()
    same_start(ours, theirs)
    ours.dropout = nn.Identity()  # what the correction saw before: x, not dropout(x)
    ours_out, _ = forward_and_gradients(ours, [ours.lora_a.weight])
    theirs_out, _ = forward_and_gradients(theirs, [theirs.lora_A["default"].weight])
    assert not torch.allclose(ours_out, theirs_out, rtol=1e-3, atol=1e-3)


# --- whole runs: `qadapt train` against tools/peer_fidelity.py's PEFT loop, from the same initial weights ---

RUNS = {  # LoRA on NF4 is the embedded model's run below
    "dora-nf4-loraplus": dict(model={"quant": "nf4"}, adapter={"kind": "dora", "lr_ratio": 16.0}),
    "rslora-int8": dict(model={"quant": "int8"}, adapter={"kind": "lora", "rslora": True}),
    "dora-none": dict(model={"quant": "none"}, adapter={"kind": "dora"}),
}


def run_both(model_dir, tmp_path: Path, sections: dict, steps: int = 4):
    """(qadapt's per-step losses and final adapter, PEFT's): the same recipe, started from qadapt's init."""
    from peer_fidelity import train_peft
    from safetensors.torch import load_file

    from qadapt.export.peft_format import PEFT_WEIGHTS, peft_state_to_ours
    from qadapt.run_dir import RunDir
    from qadapt.training.train import train

    raw = tiny_recipe(model_dir, tmp_path / "qadapt", **sections)
    # fp32: in bf16 the two sides' sums round apart by ~1 % of a gradient, which hides what is compared.
    raw["model"] |= {"compute_dtype": "fp32"}
    raw["adapter"] = {"rank": 4, "alpha": 8, "dropout": 0.0, **raw["adapter"]}
    # Two micro-batches of unequal lengths a step; a rate that moves the weights; warm-up and decay.
    raw["train"] |= {"max_steps": steps, "micro_batch_size": 2, "grad_accum": 2, "lr": 1e-2, "warmup_steps": 1,
                     "lr_schedule": "cosine", "weight_decay": 0.01}
    raw["data"] |= {"max_examples": 4 * steps}
    recipe = recipe_from_dict(raw)
    train(recipe)
    rows = [json.loads(line) for line in RunDir(tmp_path / "qadapt").training_log.read_text().splitlines()]
    ours = [row["loss"] for row in rows if "loss" in row]
    peer = train_peft(recipe, tmp_path / "peft")
    our_adapter = load_file(RunDir(tmp_path / "qadapt").adapter.weights_file)
    peer_adapter = peft_state_to_ours(load_file(tmp_path / "peft" / "adapter" / PEFT_WEIGHTS))
    return (ours, our_adapter), (peer["losses"], peer_adapter)


def assert_same_run(ours, peer, loss_rtol: float, weight_rtol: float) -> None:
    (our_losses, our_adapter), (peer_losses, peer_adapter) = ours, peer
    assert len(our_losses) == len(peer_losses)
    print("losses", our_losses, peer_losses)
    assert our_losses == pytest.approx(peer_losses, rel=loss_rtol)
    assert our_adapter.keys() == peer_adapter.keys()
    errors = {key: ((tensor - peer_adapter[key]).norm() / peer_adapter[key].norm()).item()
              for key, tensor in our_adapter.items()}
    worst = max(errors, key=errors.get)
    print(f"worst adapter tensor: {worst} {errors[worst]:.1e} apart")
    assert errors[worst] < weight_rtol, f"{worst}: {errors[worst]:.2e} apart"


@pytest.mark.parametrize("variant", RUNS)
def test_a_run_takes_peft_s_steps(tiny_llama_dir, tmp_path, variant):
    """Four steps (AdamW with weight decay, clipping, warm-up then cosine, gradient checkpointing, two
    micro-batches of unequal lengths each): every step's loss within 1e-6 and the final adapter within 2e-5
    (relative; measured: 3e-6 at worst), on the NF4, int8 and unquantized tiny LLaMA."""
    ours, peer = run_both(tiny_llama_dir, tmp_path, RUNS[variant])
    assert_same_run(ours, peer, loss_rtol=1e-6, weight_rtol=2e-5)


def test_a_run_on_the_embedded_model_takes_peft_s_steps(tmp_path):
    """Two NF4 LoRA steps of the embedded SmolLM2-135M: the losses within 1e-6; the adapter within 1e-3, as
    Adam divides each update by its gradient's running size, so an element whose gradient is near 0 moves by
    a share of the rate that rounding decides (measured: 4e-4 after three steps at lr 1e-2)."""
    ours, peer = run_both("smollm2-135m", tmp_path, dict(model={"quant": "nf4"}, adapter={"kind": "lora"},
                                                           data={"cutoff_len": 64}), steps=2)
    assert_same_run(ours, peer, loss_rtol=1e-6, weight_rtol=1e-3)


def test_lora_plus_groups_the_weights_as_peft_does(load_tiny):
    """B matrices and DoRA's magnitude at lr_ratio × the rate, A at the rate: PEFT's create_loraplus_optimizer."""
    from peft.optimizers import create_loraplus_optimizer

    from qadapt.export.peft_format import peft_state_to_ours
    from qadapt.training.train import param_groups

    targets = ["q_proj", "v_proj", "down_proj"]
    model = load_tiny("none")
    attach_adapters(model, adapter_spec(kind="dora", rank=4, dropout=0.0, targets=targets))
    scales = {id(p): group["lr_scale"] for group in param_groups(model, 16.0) for p in group["params"]}
    ours = {name: scales[id(p)] for name, p in adapter_params(model).items()}

    peer = peft.get_peft_model(load_tiny("none"), peft.LoraConfig(r=4, target_modules=targets, use_dora=True))
    optimizer = create_loraplus_optimizer(peer, torch.optim.AdamW, lr=1.0, loraplus_lr_ratio=16.0)
    names = {id(p): name for name, p in peer.named_parameters()}
    rates = {names[id(p)].replace(".default", ""): torch.tensor(group["lr"])
             for group in optimizer.param_groups for p in group["params"]}
    theirs = {name: rate.item() for name, rate in peft_state_to_ours(rates).items()}
    assert set(theirs.values()) == {1.0, 16.0} and ours == theirs
