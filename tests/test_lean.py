"""The speed and memory techniques keep the numbers: same loss, same gradients, same loss curve."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import token_batch
from torch import nn
from torch.utils.checkpoint import checkpoint

from qadapt.adapters import LoRALinear, attach_adapters
from qadapt.adapters.dropout import AdapterDropout, keep_mask
from qadapt.data import IGNORE_INDEX
from qadapt.recipe import AdapterConfig
from qadapt.tasks.causal_lm import summed_token_loss


def test_keep_mask_drops_p_of_the_elements():
    torch.manual_seed(0)
    for p in (0.05, 0.1, 0.5):
        kept = keep_mask(torch.Size([2000, 1000]), p, torch.device("cpu"))
        assert kept.shape == (2000, 1000) and kept.dtype == torch.bool
        assert abs((1 - kept.float().mean().item()) - p) < 0.002
    # Neighbouring draws (three per random word) are independent: pairs are kept at (1-p)².
    kept = keep_mask(torch.Size([3_000_000]), 0.5, torch.device("cpu")).float()
    assert abs((kept[:-1] * kept[1:]).mean().item() - 0.25) < 0.002


def test_adapter_dropout_scales_what_it_keeps_and_is_off_in_eval():
    torch.manual_seed(0)
    dropout, x = AdapterDropout(0.1), torch.randn(500, 64)
    y = dropout(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.9)
    assert dropout.eval()(x) is x and AdapterDropout(0.0)(x) is x


def test_checkpoint_recompute_draws_the_same_dropout_mask():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 32), rank=4, alpha=8, dropout=0.2)
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


@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_chunked_loss_equals_the_full_logits_loss_and_gradients(load_tiny, quant):
    model = load_tiny(quant)
    attach_adapters(model, AdapterConfig(kind="lora", rank=4, dropout=0.0, targets=["q_proj", "down_proj", "lm_head"]).spec())
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


class TorchDropout(nn.Dropout):
    """torch's own dropout, in the form LoRA calls: (dropped and rescaled input, 1.0)."""

    def zero_dropped(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        return self(x), 1.0


def loss_curve(load_tiny, variant: str, steps: int = 8) -> list[float]:
    """Training losses of the tiny LLaMA (NF4, bf16 compute) with LoRA, with or without a technique."""
    torch.manual_seed(0)
    model = load_tiny("nf4", compute_dtype="bf16")
    attach_adapters(model, AdapterConfig(kind="lora", rank=8, dropout=0.1).spec())
    for module in model.modules():
        if variant == "torch dropout" and isinstance(module, LoRALinear):
            module.dropout = TorchDropout(0.1)
        if variant == "fp32 LoRA" and isinstance(module, LoRALinear):
            module.low_rank_delta = lambda x, m=module: m.lora_b(m.lora_a(m.dropout(x).float()) * m.scale)
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
    """Chunked loss vs full logits; our dropout vs torch's (other masks, so close, not equal);
    LoRA computed in bf16 (as autocast would) vs in fp32."""
    lean = loss_curve(load_tiny, "qadapt")
    learned = lean[0] - lean[-1]
    assert learned > 0.2
    for variant, tolerance in [("full logits", 1e-4), ("torch dropout", 0.15), ("fp32 LoRA", 0.05)]:
        other = loss_curve(load_tiny, variant)
        assert other[0] == pytest.approx(lean[0], abs=1e-3)
        assert max(abs(a - b) for a, b in zip(lean, other)) <= tolerance * learned, (variant, lean, other)
