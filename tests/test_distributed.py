"""Two processes under `accelerate launch` (gloo on the CPU) train as one process with the same global batch."""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, write_pairs_file, write_tiny_recipe
from safetensors.torch import load_file

from qadapt.run_dir import RunDir


# Two processes sum a gradient in another order than one; Adam divides each update by the gradient's own
# size, so for a weight whose gradient is near zero that rounding becomes a visible fraction of lr (1e-2).
# Measured on an AVX512 Xeon: one weight of 512 off by 1.3e-6 after 4 steps (the losses agree to 1e-6).
ADAM_ATOL = 1e-5


def launch(processes: int, recipe: Path, *args: str) -> str:
    """`python -m qadapt train` for one process, `accelerate launch --multi_gpu` (torchrun) for more."""
    command = [sys.executable, "-m", "qadapt", "train", str(recipe), *args]
    if processes > 1:
        with socket.socket() as probe:  # a free port, so that parallel runs never collide
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--main_process_port", str(port), "-m", "qadapt", "train", str(recipe), *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=recipe.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def write_recipe(folder: Path, model: str, compute_dtype: str, data: dict | None = None, task: str = "causal-lm",
                 grpo: dict | None = None, **train) -> Path:
    return write_tiny_recipe(folder / "recipe.yaml", model, model={"compute_dtype": compute_dtype},
                             adapter={"alpha": 8, "dropout": 0.0},  # each process draws its own dropout masks
                             data={"max_examples": 64, "val_size": 4, "cutoff_len": 96, **(data or {})},
                             train={"lr": 1e-2, "warmup_steps": 1, **train}, task=task,
                             **({"grpo": grpo} if grpo else {}))


def metric_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> list[float]:
    return [row["loss"] for row in metric_rows(run) if "loss" in row]


def compare_one_and_two_processes(tmp_path: Path, model: str, compute_dtype: str, steps: int, micro: int,
                                  data: dict | None = None, task: str = "causal-lm", grpo: dict | None = None,
                                  **train) -> tuple:
    """Losses and adapters of one process (micro x 4) and of two (micro x 2 each): the same global batch."""
    one = write_recipe(tmp_path, model, compute_dtype, data, task, grpo, max_steps=steps, micro_batch_size=micro,
                       grad_accum=4, **train)
    launch(1, one, f"output_dir={tmp_path / 'one'}")
    two = write_recipe(tmp_path, model, compute_dtype, data, task, grpo, max_steps=steps, micro_batch_size=micro,
                       grad_accum=2, **train)
    output = launch(2, two, f"output_dir={tmp_path / 'two'}")
    assert f"steps: {steps} of {4 * micro} examples (2 processes)" in output
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_batch"] == 4 * micro
    adapters = [load_file(RunDir(tmp_path / run).adapter.weights_file) for run in ("one", "two")]
    return losses(tmp_path / "one"), losses(tmp_path / "two"), adapters


@pytest.mark.slow
def test_two_processes_match_one_on_a_tiny_model_and_resume(tiny_llama_dir, tmp_path):
    one, two, (adapter_one, adapter_two) = compare_one_and_two_processes(tmp_path, str(tiny_llama_dir), "fp32", 4,
                                                                         micro=2, save_every=2)
    assert len(one) == len(two) == 4
    assert two == pytest.approx(one, rel=1e-6)
    assert adapter_one.keys() == adapter_two.keys()
    for name in adapter_one:
        torch.testing.assert_close(adapter_two[name], adapter_one[name], rtol=1e-4, atol=ADAM_ATOL)

    # Resume with the same number of processes: drop what the run did after its step-2 checkpoint.
    run = tmp_path / "two"
    shutil.rmtree(RunDir(run).adapter.path)
    (run / "summary.json").unlink()
    output = launch(2, tmp_path / "recipe.yaml", f"output_dir={run}", "--resume")
    assert "resume: continuing from" in output and "step-000002" in output
    assert losses(run) == pytest.approx(two, abs=1e-6)


@pytest.mark.slow
def test_two_processes_match_one_with_packed_rows(tiny_llama_dir, tmp_path):
    # Each process takes its share of the same packed rows; their padding shares are logged per step.
    one, two, (adapter_one, adapter_two) = compare_one_and_two_processes(
        tmp_path, str(tiny_llama_dir), "fp32", 3, micro=1, data={"packing": True, "cutoff_len": 256})
    assert len(one) == len(two) == 3
    assert two == pytest.approx(one, rel=1e-6)
    for name in adapter_one:
        torch.testing.assert_close(adapter_two[name], adapter_one[name], rtol=1e-4, atol=ADAM_ATOL)
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= row["padding_share"] < 1 for row in rows if "loss" in row)


@pytest.mark.slow
def test_two_processes_match_one_on_the_embedded_model_in_nf4(tmp_path):
    # fp32 compute: in bf16 the gradients' other summation order (two halves, then all-reduce) moves the
    # adapters by float noise, which bf16 activations round into loss differences of ~0.3% by step 3.
    # Two steps: the second loss is computed with the adapters the first step's all-reduced gradients moved.
    one, two, (adapter_one, adapter_two) = compare_one_and_two_processes(tmp_path, "smollm2-135m", "fp32", 2, micro=2)
    assert two == pytest.approx(one, rel=2e-5)  # measured over 3 steps: 5e-6
    # Adam's first steps move each weight by about lr whatever the gradient's size, so a gradient within
    # float noise of zero can go either way: measured 93 of 1,221,120 weights off by more than 1e-4.
    total = sum(t.numel() for t in adapter_one.values())
    off = sum(int(((adapter_two[n] - adapter_one[n]).abs() > 1e-4).sum()) for n in adapter_one)
    assert adapter_one.keys() == adapter_two.keys() and off < total * 1e-3
    worst = max(float((adapter_two[n] - adapter_one[n]).norm() / adapter_one[n].norm()) for n in adapter_one)
    assert worst < 1e-2  # measured over 3 steps: 3.6e-3, in the least-trained matrix


@pytest.mark.slow
def test_two_processes_sample_and_train_grpo_as_one(tiny_llama_dir, tmp_path):
    """task grpo: each process samples its share of the step's problems (each answer from its own seeded
    stream), the loss is normalised over both; two steps over one rollout (grpo.iterations 2) give the one
    process's losses and adapter."""
    # A reward the tiny random model's answers differ in (it never ends one, so `length` would be one value),
    # in the runs' working folder: `python -m` puts it on the path of every process.
    (tmp_path / "word_rewards.py").write_text(
        "def long_words(prompts, completions, answers):\n"
        "    return [sum(map(len, text.split())) / max(1, len(text.split())) for text in completions]\n")
    grpo = {"group_size": 4, "max_new_tokens": 10, "rewards": ["word_rewards:long_words", "correct"], "iterations": 2,
            "beta": 0.05}
    one, two, (adapter_one, adapter_two) = compare_one_and_two_processes(
        tmp_path, str(tiny_llama_dir), "fp32", 2, micro=1, task="grpo", grpo=grpo, warmup_steps=0,
        data={"path": "builtin:arithmetic", "max_examples": 16, "val_size": 0})
    assert len(one) == len(two) == 2 and one[1] != one[0]
    assert two == pytest.approx(one, rel=1e-5, abs=1e-7)
    for name in adapter_one:
        torch.testing.assert_close(adapter_two[name], adapter_one[name], rtol=1e-4, atol=ADAM_ATOL)


@pytest.mark.slow
def test_two_processes_train_preference_pairs_as_one(tiny_llama_dir, tmp_path):
    """task preference: each process scores the reference of every pair before step 1 and trains on its share of
    the step's pairs; the held-out DPO loss and the adapters equal one process's."""
    data = {"path": str(write_pairs_file(tmp_path, count=20)), "max_examples": None, "val_size": 4}
    one, two, (adapter_one, adapter_two) = compare_one_and_two_processes(
        tmp_path, str(tiny_llama_dir), "fp32", 2, micro=1, task="preference", data=data, warmup_steps=0)
    assert len(one) == len(two) == 2 and one[0] == pytest.approx(math.log(2), abs=1e-6) and one[1] != one[0]
    assert two == pytest.approx(one, rel=1e-5, abs=1e-7)
    held_out = [[row["eval_loss"] for row in metric_rows(tmp_path / run) if "eval_loss" in row] for run in ("one", "two")]
    assert len(held_out[0]) == 2 and held_out[1] == pytest.approx(held_out[0], rel=1e-5)
    for name in adapter_one:
        torch.testing.assert_close(adapter_two[name], adapter_one[name], rtol=1e-4, atol=ADAM_ATOL)


GLOO_TRANSPORT_FLAKE = "Received data size doesn't match expected size"


def launch_worker(processes: int, model_dir: Path, out: Path, kind: str) -> dict:
    def run_once():
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(port), str(Path(__file__).parent / "fsdp_worker.py"), str(model_dir),
                   str(out), kind]
        return subprocess.run(command, capture_output=True, text=True)

    result = run_once()
    if result.returncode != 0 and GLOO_TRANSPORT_FLAKE in result.stderr:
        # Seen once in ~20 CI runs, never in dozens here: gloo's TCP transport (2 cores, busy) delivered one
        # op's bytes to another's buffer. A real collective mismatch in our code repeats; this did not.
        result = run_once()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dora"])  # DoRA: LoRA's A and B, and a trained vector beside the frozen layer
def test_fsdp_sharded_4bit_base_trains_as_one_process(tiny_llama_dir, tmp_path, kind):
    """FSDP + QLoRA with qadapt's storage dtype and wrap policy, on 2 CPU processes (see fsdp_worker.py)."""
    one = launch_worker(1, tiny_llama_dir, tmp_path / "one", kind)
    two = launch_worker(2, tiny_llama_dir, tmp_path / "two", kind)
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-6)
    assert two["reloaded_equal"] and two["optimizer_states"] == one["optimizer_states"] > 0
    adapter_one, adapter_two = (load_file(tmp_path / run / "adapter.safetensors") for run in ("one", "two"))
    assert adapter_one.keys() == adapter_two.keys()
    for name in adapter_one:
        torch.testing.assert_close(adapter_two[name], adapter_one[name], rtol=1e-4, atol=ADAM_ATOL)


@pytest.mark.parametrize("kind", ["lora", "dora", "series", "parallel"])
def test_every_fsdp_unit_is_all_frozen_or_all_trained(load_tiny, kind):
    from qadapt.adapters import attach_adapters
    from qadapt.training.distributed import fsdp_units
    from qadapt.recipe import adapter_section

    model = load_tiny("nf4")
    attach_adapters(model, adapter_section(dict(kind=kind, rank=4, bottleneck_size=8, scale="learned"), "adapter"))
    units = fsdp_units(model) | {id(model)}  # FSDP always wraps the root

    def own_parameters(unit):  # what FSDP flattens into this unit: its subtree minus nested units
        found = list(unit.parameters(recurse=False))
        for child in unit.children():
            if id(child) not in units:
                found += own_parameters(child)
        return found

    trained_units = 0
    for module in model.modules():
        if id(module) in units:
            flags = {p.requires_grad for p in own_parameters(module)}
            assert len(flags) <= 1, f"{type(module).__name__} mixes frozen and trained parameters"
            trained_units += flags == {True}
    assert trained_units > 0


@pytest.mark.slow
def test_fsdp_loads_the_base_on_rank_0_alone_and_the_others_get_it_whole(tiny_llama_dir, tmp_path):
    """tools/fsdp_loading.py on two gloo ranks, the way FSDP loads with cpu-ram-efficient loading: rank 1 holds
    no weight after loading (its 4-bit layers only their quantization states, sent by rank 0), and once
    every weight is broadcast from rank 0 (what FSDP's sync_module_states does) it computes rank 0's logits
    exactly. The embedded model's figures are in docs/benchmarks/distributed.md."""
    out = tmp_path / "fsdp.json"
    result = subprocess.run([sys.executable, str(REPO / "tools" / "fsdp_loading.py"), "--model", str(tiny_llama_dir),
                             "--ways", "rank-0", "--json", str(out), "--scratch", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank_0, rank_1 = json.loads(out.read_text())["rank-0"]
    assert rank_0["real_tensor_mb"] > 1 and rank_1["real_tensor_mb"] == 0
    assert rank_0["logits_equal_rank_0"] and rank_1["logits_equal_rank_0"]
