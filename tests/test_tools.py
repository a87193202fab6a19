"""The benchmark tools run: tools/gpu_check.py end to end at tiny shape (CPU here), and the others."""

from __future__ import annotations

import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import gpu_check  # noqa: E402


@pytest.mark.slow
def test_gpu_check_runs_the_real_cli_end_to_end_at_tiny_shape(tmp_path, smol_tokenizer):
    """Every phase of tools/gpu_check.py on a CPU at tiny shape: the model folder, qadapt plan, train stopped by
    SIGTERM and resumed, eval, export, merge, the PEFT comparison and the long-sequence probe, with their figures."""
    import json
    import subprocess

    out = tmp_path / "report"
    result = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--shape", "tiny", "--out", str(out),
                             "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    phases = json.loads((out / "gpu-check-tiny.json").read_text())["phases"]
    assert list(phases) == list(gpu_check.PHASES)
    assert phases["plan"]["predicted_allocated_gib"] > 0
    train = phases["train"]
    assert 1 <= train["stopped_after_step"] < 12 and train["steps"] == list(range(1, 13))  # stopped, resumed, done
    assert train["peak_allocated_mb"] > 0 and train["tokens_per_s"] > 0
    assert phases["merge"]["folded_layers"] == 14 and phases["merge"]["vs_adapter_on_same_base"]["top1_agreement"] > 0.95
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(phases["export"]["files"])
    assert phases["eval"]["problems"] == 8 and phases["eval"]["generated_tokens_per_s"] > 0
    assert all(phases["peft"][side]["tokens_per_s"] > 0 for side in ("qadapt", "peft"))
    assert all(phases["peft"][side]["ops_per_step"] > 500 for side in ("qadapt", "peft"))  # a 2-layer model: some thousands
    assert phases["peft"]["probe"] == {**phases["peft"]["probe"], "seq": 1024, "fits": True}
    assert "| train | stopped_after_step:" in (out / "gpu-check-tiny.md").read_text()


@pytest.mark.slow
def test_peer_fidelity_trains_peft_at_the_recipes_budget_and_scores_it_as_a_run(tiny_llama_dir, tmp_path):
    """PEFT + bitsandbytes on the recipe's rows and steps, continued after a stop, then a qadapt run directory
    that qadapt eval and qadapt report read like any run."""
    import shutil
    import subprocess

    import yaml

    from qadapt.actions.report import read_run

    pytest.importorskip("peft")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_llama_dir), "quant": "nf4", "compute_dtype": "fp32"},
        "adapter": {"kind": "dora", "rank": 4, "dropout": 0.0},
        "data": {"max_examples": 32, "val_size": 4},
        "train": {"max_steps": 4, "micro_batch_size": 2, "grad_accum": 2, "warmup_steps": 1, "save_every": 2},
        "eval": {"sets": ["builtin:arithmetic"], "limit": 2, "max_new_tokens": 4},
    }))
    out = tmp_path / "sweep" / "peft-lora"
    work = out.with_name("peft-lora.peft-train")
    kept = tmp_path / "kept"
    command = [sys.executable, str(REPO / "tools" / "peer_fidelity.py"), str(recipe), "--out", str(out),
               "--results", str(kept)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    run = read_run(out)
    assert read_run(kept / "peft-lora")["scores"] == run["scores"]  # its result files kept, as a sweep's
    assert run["summary"]["steps"] == 4 and run["summary"]["trainer"] == "peft + bitsandbytes"
    assert run["recipe"].adapter.kind == "dora" and run["scores"]["arithmetic"]["total"] == 2  # the recipe's kind
    assert len(run["losses"]) == 4

    # As if stopped after the step-2 checkpoint: the run continues from it and ends with the same adapter.
    finished = (work / "adapter" / "adapter_model.safetensors").read_bytes()
    shutil.rmtree(out)
    shutil.rmtree(work / "adapter")
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode == 0 and "peft: continuing from step 2" in again.stdout, again.stderr[-2000:]
    assert (work / "adapter" / "adapter_model.safetensors").read_bytes() == finished
    assert [loss for _, loss in read_run(out)["losses"]] == [loss for _, loss in run["losses"]]


def test_bench_packing_trains_both_sides_and_records_the_ratios(tiny_llama_dir, tmp_path):
    import json
    import subprocess

    from conftest import write_tiny_recipe

    recipe = write_tiny_recipe(tmp_path / "tiny.yaml", tiny_llama_dir, data={"max_examples": 24, "val_size": 4})
    result = subprocess.run([sys.executable, str(REPO / "tools" / "bench_packing.py"), str(recipe), "--steps", "2",
                             "--out", str(tmp_path / "bench"), "--json", str(tmp_path / "packing.json")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads((tmp_path / "packing.json").read_text())
    assert figures["unpacked"]["steps"] == figures["packed"]["steps"] == 2
    # A packed step holds several examples per row: more real tokens in the same number of steps.
    assert figures["packed"]["tokens_seen"] > figures["unpacked"]["tokens_seen"]
    assert set(figures["packed_over_unpacked"]) == {"tokens_per_s", "s_per_step", "peak_memory_mb", "eval_loss"}
    assert figures["machine"]["cpu"] and "cpu_capability" in figures["machine"]
    assert 0 <= figures["packed"]["padding_share"] < figures["unpacked"]["padding_share"] < 1
    assert figures["padding_ceiling"] > 1


def test_bench_sampling_times_both_decoders_on_the_same_prompts(tiny_llama_dir, tmp_path):
    import json
    import subprocess

    data = tmp_path / "problems.json"
    data.write_text(json.dumps([{"instruction": f"What is {n} plus 1?", "input": "", "output": "", "answer": str(n + 1)}
                                for n in range(3)]))
    result = subprocess.run([sys.executable, str(REPO / "tools" / "bench_sampling.py"), "--target", str(tiny_llama_dir),
                             "--data", str(data), "--samples", "2", "--max-new-tokens", "6", "--out",
                             str(tmp_path / "sampling.json")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads((tmp_path / "sampling.json").read_text())
    assert [row["samples"] for row in figures["rows"]] == [6, 6]
    assert set(figures["qadapt_over_plain"]) == {"samples_per_s", "tokens_per_s"}
    assert figures["machine"]["cpu"]


def test_bench_grpo_trains_both_sides_on_the_same_problems_and_records_the_ratios(tiny_llama_dir, tmp_path):
    import json
    import subprocess

    pytest.importorskip("trl", reason="TRL is a test dependency: pip install -e '.[test]'")
    result = subprocess.run([sys.executable, str(REPO / "tools" / "bench_grpo.py"), "--model", str(tiny_llama_dir),
                             "--steps", "2", "--problems", "2", "--grad-accum", "1", "--group-size", "2",
                             "--max-new-tokens", "6", "--json", str(tmp_path / "grpo.json")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads((tmp_path / "grpo.json").read_text())
    for side in ("qadapt", "trl"):
        assert [len(rewards) for rewards in figures[side]["rewards"]] == [2], side
        assert figures[side]["step_s"] > 0 and figures[side]["generated_tokens_per_s"] > 0, side
        assert 0 < figures[side]["mean_answer_tokens"] <= 6 and figures[side]["peak_memory_mb"] > 100, side
    assert {"step_time_ratio", "generation_throughput_ratio", "peak_memory_ratio"} <= set(figures)
    assert figures["machine"]["cpu"]


def test_bench_dpo_trains_both_sides_on_the_same_pairs_and_their_losses_agree(tiny_llama_dir, tmp_path):
    import json
    import math
    import subprocess

    pytest.importorskip("trl", reason="TRL is a test dependency: pip install -e '.[test]'")
    result = subprocess.run([sys.executable, str(REPO / "tools" / "bench_dpo.py"), "--model", str(tiny_llama_dir),
                             "--compute-dtype", "fp32", "--steps", "2", "--pairs-per-step", "2", "--grad-accum", "2", "--lr", "1e-2",
                             "--sft-weight", "0.5",
                             "--gradient-checkpointing", "off", "--json", str(tmp_path / "dpo.json")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads((tmp_path / "dpo.json").read_text())
    for side in ("qadapt", "trl"):
        losses = figures[side]["losses"]
        assert len(losses) == 2 and losses[0] > math.log(2) + 0.1, side  # log 2 plus the chosen answers' NLL
        assert figures[side]["step_s"] > 0 and figures[side]["peak_memory_mb"] > 100, side
    # From the same adapter on the same pairs, step 1's update moves both alike: step 2's losses agree too.
    assert figures["qadapt"]["losses"][1] < figures["qadapt"]["losses"][0] - 1e-3
    # TRL's chosen tokens also hold the newline after <|im_end|>, which qadapt's chat masks leave untrained: the
    # NLL term differs by that one token's share (1.8e-3 here); the DPO term alone agrees to 1e-4.
    assert figures["largest_loss_difference"] < 4e-3
    assert {"step_time_ratio", "peak_memory_ratio"} <= set(figures) and figures["machine"]["cpu"]


def test_peer_bench_peak_memory_is_torchs_allocator_peak_on_a_gpu_and_the_resident_peak_elsewhere(monkeypatch):
    import peer_bench
    import torch

    on_cpu = peer_bench.peak_memory_mb()
    assert on_cpu > 10 and on_cpu == pytest.approx(peer_bench.peak_rss_mb(), rel=0.01)  # this process's VmHWM
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 3 * 2**20)
    assert peer_bench.peak_memory_mb() == 3.0


def test_bench_train_trains_qadapt_as_a_gpu_would_with_lean_cpu_off_and_counts_its_operators(tiny_llama_dir,
                                                                                               monkeypatch):
    """`--lean-cpu off`: qadapt's side without qadapt.lean_cpu's measures (no fused LoRA forward), the model a GPU
    trains; `count_ops` counts what one step dispatches, matrix products included."""
    import bench_train
    import torch

    from qadapt import lean_cpu
    from qadapt.adapters.lora import LoRALinear

    monkeypatch.setattr(lean_cpu, "applies", lean_cpu.applies)  # the option replaces it: put back after the test
    fused, ops = {}, {}
    for lean in ("on", "off"):
        args = bench_train.parse_args(["--model", str(tiny_llama_dir), "--quant", "nf4", "--compute-dtype", "fp32",
                                       "--rank", "4", "--lean-cpu", lean])
        _, model, _, step = bench_train.qadapt_trainer(args)
        fused[lean] = any("forward" in vars(module) for module in model.modules() if isinstance(module, LoRALinear))
        ops[lean] = bench_train.count_ops(step, torch.randint(1, 200, (2, 16)))
    assert fused == {"on": True, "off": False}
    assert all(count["by_op"]["aten.mm"] > 0 and count["total"] == sum(count["by_op"].values())
               for count in ops.values())
