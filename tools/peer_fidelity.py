"""The peer a user would pick instead: PEFT + bitsandbytes at the same budget as a qadapt recipe.

    .venv/bin/python tools/peer_fidelity.py recipes/math-lora.yaml [overrides] --out runs/math/peft-lora

PEFT trains the recipe's model, quantized as the recipe says (NF4 / FP4 with or without double
quantization, int8, or none; the compute dtype `auto` picks), with the recipe's kind (LoRA or DoRA,
`use_dora`), rank, alpha, rsLoRA, dropout and targets (the family's default targets when the recipe names
none), started from the very adapter weights qadapt starts the recipe from (its seed, its init), on
exactly the micro-batches qadapt trains on (its templating, masking, held-out slice, seeded order and
grouping by length), for the recipe's steps, with the optimizer the recipe names (LoRA+ through PEFT's
`create_loraplus_optimizer`), transformers' schedule, gradient clipping and the gradient checkpointing
qadapt chooses, and the loss of one large batch: each micro-batch's summed token loss over the step's
target-token count (`num_items_in_batch`, as transformers' Trainer does). Both sides run the same
bitsandbytes kernel (the CPU's bf16 repacking off on both). The adapter is then imported as a qadapt run
directory (`qadapt import-peft`) with a summary.json, and scored with `qadapt eval` on the recipe's eval
sets in fp32 like every sweep run, so `qadapt report` (or a sweep's report, with --out inside the sweep
folder) shows it beside qadapt's runs, paired problem by problem with the run it twins when named
`peft-NAME` beside `NAME`; `--results` keeps its result files as a sweep's. Interrupted, it continues
from its last checkpoint.

Needs peft (the test extra). Series and Parallel adapters have no PEFT twin and are refused.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from qadapt.machine import describe

CHECKPOINT = "checkpoint"


def peft_model(recipe, targets: list[str]):
    """The recipe's base, quantized as the recipe says, with PEFT's LoRA / DoRA, prepared as PEFT's QLoRA
    docs show."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qadapt.errors import QadaptError
    from qadapt.models import resolve_compute_dtype, resolve_model_path
    from qadapt.training.plan import choose_gradient_checkpointing
    from qadapt.quant import disable_cpu_weight_repacking

    from qadapt.adapters.kinds import adapter_kind

    m, a = recipe.model, recipe.adapter
    if adapter_kind(a.kind).peft_options is None:
        raise QadaptError(f"adapter.kind {a.kind}: PEFT has no bottleneck adapters to compare with; lora or dora")
    dtype = resolve_compute_dtype(m.compute_dtype)
    quantization = (None if m.quant == "none" else BitsAndBytesConfig(load_in_8bit=True) if m.quant == "int8" else
                    BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=m.quant,
                                       bnb_4bit_use_double_quant=m.double_quant, bnb_4bit_compute_dtype=dtype))
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(m.name), dtype=dtype,
                                                 quantization_config=quantization,
                                                 device_map={"": 0} if torch.cuda.is_available() else None)
    disable_cpu_weight_repacking(model)  # the kernel qadapt's side runs
    # The same choice qadapt makes (`auto` decided by qadapt plan), so both sides checkpoint alike.
    checkpointing, _ = choose_gradient_checkpointing(recipe, model.device)
    if quantization is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=targets,
                        use_rslora=a.rslora, task_type="CAUSAL_LM", **adapter_kind(a.kind).peft_options)
    return get_peft_model(model, config)


def default_targets(recipe) -> list[str]:
    """The recipe's targets, or the qadapt family table's default for its model."""
    from qadapt.adapters import family_of
    from qadapt.models import meta_model

    return recipe.adapter.targets or list(family_of(meta_model(recipe.model), "LoRA targets").linears)


def initial_adapter(recipe) -> dict[str, torch.Tensor]:
    """The adapter weights `qadapt train` starts the recipe from, by qadapt's names: its seed, then the
    model prepared as its setup prepares it (adapter.start_from included)."""
    from accelerate.utils import set_seed

    from qadapt.adapters import adapter_state_dict
    from qadapt.devices import compute_device
    from qadapt.training.prepare import prepare_model

    set_seed(recipe.train.seed)
    model, _, _ = prepare_model(recipe, compute_device())
    return adapter_state_dict(model)


def peft_optimizer(model, recipe) -> torch.optim.Optimizer:
    """The recipe's optimizer over PEFT's trainable weights; LoRA+ as PEFT builds it."""
    from qadapt.quant import optimizer_class

    t, ratio = recipe.train, recipe.adapter.lr_ratio
    cls = optimizer_class(t.optimizer)
    if ratio != 1:
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(model, cls, lr=t.lr, loraplus_lr_ratio=ratio,
                                         loraplus_weight_decay=t.weight_decay)
    return cls([p for p in model.parameters() if p.requires_grad], lr=t.lr, weight_decay=t.weight_decay)


def peft_scheduler(optimizer, recipe, max_steps: int):
    """transformers' schedule of the recipe's name (qadapt's `constant` warms up too)."""
    from transformers import get_scheduler

    t = recipe.train
    name = "constant_with_warmup" if t.lr_schedule == "constant" else t.lr_schedule
    return get_scheduler(name, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=max_steps)


def step_batches(rows: list[dict], tokenizer, order, recipe, model) -> list[dict]:
    """The micro-batches of qadapt's next optimizer step, drawn as its training loop draws them."""
    from qadapt.tasks import StepSource, task_named

    t = recipe.train
    one_process = SimpleNamespace(num_processes=1, process_index=0, device=model.device)
    drawn = StepSource(rows, tokenizer, one_process, model, recipe)
    return task_named(recipe.task).step_batches(drawn, t.micro_batch_size, t.grad_accum, order, t.group_by_length)


def peft_step(model, micro_batches: list[dict]) -> float:
    """Backward over one step's micro-batches with the loss of one large batch; the step's mean token loss."""
    from qadapt import data as data_lib

    step_tokens = sum(int((b["labels"][:, 1:] != data_lib.IGNORE_INDEX).sum()) for b in micro_batches)
    step_loss = 0.0
    for batch in micro_batches:
        inputs = data_lib.model_inputs(batch)
        loss = model(**inputs, labels=batch["labels"], num_items_in_batch=step_tokens).loss
        loss.backward()
        step_loss += loss.item()
    return step_loss


def train_peft(recipe, work: Path) -> dict:
    """Train (or continue training) the PEFT side into `work`; its figures."""
    from peft import set_peft_model_state_dict

    from qadapt import data as data_lib
    from qadapt.export.peft_format import peft_state
    from qadapt.models import load_tokenizer
    from qadapt.training.train import prepare_data

    t = recipe.train
    initial = initial_adapter(recipe)
    tokenizer = load_tokenizer(recipe.model)
    rows = prepare_data(recipe, tokenizer).train_rows
    model = peft_model(recipe, default_targets(recipe))
    load_peft_state(model, peft_state(initial))
    torch.manual_seed(t.seed)  # dropout
    optimizer = peft_optimizer(model, recipe)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    examples_per_step = t.micro_batch_size * t.grad_accum
    max_steps = t.max_steps or max(1, math.ceil(t.epochs * len(rows) / examples_per_step))
    scheduler = peft_scheduler(optimizer, recipe, max_steps)
    state = {"step": 0, "losses": [], "tokens": 0, "wall_s": 0.0}
    if (work / CHECKPOINT / "state.json").is_file():
        from safetensors.torch import load_file

        state = json.loads((work / CHECKPOINT / "state.json").read_text())
        set_peft_model_state_dict(model, load_file(work / CHECKPOINT / "adapter_model.safetensors"))
        optimizer.load_state_dict(torch.load(work / CHECKPOINT / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(work / CHECKPOINT / "scheduler.pt", weights_only=True))
        print(f"peft: continuing from step {state['step']}")
    order = data_lib.ExampleOrder(len(rows), seed=t.seed, start=state["step"] * examples_per_step)
    model.train()
    started = time.perf_counter() - state["wall_s"]
    for step in range(state["step"], max_steps):
        micro_batches = step_batches(rows, tokenizer, order, recipe, model)
        step_loss = peft_step(model, micro_batches)
        state["tokens"] += sum(int(b["attention_mask"].sum()) for b in micro_batches)
        if t.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"], state["wall_s"] = step + 1, time.perf_counter() - started
        state["losses"].append(step_loss)
        print(f"peft: step {step + 1}/{max_steps} loss {step_loss:.4f} ({state['wall_s'] / (step + 1):.1f} s/step)",
              flush=True)
        if t.save_every and state["step"] % t.save_every == 0 and state["step"] < max_steps:
            _save(work / CHECKPOINT, model, optimizer, scheduler, state)
    model.save_pretrained(work / "adapter")
    trainable = sum(p.numel() for p in params)
    return {"adapter_kind": recipe.adapter.kind, "trainable_params": trainable,
            "total_params": sum(p.numel() for p in model.parameters()), "steps": max_steps,
            "global_batch": examples_per_step, "tokens_seen": state["tokens"], "wall_s": state["wall_s"],
            "s_per_step": state["wall_s"] / max_steps, "first_loss": state["losses"][0],
            "last_loss": state["losses"][-1], "eval_loss": None, "machine": describe(), "losses": state["losses"],
            "trainer": "peft + bitsandbytes", "started_from": "qadapt's initial adapter"}


def load_peft_state(model, state: dict[str, torch.Tensor]) -> None:
    """Load weights under PEFT's saved names; every adapter weight of the model must be among them."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"qadapt's initial adapter does not fit PEFT's model: missing {missing[:3]}, "
                           f"unexpected {result.unexpected_keys[:3]}")


def _save(folder: Path, model, optimizer, scheduler, state: dict) -> None:
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from qadapt.files import atomic_folder

    with atomic_folder(folder) as tmp:
        save_file(get_peft_model_state_dict(model), tmp / "adapter_model.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps(state))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--out", type=Path, required=True, help="the run directory to write (e.g. inside a sweep)")
    parser.add_argument("--eval-dtype", default="fp32")
    parser.add_argument("--results", type=Path, help="also keep the run's result files there (as qadapt sweep "
                                                     "--results does), e.g. docs/results/NAME")
    args = parser.parse_args()

    from qadapt.inference.evaluate import run_eval
    from qadapt.files import atomic_file
    from qadapt.export.peft_format import import_peft
    from qadapt.recipe import load_recipe
    from qadapt.run_dir import RunDir

    recipe = load_recipe(args.recipe, args.overrides)
    out, work = args.out, args.out.with_name(args.out.name + ".peft-train")
    if not RunDir(out).finished():
        summary = train_peft(recipe, work)
        if out.exists():  # an import cut short: made again from the trained adapter
            import shutil

            shutil.rmtree(out)
        import_peft(work / "adapter", out, base=recipe.model.name, quant=recipe.model.quant,
                    template=recipe.data.template)
        losses = summary.pop("losses")
        RunDir(out).training_log.write_text("".join(json.dumps({"step": i, "loss": x}) + "\n"
                                                    for i, x in enumerate(losses, 1)))
        with atomic_file(RunDir(out).summary_file) as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
    e = recipe.eval
    if e.sets:
        run_eval(str(out), e.sets, limit=e.limit, batch_size=e.batch_size, max_new_tokens=e.max_new_tokens,
                 strict=e.strict, out=RunDir(out).eval_dir(), compute_dtype=args.eval_dtype, resume=True)
    if args.results:
        from qadapt.actions.kept_results import keep_results

        print(f"results kept in {keep_results(out, args.results)}")


if __name__ == "__main__":
    main()
