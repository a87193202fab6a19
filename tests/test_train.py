"""The training loop's pieces and a whole run on a tiny random LLaMA in NF4."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SHARED_DATA, token_batch, train_tiny_run

from qadapt import data as D
from qadapt.adapters import adapter_params, attach_adapters
from qadapt.adapters.spec import adapter_spec
from qadapt.recipe import recipe_from_dict
from qadapt.inference.loader import load_trained_model
from qadapt.training.loss import accumulate_gradients, eval_loss
from qadapt.training.train import lr_at, prepare_data, train


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_lr_schedule_is_transformers_schedule_step_for_step(schedule, warmup):
    """Every step's rate equals transformers' get_scheduler (what PEFT and TRL runs use): the same
    warm-up (step s: s/W, so step 0 is 0) and decay; qadapt's constant keeps its warm-up."""
    from transformers import get_scheduler

    steps, lr = 10, 2e-4
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    name = "constant_with_warmup" if schedule == "constant" else schedule
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    for step in range(steps):
        assert lr_at(step, steps, warmup, lr, schedule) == pytest.approx(scheduler.get_last_lr()[0], abs=1e-15), step
        optimizer.step()
        scheduler.step()


def test_accumulation_gives_the_gradient_of_one_large_batch(load_tiny):
    """Loss is normalised by target tokens over the whole step, so 2 micro-batches of 2 rows of
    different lengths give the same gradient as one batch of 4."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    rows = []
    for seed, length in enumerate([5, 9, 14, 7]):
        ids = token_batch(seed=seed, batch=1, length=length)["input_ids"][0].tolist()
        rows.append({"input_ids": ids, "labels": [D.IGNORE_INDEX] * 2 + ids[2:]})

    def gradients(groups):
        torch.manual_seed(0)
        model = load_tiny("nf4")
        attach_adapters(model, adapter_spec(rank=4, dropout=0.0))
        for name, param in adapter_params(model).items():  # non-zero B so that A gets gradients too
            torch.nn.init.normal_(param, std=0.02)
        model.train()
        loss = accumulate_gradients(model, [D.collate(g, pad_id=0) for g in groups], accelerator)
        return loss, {n: p.grad.clone() for n, p in adapter_params(model).items()}

    loss_one, grads_one = gradients([rows])
    loss_two, grads_two = gradients([rows[:2], rows[2:]])
    assert loss_one == pytest.approx(loss_two, rel=1e-5)
    for name in grads_one:
        torch.testing.assert_close(grads_one[name], grads_two[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind, quant, template", [
    ("lora", "nf4", "alpaca"), ("lora", "int8", "chat"), ("dora", "nf4", "alpaca"), ("series", "int8", "alpaca"),
    ("parallel", "nf4", "chat"),
])
def test_a_whole_run_writes_a_run_dir_that_reloads_to_the_same_logits(tiny_llama_dir, tmp_path, kind, quant, template):
    recipe = recipe_from_dict({
        "model": {"name": str(tiny_llama_dir), "quant": quant},
        "adapter": {"kind": kind, "rank": 4, "alpha": 8, "bottleneck_size": 8, "scale": "learned"},
        "data": {"max_examples": 64, "val_size": 8, "template": template},
        "train": {"max_steps": 4, "micro_batch_size": 2, "grad_accum": 2, "lr": 1e-2, "eval_every": 2, "save_every": 2},
        "output_dir": str(tmp_path / "run"),
    })
    result = train(recipe)
    run = tmp_path / "run"
    kept_template = ["chat_template.jinja"] if template == "chat" else []  # the template it trained with
    assert sorted(p.name for p in run.iterdir()) == ["adapter", *kept_template, "checkpoints", "metrics.jsonl",
                                                     "recipe.yaml", "status.json", "summary.json"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 2, 4]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["trainable_params"] == result.summary["trainable_params"] > 0
    assert summary["steps"] == 4 and summary["tokens_seen"] > 0 and summary["peak_memory_mb"] > 0
    assert 0 < summary["cpu_s"] and 0 < summary["wall_s"]
    assert summary["eval_loss_before"] == rows[0]["eval_loss"] and summary["eval_loss"] == rows[-1]["eval_loss"]

    reloaded, tokenizer, saved_recipe = load_trained_model(run)
    assert saved_recipe == recipe
    val_rows = prepare_data(saved_recipe, tokenizer).val_rows
    assert eval_loss(reloaded, val_rows, 2, tokenizer.pad_token_id, reloaded.device) == pytest.approx(
        summary["eval_loss"], rel=1e-6)
    assert not reloaded.training  # eval_loss leaves the mode as it found it
    ids = tokenizer("Maya has 5 apples.", return_tensors="pt")["input_ids"]
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, result.model(input_ids=ids).logits, rtol=0, atol=0)


def test_a_run_reports_to_mlflow_tensorboard_and_wandb_as_metrics_jsonl_says(tmp_path, tiny_llama_dir, monkeypatch):
    """`train.report_to`, through accelerate's trackers, offline: a local MLflow file store, TensorBoard's event
    files in the run directory (both read back), W&B in offline mode; each gets the rows of metrics.jsonl."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store = f"file://{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow-skinny has no database store; a file store it is
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = train_tiny_run(tmp_path / "run", tiny_llama_dir, train={"max_steps": 3, "eval_every": 0, "save_every": 0,
                                                                    "report_to": ["mlflow", "tensorboard", "wandb"]})
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert [step for step, _ in losses] == [1, 2, 3]

    events = EventAccumulator(str(next((run / "tensorboard").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(s, pytest.approx(x, rel=1e-6)) for s, x in losses]

    client = MlflowClient(store)
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("qadapt").experiment_id])
    assert mlflow_run.info.run_name == "run" and mlflow_run.data.params["adapter.kind"] == "lora"
    history = sorted((m.step, m.value) for m in client.get_metric_history(mlflow_run.info.run_id, "loss"))
    assert history == [(s, pytest.approx(x, rel=1e-6)) for s, x in losses]

    (offline,) = (tmp_path / "wandb").glob("offline-run-*")
    assert next(offline.glob("run-*.wandb")).stat().st_size > 0


def test_a_tracker_that_is_not_installed_or_not_known_is_named(monkeypatch):
    from accelerate import utils

    from qadapt.errors import QadaptError
    from qadapt.recipe import recipe_from_dict
    from qadapt.training.trackers import require_installed

    with pytest.raises(QadaptError, match="train.report_to 'wandbb' is not one of tensorboard, wandb, mlflow"):
        recipe_from_dict({"train": {"report_to": ["wandbb"]}})
    monkeypatch.setattr(utils, "is_comet_ml_available", lambda: False)
    with pytest.raises(QadaptError, match="train.report_to comet_ml: not installed here; pip install comet-ml"):
        require_installed(["tensorboard", "comet_ml"])


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_lora_plus_moves_b_at_lr_ratio_times_a(load_tiny, kind):
    """LoRA+: B in its own group at lr_ratio × the lr. Adam's first step moves each weight by about its lr,
    so B (zero at init) moves 16× as far as with one group; A is not in B's group."""
    from qadapt.training.train import param_groups

    def first_b_step(ratio: float) -> float:
        torch.manual_seed(0)
        model = load_tiny("nf4")
        attach_adapters(model, adapter_spec(kind=kind, rank=4, dropout=0.0))
        groups = param_groups(model, ratio)
        assert sum(len(g["params"]) for g in groups) == len(adapter_params(model))
        optimizer = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.0)
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * group["lr_scale"]
        model.train()
        loss = model(**token_batch()).loss
        loss.backward()
        optimizer.step()
        return max(p.abs().max().item() for n, p in adapter_params(model).items() if "lora_b" in n)

    assert first_b_step(16.0) == pytest.approx(16 * first_b_step(1.0), rel=1e-3)


def test_lr_ratio_belongs_to_lora_and_dora():
    from qadapt.errors import QadaptError

    with pytest.raises(QadaptError, match="adapter.lr_ratio applies to lora and dora"):
        recipe_from_dict({"adapter": {"kind": "series", "lr_ratio": 16}})


def test_grouping_rows_by_length_cuts_padding_and_keeps_every_step(tiny_llama_dir, tmp_path):
    """Sorting a step's rows into micro-batches by length changes only the padding: the step's loss is
    normalised over all its tokens, so the losses (and so the updates) stay the same."""
    gsm8k = SHARED_DATA / "gsm8k" / "train.jsonl"
    if not gsm8k.is_file():
        pytest.skip("needs ../shared/data")
    data = tmp_path / "gsm8k-60.jsonl"  # rationales of many lengths
    data.write_text("".join(gsm8k.read_text().splitlines(keepends=True)[:60]))

    def run(group: bool) -> list[dict]:
        train(recipe_from_dict({
            "model": {"name": str(tiny_llama_dir), "quant": "nf4", "compute_dtype": "fp32"},
            "adapter": {"kind": "lora", "rank": 4, "dropout": 0.0},
            "data": {"max_examples": 48, "val_size": 0, "path": str(data)},
            "train": {"max_steps": 3, "micro_batch_size": 2, "grad_accum": 4, "lr": 1e-2, "eval_every": 0,
                      "save_every": 0, "group_by_length": group},
            "output_dir": str(tmp_path / str(group)),
        }))
        return [json.loads(line) for line in (tmp_path / str(group) / "metrics.jsonl").read_text().splitlines()]

    plain, grouped = run(False), run(True)
    assert [r["loss"] for r in grouped] == pytest.approx([r["loss"] for r in plain], rel=1e-5)
    assert sum(r["padding_share"] for r in grouped) < 0.6 * sum(r["padding_share"] for r in plain)


def test_a_run_starts_from_another_runs_adapter(tiny_llama_dir, tmp_path):
    from conftest import train_tiny_run
    from qadapt.errors import QadaptError

    first = train_tiny_run(tmp_path / "first", tiny_llama_dir, train={"max_steps": 2}, data={"val_size": 4})
    second = train_tiny_run(tmp_path / "second", tiny_llama_dir, train={"max_steps": 1}, data={"val_size": 4},
                            adapter={"start_from": str(first)})
    # The same held-out rows: the second run's loss before its first step is the first run's at its end.
    before = json.loads((second / "summary.json").read_text())["eval_loss_before"]
    assert before == pytest.approx(json.loads((first / "summary.json").read_text())["eval_loss"], rel=1e-6)
    with pytest.raises(QadaptError, match=f"adapter.start_from {first / 'adapter'}: adapter weight .* has shape"):
        train_tiny_run(tmp_path / "third", tiny_llama_dir, adapter={"start_from": str(first), "rank": 8})
    with pytest.raises(QadaptError, match="adapter.start_from: no run or adapter folder at"):
        train_tiny_run(tmp_path / "fourth", tiny_llama_dir, adapter={"start_from": str(tmp_path / "nowhere")})
