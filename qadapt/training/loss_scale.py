"""Loss scaling for fp16 compute: gradients too small for fp16 are scaled up for backward, down before the step.

fp16's smallest normal number is 6e-5 (bf16 and fp32 reach 1e-38), and qadapt's loss is divided by the
step's target tokens, so the gradients flowing back through a 16-bit base would underflow to zero.
torch's GradScaler multiplies what is backpropagated by a scale (2¹⁶ to start), divides the adapters'
fp32 gradients by it before clipping, skips a step whose gradients overflowed (and halves the scale),
and doubles the scale after 2000 steps without overflow. `auto` picks fp16 on GPUs older than Ampere
(qadapt.quant.auto_compute_dtype). For bf16 and fp32 the scaler is off: each of its calls does nothing.
"""

from __future__ import annotations

import torch


def grad_scaler(compute_dtype: torch.dtype, device: torch.device, sharded: bool = False) -> torch.amp.GradScaler:
    """A GradScaler that is on for fp16 compute only (FSDP's sharded one when the adapters are sharded)."""
    enabled = compute_dtype == torch.float16
    if sharded:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type, enabled=enabled)
    return torch.amp.GradScaler(device.type, enabled=enabled)


def fp16_overflow(scaler: torch.amp.GradScaler) -> bool:
    """Whether non-finite gradients (with a finite loss) are an overflow of fp16 at the current scale, which
    the scaler skips and recovers from by lowering the scale, rather than a diverged run: so while the
    scale is above 1 (below, the gradients overflow even unscaled)."""
    return scaler.is_enabled() and scaler.get_scale() > 1
