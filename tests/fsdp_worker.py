"""Run by torchrun from test_distributed.py: qadapt's FSDP + QLoRA pieces on the CPU (gloo).

accelerate's FSDP plugin refuses to start without a GPU, so this worker wraps the model with torch's
FSDP itself, exactly as qadapt asks accelerate to: 4-bit codes stored in the compute dtype, qadapt's
wrap policy (`distributed.fsdp_units`), `use_orig_params=False`. The step is qadapt's own
(`accumulate_gradients`), and the adapter and optimizer state are gathered as checkpoints gather them.
With one process the model is not wrapped at all: the reference.

    torchrun --nproc_per_node N tests/fsdp_worker.py MODEL_DIR OUT_DIR ADAPTER_KIND
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

from qadapt import data as D
from qadapt.training import distributed
from qadapt.adapters import adapter_state_dict, attach_adapters
from qadapt.models import load_base, load_tokenizer
from qadapt.quant import prepare_for_kbit_training
from qadapt.recipe import ModelConfig, adapter_section
from qadapt.training.loss import accumulate_gradients

GLOBAL_BATCH, MICRO_BATCH, STEPS = 8, 2, 3


def main(model_dir: str, out: Path, kind: str) -> None:
    accelerator = Accelerator(cpu=True)
    sharded = accelerator.num_processes > 1
    torch.manual_seed(0)
    config = ModelConfig(name=model_dir, quant="nf4", compute_dtype="fp32")
    tokenizer = load_tokenizer(config)
    records = D.load_examples(D.BUILTIN_ARITHMETIC)[:GLOBAL_BATCH * STEPS]
    rows = D.tokenize(records, tokenizer, "alpaca", 96, False).rows
    model = load_base(config, quant_storage_like_compute=sharded)
    prepare_for_kbit_training(model, gradient_checkpointing=True)
    attach_adapters(model, adapter_section(dict(kind=kind, rank=4, alpha=8, dropout=0.0, bottleneck_size=8), "adapter"))
    if sharded:
        units = distributed.fsdp_units(model)
        model = FSDP(model, device_id=torch.device("cpu"), use_orig_params=False,
                     auto_wrap_policy=functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: id(m) in units))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    share = GLOBAL_BATCH // accelerator.num_processes
    losses = []
    for step in range(STEPS):
        mine = rows[step * GLOBAL_BATCH:][accelerator.process_index * share:][:share]
        micro_batches = [D.collate(mine[i:i + MICRO_BATCH], tokenizer.pad_token_id)
                         for i in range(0, share, MICRO_BATCH)]
        losses.append(accumulate_gradients(model, micro_batches, accelerator))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    weights = distributed.adapter_weights(model) if sharded else adapter_state_dict(model)
    optimizer_state = distributed.optimizer_state(model, optimizer)
    reloaded = weights
    if sharded:  # load the gathered weights back into the shards (as resuming does), then gather again
        distributed.load_adapter_weights(model, {name: torch.zeros_like(w) for name, w in weights.items()})
        distributed.load_adapter_weights(model, weights)
        reloaded = distributed.adapter_weights(model)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_file(weights, out / "adapter.safetensors")
        (out / "result.json").write_text(json.dumps({
            "losses": losses,
            "optimizer_states": len(optimizer_state["state"]),
            "reloaded_equal": all(torch.equal(reloaded[n], weights[n]) for n in weights),
        }))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3])
