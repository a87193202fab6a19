"""The benchmark tools run: tools/gpu_check.py builds its NF4 model layer by layer and trains (CPU here)."""

from __future__ import annotations

import argparse
import sys

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import gpu_check  # noqa: E402


def test_gpu_check_builds_an_nf4_model_without_full_precision_linears():
    import bitsandbytes as bnb

    model = gpu_check.build_nf4_model("tiny", torch.device("cpu"))
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert all(isinstance(m, bnb.nn.Linear4bit) for name, m in linears.items() if name != "lm_head")
    assert len(linears) == 2 * 7 + 1
    assert not [name for name, p in [*model.named_parameters(), *model.named_buffers()] if p.device.type == "meta"]
    logits = model(input_ids=torch.randint(0, 512, (1, 16))).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("side", ["qadapt", "peft"])
def test_gpu_check_trains_both_sides(side):
    pytest.importorskip("peft")
    args = argparse.Namespace(config="tiny")
    result = gpu_check.run(side, args, torch.device("cpu"), batch=2, seq=32, steps=3)
    assert len(result["losses"]) == 3 and all(loss == loss for loss in result["losses"])
    assert result["tokens_per_s"] > 0
