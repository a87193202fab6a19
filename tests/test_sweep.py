"""`qadapt sweep`: grids, names, and a real tiny sweep that is stopped, continued, fails a run and reports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import write_tiny_recipe

from qadapt.errors import QadaptError, TrainingStopped
from qadapt.recipe import load_recipe
from qadapt.actions.sweep import _died, _run_job, expand_grids, run_name, split_values, sweep


def test_grids_expand_to_their_cross_product_first_grid_slowest():
    assert expand_grids(["adapter.kind=lora,dora", "train.lr=1e-3,3e-4"]) == [
        ["adapter.kind=lora", "train.lr=1e-3"], ["adapter.kind=lora", "train.lr=3e-4"],
        ["adapter.kind=dora", "train.lr=1e-3"], ["adapter.kind=dora", "train.lr=3e-4"],
    ]
    assert expand_grids([]) == [[]]
    with pytest.raises(QadaptError, match="not of the form"):
        expand_grids(["adapter.kind"])


def test_commas_inside_lists_and_mappings_stay_in_one_value():
    assert split_values("[q_proj,v_proj],{kind: series, placement: mlp},3") == [
        "[q_proj,v_proj]", "{kind: series, placement: mlp}", "3"]


def test_run_names_come_from_the_grid_values():
    assert run_name(["adapter.kind=dora", "train.lr=1e-3"]) == "kind-dora_lr-1e-3"
    assert run_name(["adapter.targets=[q_proj,v_proj]"]) == "targets-q_proj-v_proj"
    assert run_name(["adapter={kind: series, placement: attention}"]) == "series-attention"
    assert run_name(["adapter={kind: lora, rank: 32, targets: [q_proj, v_proj]}"]) == "lora_rank-32_targets-q_proj-v_proj"
    assert run_name(["adapter.dropout=0.1", "train.dropout=0.2"]) == "adapter.dropout-0.1_train.dropout-0.2"


def test_a_mapping_override_sets_keys_of_its_section_and_keeps_the_others(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"adapter": {"kind": "lora", "rank": 4, "bottleneck_size": 8}}))
    recipe = load_recipe(path, ["adapter={kind: series, placement: attention}"])
    assert (recipe.adapter.kind, recipe.adapter.placement, recipe.adapter.bottleneck_size) == ("series", "attention", 8)
    recipe = load_recipe(path, ["adapter={kind: dora, alpha: 8}"])
    assert (recipe.adapter.kind, recipe.adapter.rank, recipe.adapter.alpha) == ("dora", 4, 8)


def test_a_typo_in_any_run_fails_before_anything_trains(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("adapter: {kind: lora}\n")
    with pytest.raises(QadaptError, match="adapter.kind"):
        sweep(path, ["adapter.kind=lora,lorra"], [], tmp_path / "sweep")
    with pytest.raises(QadaptError, match="--eval-dtype 'fp64' is not one of auto, bf16, fp16, fp32"):
        sweep(path, ["adapter.kind=lora"], [], tmp_path / "sweep", eval_dtype="fp64")
    assert not (tmp_path / "sweep").exists()


def test_a_jobs_error_is_read_from_its_result_file_and_a_killed_one_is_named(tmp_path, capfd):
    """The sweep reads a job's structured result, not its screen; a job killed before it could write one
    (no result file) is recorded by its signal."""
    log = tmp_path / "logs" / "run.train.log"
    job = {"action": "train", "recipe": "recipes/quickstart.yaml", "resume": False,
           "overrides": ["model.name=/no/such/model", f"output_dir={tmp_path}/run"]}
    assert _run_job(job, log) == "model folder not found: /no/such/model"
    assert json.loads(log.with_suffix(".result.json").read_text())["status"] == "failed"
    assert "error: model folder not found" in log.read_text()  # the log keeps what the job printed
    assert _died(-signal.SIGKILL, log) == "killed by SIGKILL (the system may have run out of memory)"
    assert _died(-signal.SIGSEGV, log) == "killed by SIGSEGV"
    assert _died(1, log) == f"exited with code 1 before writing its result; see {log}"


def _tiny_recipe(tiny_llama_dir, tmp_path):
    return write_tiny_recipe(tmp_path / "tiny.yaml", tiny_llama_dir, model={"compute_dtype": "fp32"},
                             adapter={"kind": "lora"}, data={"max_examples": 32, "val_size": 4},
                             train={"max_steps": 6, "warmup_steps": 0, "save_every": 2, "lr": 1e-3},
                             eval={"sets": ["builtin:arithmetic"], "limit": 2, "max_new_tokens": 4})


def test_a_sweep_stopped_while_its_run_is_starting_stops_and_records_no_failure(tiny_llama_dir, tmp_path):
    """SIGTERM reaches the run before it has installed its own handlers: it dies of the signal (-15).

    That is a stop, not a failure: the sweep exits 143 and the run stays pending for the next call.
    """
    recipe = _tiny_recipe(tiny_llama_dir, tmp_path)
    out = tmp_path / "sweep"
    sweep_process = subprocess.Popen([sys.executable, "-m", "qadapt", "sweep", str(recipe), "--grid",
                                      "train.lr=1e-3", "--out", str(out)], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
    train_log = out / "logs" / "lr-1e-3.train.log"
    deadline = time.monotonic() + 60
    while not train_log.is_file() and sweep_process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert train_log.is_file(), sweep_process.communicate()[0].decode()[-3000:]
    sweep_process.send_signal(signal.SIGTERM)  # the run is still importing torch
    output = sweep_process.communicate(timeout=120)[0].decode()
    assert sweep_process.returncode == 143 and "run the same qadapt sweep command again" in output, output[-3000:]
    run = json.loads((out / "sweep.json").read_text())["runs"][0]
    assert run["status"] == "pending" and run["error"] is None


def test_a_sweep_stops_continues_records_a_failure_and_reports(tiny_llama_dir, tmp_path):
    """Two runs on a tiny NF4 LLaMA (the second diverges) and the untrained base, scored on 2 problems.

    The sweep is stopped by SIGTERM after the first run's first checkpoint; the same command resumes
    that run from it, records the failure and writes the report; a third call does nothing.
    """
    recipe = _tiny_recipe(tiny_llama_dir, tmp_path)
    out = tmp_path / "sweep"
    args = [str(recipe), "--grid", "train.lr=1e-3,1e30", "--out", str(out), "--baseline"]
    first = subprocess.Popen([sys.executable, "-m", "qadapt", "sweep", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
    checkpoint = out / "lr-1e-3" / "checkpoints" / "step-000002" / "trainer_state.json"
    deadline = time.monotonic() + 240
    while not checkpoint.is_file() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert checkpoint.is_file(), first.communicate()[0].decode()[-3000:]
    os.killpg(first.pid, signal.SIGTERM)  # as a cluster's time limit would: the sweep and its run
    output = first.communicate(timeout=120)[0].decode()
    assert first.returncode == 143 and "run the same qadapt sweep command again" in output, output[-3000:]
    assert not (out / "lr-1e-3" / "summary.json").exists()

    kept = tmp_path / "docs-results"
    sweep(recipe, ["train.lr=1e-3,1e30"], [], out, baseline=True, results=kept)
    state = json.loads((out / "sweep.json").read_text())
    runs = {r["name"]: r for r in state["runs"]}
    assert runs["lr-1e-3"]["status"] == "done"
    assert runs["lr-1e30"]["status"] == "failed" and "training diverged" in runs["lr-1e30"]["error"]
    train_log = (out / "logs" / "lr-1e-3.train.log").read_text()
    assert "resume: continuing from" in train_log and "(step " in train_log
    losses = [json.loads(line) for line in (out / "lr-1e-3" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in losses if "loss" in row] == [1, 2, 3, 4, 5, 6]  # none lost, none twice
    report = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in report["runs"]] == ["base", "lr-1e-3"]
    score = report["runs"][1]["scores"]["arithmetic"]
    assert score["total"] == 2 and score["low"] <= score["score"] <= score["high"]
    assert "base (untrained)" in (out / "report.md").read_text()

    logs = {p.name: p.stat().st_mtime_ns for p in (out / "logs").iterdir()}
    sweep(recipe, ["train.lr=1e-3"], [], out)  # another grid into the same folder: its run is done already
    assert {p.name: p.stat().st_mtime_ns for p in (out / "logs").iterdir()} == logs

    # The kept results (no weights) count as done elsewhere: a fresh folder trains and scores nothing.
    assert sorted(p.name for p in (kept / "lr-1e-3").rglob("*") if p.is_file()) == [
        "metrics.json", "metrics.jsonl", "recipe.yaml", "summary.json"]
    elsewhere = tmp_path / "elsewhere"
    table = sweep(recipe, ["train.lr=1e-3"], [], elsewhere, baseline=True, results=kept)
    assert not (elsewhere / "lr-1e-3").exists() and not (elsewhere / "base").exists()
    assert "| lr-1e-3 | lora |" in table and "| base |" in table and "| lr-1e-3 | base |" in table  # paired

    # The recipe changed since: the finished run trained another model, so it is named and left out.
    table = sweep(recipe, ["train.lr=1e-3"], ["adapter.rank=8"], out)
    run = json.loads((out / "sweep.json").read_text())["runs"][0]
    assert run["status"] == "failed" and run["error"].startswith("trained with another recipe (adapter.rank: 4 -> 8)")
    assert "| base |" in table and "lr-1e-3" not in table
    assert {p.name: p.stat().st_mtime_ns for p in (out / "logs").iterdir()} == logs


def test_a_signal_while_a_command_starts_is_passed_on_to_it(tmp_path, monkeypatch):
    """SIGTERM after the log is opened but before the command exists: it reaches the command once it runs."""
    real_popen = subprocess.Popen

    def signalled_then_started(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_popen(*args, **kwargs)

    def unforwarded(signum, frame):
        raise AssertionError("SIGTERM reached the sweep's own handler, not the forwarding one")

    monkeypatch.setattr(subprocess, "Popen", signalled_then_started)
    previous = signal.signal(signal.SIGTERM, unforwarded)
    try:
        with pytest.raises(TrainingStopped) as stopped:
            _run_job({"action": "train", "recipe": "recipes/quickstart.yaml", "overrides": [], "resume": False},
                     tmp_path / "train.log")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.exit_code == 143
