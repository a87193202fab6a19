"""The one way a model is loaded for inference: a run directory as it was trained, or a bare base.

Every reader of a trained model (eval, generate, chat, merge, export, the adapter bank, the tools) comes
here, so the rules live in one place: the base is quantized from the dtype it was trained in (the same
4-bit codes), bitsandbytes' CPU weight repacking stays off (the kernels training used, so the numbers it
produced), the task decides the tokenizer and the head, and the adapter must match the base it was
trained on. A model goes on the GPU when there is one (quantized or not), else the CPU, where what
pays only there (fused LoRA, a 4-bit base unpacked for decoding) comes through qadapt.lean_cpu.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import get_args

from torch import nn

from qadapt import lean_cpu
from qadapt.adapters import attach_adapters
from qadapt.base_identity import base_identity
from qadapt.devices import compute_device
from qadapt.errors import QadaptError
from qadapt.recipe import DType, ModelConfig, Quant, Template
from qadapt.run_dir import AdapterFolder, RunDir, run_of
from qadapt.tasks import DEFAULT_TASK, LoadedModel, task_named, task_of_adapter, task_of_target


def head_labels(folder: AdapterFolder) -> list[str] | None:
    """The labels of the head an adapter folder carries (in logit order), None when its task adds none
    (and for a bare weights file without a config, as causal-LM adapters once were written)."""
    config = folder.config if folder.has_config() else {}
    return task_of_adapter(config).head_labels(config, str(folder.config_file))


def load_frozen_base(cfg: ModelConfig, labels: list[str] | None = None,
                     compute_dtype: str | None = None) -> tuple[nn.Module, dict]:
    """(model, its identity): a base as training saw it, frozen, in eval mode, repacking off.

    `compute_dtype` overrides the config's (fp32 gives answers that do not depend on the batch); the
    identity is taken as loaded, as training recorded it. `labels` gives it a token-classification head.
    """
    from qadapt.models import load_base, resolve_compute_dtype
    from qadapt.quant import disable_cpu_weight_repacking, set_compute_dtype

    if compute_dtype and cfg.quant == "none":  # no quantized codes to keep: load straight in the dtype
        cfg = dataclasses.replace(cfg, compute_dtype=compute_dtype)
    # Quantized from the dtype it was trained in: the same 4-bit codes.
    model = load_base(cfg, compute_device(), labels=labels)
    identity = base_identity(model, cfg.name)
    disable_cpu_weight_repacking(model)  # the same kernels, so the same numbers, as in training
    if compute_dtype:
        set_compute_dtype(model, resolve_compute_dtype(compute_dtype))
    model.eval()
    return model, identity


def load_trained_model(run_dir: str | Path | RunDir, compute_dtype: str | None = None):
    """(model, tokenizer, recipe): the run's base, quantized as trained, with its adapter loaded.

    `compute_dtype` overrides the recipe's (e.g. fp32 for answers that do not depend on the batch).
    """
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    recipe = run.trained_recipe
    tokenizer = task_named(recipe.task).run_tokenizer(recipe, run.path)
    model, base = load_frozen_base(recipe.model, head_labels(run.adapter), compute_dtype)
    attach_adapters(model, recipe.adapter)
    run.adapter.load_into(model, base)
    if lean_cpu.applies(compute_device()):
        lean_cpu.for_answering(model)  # LoRA computed as training computed it on this CPU: the same numbers
    model.eval()
    return model, tokenizer, recipe


def load_target(target: str | RunDir, quant: str = "nf4", template: str | None = None,
                compute_dtype: str | None = None, unpack: bool = True) -> LoadedModel:
    """A run directory (its base as trained, its adapter, its template) or a bare model, ready to answer.

    `unpack`: on a CPU, unpack a 4-bit base for decoding when memory allows (lean_cpu.unpack_for_decoding).
    bf16 matmuls give slightly different results for different batch shapes, so a bf16 model's
    greedy answers can depend on which problems share its batch; compute_dtype fp32 avoids that.
    """
    check_load_options(quant, template, compute_dtype)
    run = require_answering_run(target)
    if run is not None:
        model, tokenizer, recipe = load_trained_model(run, compute_dtype=compute_dtype)
        loaded = LoadedModel(model, tokenizer, template or recipe.data.template, recipe.data.cutoff_len)
    else:
        cfg = ModelConfig(name=str(target), quant=quant, compute_dtype=compute_dtype or "auto")
        tokenizer = DEFAULT_TASK.load_tokenizer(cfg)
        model, _ = load_frozen_base(cfg)  # the kernels training uses, so a baseline compares like with like
        loaded = LoadedModel(model, tokenizer, template or "alpaca", None)
    if unpack and lean_cpu.applies(compute_device()):
        lean_cpu.unpack_for_decoding(loaded.model)
    return loaded


def load_for_scoring(target: str | RunDir, quant: str = "nf4", template: str | None = None,
                     compute_dtype: str | None = None) -> LoadedModel:
    """What `qadapt eval` scores: a run directory of any task, or a bare model (load_target)."""
    target = run_of(target) or target
    if task_of_target(target).generates:
        return load_target(target, quant, template, compute_dtype)
    model, tokenizer, recipe = load_trained_model(target, compute_dtype=compute_dtype)
    return LoadedModel(model, tokenizer, recipe.data.template, recipe.data.cutoff_len)


def check_load_options(quant: str, template: str | None, compute_dtype: str | None) -> None:
    for option, value, allowed in [("--quant", quant, Quant), ("--template", template, Template),
                                   ("--compute-dtype", compute_dtype, DType)]:
        if value is not None and value not in get_args(allowed):
            raise QadaptError(f"{option} {value!r} is not one of {', '.join(get_args(allowed))}")


def require_answering_run(target: str | RunDir) -> RunDir | None:
    """A run that answers prompts (None for a bare model); a tagging run is refused."""
    run = run_of(target)
    if run is None:
        return None
    task = task_named(run.trained_recipe.task)
    if not task.generates:
        raise QadaptError(f"{run.path} is a {task.name} run: it tags words and does not answer prompts; "
                          "score it with qadapt eval RUN_DIR --data CONLL_FILE")
    return run
