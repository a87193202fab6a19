"""The peer a user would pick instead: PEFT + bitsandbytes QLoRA at the same budget as a qadapt recipe.

    .venv/bin/python tools/peer_fidelity.py recipes/math-lora.yaml [overrides] --out runs/math/peft-lora

PEFT trains the recipe's model, quantized as the recipe says (NF4, double quantization, the compute
dtype `auto` picks), with LoRA of the recipe's rank, alpha, dropout and targets (the family's default
targets when the recipe names none), on exactly the rows qadapt trains on (qadapt's own templating,
masking, held-out slice and seeded order), for the recipe's steps, batch, learning rate, schedule and
warmup, with AdamW, gradient clipping and the gradient checkpointing qadapt chooses for the recipe, the
way PEFT's QLoRA docs write it: the model's own loss per micro-batch, divided by the accumulation
steps. The adapter is then imported as a qadapt run directory (`qadapt import-peft`) with a
summary.json, and scored with `qadapt eval` on the recipe's eval sets in fp32 like every sweep run, so
`qadapt report` (or a sweep's report, with --out inside the sweep folder) shows it beside qadapt's
runs. Interrupted, it continues from its last checkpoint.

Needs peft (the test extra).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from qadapt.machine import describe

CHECKPOINT = "checkpoint"


def peft_model(recipe, targets: list[str]):
    """The recipe's base in 4-bit with PEFT LoRA, prepared as PEFT's QLoRA docs show."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qadapt.models import resolve_compute_dtype, resolve_model_path
    from qadapt.plan import choose_gradient_checkpointing

    m, a = recipe.model, recipe.adapter
    dtype = resolve_compute_dtype(m.compute_dtype)
    quantization = (BitsAndBytesConfig(load_in_8bit=True) if m.quant == "int8" else
                    BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=m.quant,
                                       bnb_4bit_use_double_quant=m.double_quant, bnb_4bit_compute_dtype=dtype))
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(m.name), dtype=dtype,
                                                 quantization_config=quantization,
                                                 device_map={"": 0} if torch.cuda.is_available() else None)
    # The same choice qadapt makes (`auto` decided by qadapt plan), so both sides checkpoint alike.
    checkpointing, _ = choose_gradient_checkpointing(recipe, model.device)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    return get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=targets,
                                            use_rslora=a.rslora, task_type="CAUSAL_LM"))


def default_targets(recipe) -> list[str]:
    """The recipe's targets, or the qadapt family table's default for its model."""
    from qadapt.adapters import family_of
    from qadapt.models import meta_model

    return recipe.adapter.targets or list(family_of(meta_model(recipe.model), "LoRA targets").linears)


def train_peft(recipe, work: Path) -> dict:
    """Train (or continue training) the PEFT side into `work`; its figures."""
    from transformers import get_scheduler

    from qadapt import data as data_lib
    from qadapt.models import load_tokenizer
    from qadapt.training.train import prepare_data

    t = recipe.train
    torch.manual_seed(t.seed)
    tokenizer = load_tokenizer(recipe.model)
    rows = prepare_data(recipe, tokenizer).train_rows
    model = peft_model(recipe, default_targets(recipe))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    examples_per_step = t.micro_batch_size * t.grad_accum
    max_steps = t.max_steps or max(1, math.ceil(t.epochs * len(rows) / examples_per_step))
    scheduler = get_scheduler(t.lr_schedule, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=max_steps)
    state = {"step": 0, "losses": [], "tokens": 0, "wall_s": 0.0}
    if (work / CHECKPOINT / "state.json").is_file():
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = json.loads((work / CHECKPOINT / "state.json").read_text())
        set_peft_model_state_dict(model, load_file(work / CHECKPOINT / "adapter_model.safetensors"))
        optimizer.load_state_dict(torch.load(work / CHECKPOINT / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(work / CHECKPOINT / "scheduler.pt", weights_only=True))
        print(f"peft: continuing from step {state['step']}")
    order = data_lib.example_order(len(rows), seed=t.seed, start=state["step"] * examples_per_step)
    model.train()
    started = time.perf_counter() - state["wall_s"]
    for step in range(state["step"], max_steps):
        step_loss = 0.0
        for _ in range(t.grad_accum):
            batch = data_lib.collate([rows[next(order)] for _ in range(t.micro_batch_size)], tokenizer.pad_token_id)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            loss = model(**batch).loss / t.grad_accum
            loss.backward()
            step_loss += loss.item()
            state["tokens"] += int(batch["attention_mask"].sum())
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
    return {"adapter_kind": "lora", "trainable_params": trainable,
            "total_params": sum(p.numel() for p in model.parameters()), "steps": max_steps,
            "global_batch": examples_per_step, "tokens_seen": state["tokens"], "wall_s": state["wall_s"],
            "s_per_step": state["wall_s"] / max_steps, "first_loss": state["losses"][0],
            "last_loss": state["losses"][-1], "eval_loss": None, "machine": describe(), "losses": state["losses"],
            "trainer": "peft + bitsandbytes"}


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
    args = parser.parse_args()

    from qadapt.inference.evaluate import run_eval
    from qadapt.files import atomic_file
    from qadapt.export.peft_format import import_peft
    from qadapt.recipe import load_recipe
    from qadapt.run_files import SUMMARY_FILE, TRAINING_LOG, eval_dir

    recipe = load_recipe(args.recipe, args.overrides)
    out, work = args.out, args.out.with_name(args.out.name + ".peft-train")
    if not (out / SUMMARY_FILE).is_file():
        summary = train_peft(recipe, work)
        if out.exists():  # an import cut short: made again from the trained adapter
            import shutil

            shutil.rmtree(out)
        import_peft(work / "adapter", out, base=recipe.model.name, quant=recipe.model.quant,
                    template=recipe.data.template)
        losses = summary.pop("losses")
        (out / TRAINING_LOG).write_text("".join(json.dumps({"step": i, "loss": x}) + "\n"
                                                for i, x in enumerate(losses, 1)))
        with atomic_file(out / SUMMARY_FILE) as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
    e = recipe.eval
    if e.sets:
        run_eval(str(out), e.sets, e.limit, e.batch_size, e.max_new_tokens, e.strict, eval_dir(out),
                 compute_dtype=args.eval_dtype, resume=True)


if __name__ == "__main__":
    main()
