"""The speed and memory techniques keep the numbers: same loss, same gradients, same loss curve.

The CPU-only ones (qadapt.lean_cpu) are compared with the plain path every GPU run takes.
"""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import token_batch
from torch import nn
from torch.utils.checkpoint import checkpoint

from qadapt import lean_cpu
from qadapt.adapters import DoRALinear, LoRALinear, attach_adapters
from qadapt.data import IGNORE_INDEX
from qadapt.lean_cpu.masks import CheapDropout, keep_mask
from qadapt.adapters.spec import adapter_spec
from qadapt.tasks.causal_lm import summed_token_loss


def test_keep_mask_drops_p_of_the_elements():
    torch.manual_seed(0)
    for p in (0.05, 0.1, 0.5):
        kept = keep_mask(torch.Size([2000, 1000]), p, torch.device("cpu"))
        assert kept.shape == (2000, 1000) and kept.dtype == torch.bool
        assert abs((1 - kept.float().mean().item()) - p) < 0.002
    # Neighbouring draws (four per random word) are independent: pairs are kept at (1-p)².
    kept = keep_mask(torch.Size([3_000_000]), 0.5, torch.device("cpu")).float()
    assert abs((kept[:-1] * kept[1:]).mean().item() - 0.25) < 0.002


def test_cheap_dropout_scales_what_it_keeps_and_is_off_in_eval():
    torch.manual_seed(0)
    dropout, x = CheapDropout(0.1), torch.randn(500, 64)
    y = dropout(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.9)
    assert dropout.eval()(x) is x and CheapDropout(0.0)(x) is x


@pytest.mark.parametrize("kind", [LoRALinear, DoRALinear])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_lora_forward_computes_the_plain_one(kind, dtype):
    """lean_cpu's fused sum (addmm, scale on the middle) against LoRALinear's own equation: outputs and the
    gradients of the input, A and B, with dropout off (eval) and B ≠ 0."""
    torch.manual_seed(0)
    plain = kind(nn.Linear(48, 40).to(dtype), rank=4, alpha=8, dropout=0.1)
    nn.init.normal_(plain.lora_b.weight)
    fused = copy.deepcopy(plain)
    model = nn.Sequential(fused)
    lean_cpu.for_training(model)
    assert isinstance(fused.dropout, CheapDropout)
    results = []
    for layer in (plain.eval(), fused.eval()):
        x = torch.randn(3, 5, 48, dtype=dtype, generator=torch.Generator().manual_seed(1), requires_grad=True)
        out = layer(x)
        grads = torch.autograd.grad(out.float().square().sum(), [x, layer.lora_a.weight, layer.lora_b.weight])
        results.append((out, *grads))
    for expected, actual in zip(*results):
        if dtype == torch.float32:
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        else:  # rounded to bf16 at other points (the scale before B, the sum in one addmm): relative error
            assert ((actual.float() - expected.float()).norm() / expected.float().norm()).item() < 1e-2


@pytest.mark.parametrize("lean", [False, True])
def test_checkpoint_recompute_draws_the_same_dropout_mask(lean):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 32), rank=4, alpha=8, dropout=0.2)
    if lean:
        lean_cpu.for_training(nn.Sequential(layer))
    nn.init.normal_(layer.lora_b.weight)
    x = torch.randn(8, 64, requires_grad=True)
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(1)
        out = checkpoint(layer, x, use_reentrant=False) if checkpointed else layer(x)
        grads.append(torch.autograd.grad(out.square().sum(), [x, layer.lora_a.weight]))
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(plain, recomputed)


def full_logits_loss(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("quant, head", [("nf4", "trained"), ("none", "trained"), ("nf4", "frozen"), ("none", "frozen")])
def test_chunked_loss_equals_the_full_logits_loss_and_gradients(load_tiny, quant, head):
    """A trained head (LoRA on it) takes the checkpointed chunks, a frozen one LinearCrossEntropy."""
    model = load_tiny(quant)
    targets = ["q_proj", "down_proj"] + (["lm_head"] if head == "trained" else [])
    attach_adapters(model, adapter_spec(kind="lora", rank=4, dropout=0.0, targets=targets))
    for module in model.modules():
        if isinstance(module, LoRALinear):
            nn.init.normal_(module.lora_b.weight, std=0.02)
    batch = token_batch(batch=2, length=300)  # 598 target positions: several chunks and a partial one
    batch["labels"][0, :40] = IGNORE_INDEX
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for loss_fn in (full_logits_loss, summed_token_loss):
        loss = loss_fn(model, batch)
        results.append((loss.detach(), torch.autograd.grad(loss, params)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-3)
    for full, chunked in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-5)


def lora_in_fp32(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    out = layer.base(x)
    return out + layer.lora_b(layer.lora_a(layer.dropout(x).float()) * layer.scale).to(out.dtype)


def loss_curve(load_tiny, variant: str, steps: int = 8, seed: int = 0, compute_dtype: str = "bf16") -> list[float]:
    """Training losses of the tiny LLaMA (NF4) with LoRA: `qadapt` as it trains on a CPU (lean_cpu), `plain`
    as on a GPU (torch's dropout), or with one technique undone."""
    torch.manual_seed(0)
    model = load_tiny("nf4", compute_dtype=compute_dtype)
    torch.manual_seed(seed)  # the adapters' initialization and dropout masks
    attach_adapters(model, adapter_spec(kind="lora", rank=8, dropout=0.1))
    if variant != "plain":
        lean_cpu.for_training(model)
    for module in model.modules():
        if variant == "fp32 LoRA" and isinstance(module, LoRALinear):  # the same (cheap) dropout masks
            module.forward = partial(lora_in_fp32, module)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses, batch = [], token_batch(batch=4, length=64)  # one batch, learned by heart
    for _ in range(steps):
        loss = (full_logits_loss if variant == "full logits" else summed_token_loss)(model, batch) / (4 * 63)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_the_loss_curve_is_the_same_with_and_without_each_technique(load_tiny):
    """The lean loss (chunks; the frozen head's gradient taken with its loss) vs full logits, in fp32
    (the same numbers) and bf16 (the same up to rounding, which 8 steps at a high learning rate
    amplify); LoRA computed in bf16 (as autocast would) vs in fp32."""
    lean_curves = {dtype: loss_curve(load_tiny, "qadapt", compute_dtype=dtype) for dtype in ("fp32", "bf16")}
    for variant, compute_dtype, tolerance in [("full logits", "fp32", 1e-4), ("full logits", "bf16", 0.05),
                                              ("fp32 LoRA", "bf16", 0.05)]:
        lean = lean_curves[compute_dtype]
        learned = lean[0] - lean[-1]
        assert learned > 0.2
        other = loss_curve(load_tiny, variant, compute_dtype=compute_dtype)
        assert other[0] == pytest.approx(lean[0], abs=1e-3)
        assert max(abs(a - b) for a, b in zip(lean, other)) <= tolerance * learned, (variant, lean, other)


def mean_curve(curves: list[list[float]]) -> list[float]:
    return [sum(losses) / len(losses) for losses in zip(*curves)]


def test_our_dropout_learns_as_torch_dropout_does(load_tiny):
    """Other masks, so the curves differ by the noise of the masks (two seeds of torch's own dropout
    differ by up to 15 % of what is learned): their means over three seeds agree (measured: within 6 %)."""
    ours = mean_curve([loss_curve(load_tiny, "qadapt", seed=seed) for seed in range(3)])
    torchs = mean_curve([loss_curve(load_tiny, "plain", seed=seed) for seed in range(3)])
    learned = ours[0] - ours[-1]
    assert learned > 0.2
    assert max(abs(a - b) for a, b in zip(ours, torchs)) <= 0.1 * learned, (ours, torchs)


def test_linear_cross_entropy_equals_autograd_with_scaling_and_soft_cap():
    """The frozen head's gradient, taken with its loss, for Granite's logit divisor and Gemma's soft cap."""
    from qadapt.tasks.causal_lm import LinearCrossEntropy

    torch.manual_seed(0)
    weight, bias = torch.randn(300, 32), torch.randn(300)
    labels = torch.randint(0, 300, (200,))
    labels[:30] = IGNORE_INDEX
    for scaling, cap in [(1.0, None), (4.0, None), (1.0, 3.0), (2.0, 5.0)]:
        hidden = torch.randn(200, 32, requires_grad=True)
        logits = F.linear(hidden, weight, bias) / scaling
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        expected = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        (expected_grad,) = torch.autograd.grad(expected * 0.5, hidden)
        fused = LinearCrossEntropy.apply(hidden, weight, bias, labels, scaling, cap)
        (fused_grad,) = torch.autograd.grad(fused * 0.5, hidden)
        torch.testing.assert_close(fused, expected)
        torch.testing.assert_close(fused_grad, expected_grad)


def file_mapped(tensor: torch.Tensor) -> bool:
    """Whether the tensor's data lies in a memory-mapped file (Linux /proc/self/maps)."""
    address = tensor.data_ptr()
    for line in open("/proc/self/maps"):
        fields = line.split(maxsplit=5)
        start, end = (int(bound, 16) for bound in fields[0].split("-"))
        if len(fields) == 6 and fields[5].startswith("/") and start <= address < end:
            return True
    return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_loading_keeps_no_weight_in_the_mapped_checkpoint(tiny_llama_dir):
    """transformers leaves fp32 weights of an fp32 checkpoint as views of the mapped file, which keeps
    every page of it that loading read resident; load_base copies them out."""
    from transformers import AutoModelForCausalLM

    from qadapt.models import load_base
    from qadapt.recipe import ModelConfig

    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    assert any(file_mapped(t) for t in plain.parameters())  # what load_base has to undo
    for quant in ("nf4", "none"):
        model = load_base(ModelConfig(name=str(tiny_llama_dir), quant=quant, compute_dtype="fp32"))
        assert not [name for name, t in [*model.named_parameters(), *model.named_buffers()] if file_mapped(t)]


ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def dropout_inputs(model) -> dict[str, torch.Tensor]:
    """Run the model once; each LoRA's dropped input, by module name."""
    seen = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            def record(x, draw=module.dropout.zero_dropped, name=name):
                dropped, rescale = draw(x)
                seen[name] = dropped.detach().clone()
                return dropped, rescale
            module.dropout.zero_dropped = record
    batch = token_batch(batch=2, length=16)
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for module in model.modules():
        if isinstance(module, LoRALinear):
            del module.dropout.zero_dropped
    return seen


@pytest.mark.parametrize("shared", [False, True])
def test_adapters_reading_one_input_share_its_mask_for_one_call_only_when_asked(load_tiny, shared):
    """Off by default: each adapter draws its own mask, as PEFT's layers do."""
    torch.manual_seed(0)
    model = load_tiny("nf4", gradient_checkpointing=False)
    attach_adapters(model, adapter_spec(kind="lora", rank=4, dropout=0.5, targets=ALL_LINEARS))
    lean_cpu.for_training(model, shared_masks=shared)
    model.train()
    first, second = dropout_inputs(model), dropout_inputs(model)
    layer = "model.layers.0."
    q, k, v, o = (first[layer + f"self_attn.{p}_proj"] for p in "qkvo")
    gate, up, down = (first[layer + f"mlp.{p}_proj"] for p in ("gate", "up", "down"))
    assert 0.4 < (q == 0).float().mean() < 0.6
    assert (torch.equal(q, k) and torch.equal(q, v) and torch.equal(gate, up)) is shared
    assert not torch.equal(q == 0, k == 0) or shared
    assert not torch.equal(q == 0, gate == 0) and (o == 0).float().mean() > 0.4 and (down == 0).float().mean() > 0.4
    assert not torch.equal(q, second[layer + "self_attn.q_proj"])  # the next call draws afresh


def test_checkpointing_recomputes_the_same_shared_masks(load_tiny):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = load_tiny("nf4", gradient_checkpointing=checkpointing)
        attach_adapters(model, adapter_spec(kind="lora", rank=4, dropout=0.3, targets=ALL_LINEARS))
        lean_cpu.for_training(model, shared_masks=True)
        for module in model.modules():
            if isinstance(module, LoRALinear):
                nn.init.normal_(module.lora_b.weight, std=0.02)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        grads.append(torch.autograd.grad(summed_token_loss(model, token_batch(batch=2, length=40)), params))
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain)
