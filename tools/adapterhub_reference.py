"""Reference outputs and gradients of AdapterHub's bottleneck adapters, for qadapt's tests to compare with.

    .venv-adapterhub/bin/python tools/adapterhub_reference.py MODEL_DIR CASE_DIR

Runs in the environment tools/adapterhub_env.sh builds (AdapterHub's `adapters` library pins transformers
4.57; qadapt's .venv has transformers 5), and imports nothing of qadapt. CASE_DIR/case.json names the
configuration (`houlsby`: DoubleSeqBnConfig, `pfeiffer`: SeqBnConfig, `parallel`: ParBnConfig) and its
options (reduction_factor, non_linearity, init_weights, scaling, original_ln_before, ...);
CASE_DIR/inputs.safetensors holds input_ids, attention_mask and labels, and the adapter weights to use, by
AdapterHub's parameter names (weights the case does not give keep their initial values: biases, zero).

Writes CASE_DIR/reference.safetensors (logits, loss, and the gradient of every given weight under
`grad.NAME`) and CASE_DIR/reference.json: the adapter's parameter names, and for each the mean, standard
deviation and largest magnitude it was initialised with (what `init_weights` draws).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main(model_dir: str, case_dir: str) -> None:
    import adapters
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    case = Path(case_dir)
    spec = json.loads((case / "case.json").read_text())
    inputs = load_file(case / "inputs.safetensors")
    torch.manual_seed(spec.get("seed", 0))
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    adapters.init(model)
    configs = {"houlsby": adapters.DoubleSeqBnConfig, "pfeiffer": adapters.SeqBnConfig,
               "parallel": adapters.ParBnConfig}
    model.add_adapter("reference", config=configs[spec["config"]](**spec["options"]))
    model.train_adapter("reference")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    initial = {name: {"mean": p.mean().item(), "std": p.std().item() if p.numel() > 1 else 0.0,
                      "max_abs": p.abs().max().item(), "shape": list(p.shape)} for name, p in params.items()}
    given = {name[len("weight."):]: tensor for name, tensor in inputs.items() if name.startswith("weight.")}
    unknown = sorted(given.keys() - params.keys())
    if unknown:
        raise SystemExit(f"no adapter parameter named {unknown[:3]}; the adapter's are {sorted(params)[:8]}")
    with torch.no_grad():
        for name, tensor in given.items():
            params[name].copy_(tensor)
    model.train()
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["labels"])
    out.loss.backward()
    results = {"logits": out.logits.detach().contiguous(), "loss": out.loss.detach().reshape(1)}
    results |= {f"grad.{name}": params[name].grad.contiguous() for name in given}
    save_file(results, case / "reference.safetensors")
    (case / "reference.json").write_text(json.dumps({"initial": initial}, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:])
