"""qadapt's Series block placements against AdapterHub's `adapters` library, a real implementation.

The library pins transformers 4.57, so it runs in its own environment (tools/adapterhub_env.sh, which
tools/setup.sh runs): tools/adapterhub_reference.py loads the same tiny LLaMA there, adds the adapter,
takes the weights qadapt's adapters hold, and writes the logits, the loss and the weights' gradients.

What is compared, and what is not (docs/explanation/fidelity.md):
- Houlsby (`DoubleSeqBnConfig`: after the attention and after the MLP) is qadapt's `series` `both`;
- after one block with the adapter fed that block's output (`SeqBnConfig(original_ln_before=False)`) is
  `series` `mlp` / `attention`. AdapterHub's default Pfeiffer config feeds a pre-norm model's adapter the
  block's output plus the residual stream instead, and its parallel config the residual stream rather than
  the block's (normalised) input; qadapt feeds both adapters what its block reads or writes, as LLM-Adapters'
  code does, so those two are not expected to agree and are not compared.
AdapterHub's projections carry biases (zero at init, as both init schemes leave them); qadapt's have none,
so the check is one forward and backward: logits, loss and the weights' gradients.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import REPO, token_batch

from qadapt.adapters import adapter_params, attach_adapters
from qadapt.adapters.spec import adapter_spec

REFERENCE_PYTHON = REPO / ".venv-adapterhub" / "bin" / "python"
pytestmark = pytest.mark.skipif(not REFERENCE_PYTHON.is_file(),
                                reason="AdapterHub's environment is absent: bash tools/adapterhub_env.sh builds it")

SIZE = 8  # bottleneck width; the tiny LLaMA's hidden size is 64
# qadapt's wrapped module (by its last name parts) -> where AdapterHub's adapter sits in the same decoder layer.
SITES = {"self_attn.o_proj": "attention_adapters", "mlp.down_proj": "output_adapters"}


def adapterhub_name(ours: str) -> str:
    """'model.layers.0.mlp.down_proj.bottleneck.up.weight' -> AdapterHub's name of the same weight."""
    module, param = ours.split(".bottleneck.")
    layer, site = module.rsplit(".", 2)[0], ".".join(module.rsplit(".", 2)[1:])
    place = {"down.weight": "adapter_down.0.weight", "up.weight": "adapter_up.weight", "scale": "scaling"}[param]
    return f"{layer}.{SITES[site]}.adapters.reference.{place}"


def run_reference(model_dir, tmp_path, config: str, options: dict, weights: dict, batch: dict) -> tuple[dict, dict]:
    from safetensors.torch import load_file, save_file

    case = tmp_path / config
    case.mkdir()
    (case / "case.json").write_text(json.dumps({"config": config, "options": options}))
    save_file({**{k: v.contiguous() for k, v in batch.items()},
               **{f"weight.{name}": tensor.detach().contiguous() for name, tensor in weights.items()}},
              case / "inputs.safetensors")
    result = subprocess.run([str(REFERENCE_PYTHON), str(REPO / "tools" / "adapterhub_reference.py"), str(model_dir),
                             str(case)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(case / "reference.safetensors"), json.loads((case / "reference.json").read_text())


CASES = {  # name: (AdapterHub config, its options, qadapt's adapter options)
    "houlsby": ("houlsby", {}, dict(placement="both", init="bert")),
    "houlsby-learned-scale": ("houlsby", {"scaling": "learned"}, dict(placement="both", scale="learned", init="bert")),
    "after-mlp": ("pfeiffer", {"original_ln_before": False, "init_weights": "mam_adapter"},
                  dict(placement="mlp", init="zero")),
    "after-attention": ("pfeiffer", {"original_ln_before": False, "mh_adapter": True, "output_adapter": False},
                        dict(placement="attention", scale=0.5, init="bert")),
}


@pytest.mark.parametrize("case", CASES)
def test_series_block_placements_compute_what_adapterhub_computes(load_tiny, tiny_llama_dir, tmp_path, case):
    """Logits, loss and every weight's gradient to fp32 rounding, from the same weights; and the initial
    weights drawn alike: `bert` both projections N(0, 0.02), `zero` (AdapterHub's mam_adapter) down
    Kaiming-uniform and up zero."""
    config, options, ours_options = CASES[case]
    scale = ours_options.get("scale", 1.0)
    options = {"reduction_factor": 64 / SIZE, "non_linearity": "tanh", "init_weights": "bert",
               "scaling": scale, **options}
    model = load_tiny("none")
    attach_adapters(model, adapter_spec(kind="series", bottleneck_size=SIZE, activation="tanh", dropout=0.0,
                                         **{"scale": 1.0, **ours_options}))
    params = adapter_params(model)
    initial = {name: p.detach().clone() for name, p in params.items()}
    torch.manual_seed(1)
    with torch.no_grad():  # every weight live: the up-projection off zero, a learned scale off 1
        for name, p in params.items():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.2) + (1.0 if p.ndim == 1 else 0.0))
    batch = token_batch(batch=2, length=12, vocab=250)
    model.train()
    out = model(**batch)
    grads = torch.autograd.grad(out.loss, list(params.values()))

    reference, drawn = run_reference(tiny_llama_dir, tmp_path, config, options,
                                     {adapterhub_name(n): p for n, p in params.items()}, batch)
    torch.testing.assert_close(out.logits, reference["logits"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss.reshape(1), reference["loss"], rtol=1e-5, atol=1e-6)
    for (name, p), grad in zip(params.items(), grads):
        theirs = reference[f"grad.{adapterhub_name(name)}"]
        error = ((grad.reshape(theirs.shape) - theirs).norm() / theirs.norm()).item()
        assert error < 1e-4, f"{name}: gradient {error:.1e} apart"
    for name, start in initial.items():
        stats = drawn["initial"][adapterhub_name(name)]
        if stats["max_abs"] == 0 or name.endswith("scale"):
            assert start.abs().max().item() == stats["max_abs"], name
        else:  # the same distribution: spread within 20 % (hundreds of draws each)
            assert start.std().item() == pytest.approx(stats["std"], rel=0.2), name
