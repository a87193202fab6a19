"""Reliability: kill a real training process and resume it exactly; broken checkpoints are never used."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import write_tiny_recipe

from qadapt.errors import QadaptError
from qadapt.recipe import load_recipe
from qadapt.run_dir import CheckpointFolder, RunDir
from qadapt.run_state import state_of
from qadapt.training.train import train

STEPS = 10


def write_recipe(folder: Path, model_dir: Path, **train_options) -> Path:
    return write_tiny_recipe(
        folder / "recipe.yaml", model_dir, folder / "run", model={"compute_dtype": "fp32"},
        adapter={"alpha": 8, "dropout": 0.1},  # dropout: the random state must be restored too
        data={"max_examples": 128, "val_size": 4, "cutoff_len": 96},
        train={"max_steps": STEPS, "grad_accum": 2, "lr": 1e-2, "warmup_steps": 2, "eval_every": 5, "save_every": 2,
               "keep_checkpoints": 3, **train_options})


def step_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def assert_same_curve(run: Path, reference: dict[int, float]) -> None:
    losses = step_losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in reference.items():
        assert losses[step] == pytest.approx(loss, abs=1e-5), f"step {step}"


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, tmp_path_factory):
    """An uninterrupted run: its folder and its loss at every step. Nothing is written outside output_dir."""
    folder = tmp_path_factory.mktemp("reference")
    recipe = write_recipe(folder, tiny_llama_dir)
    before = set(folder.rglob("*"))
    train(load_recipe(recipe))
    written = set(folder.rglob("*")) - before
    assert written and all(path.is_relative_to(folder / "run") for path in written)
    status = state_of(RunDir(folder / "run"))
    assert status["state"] == "finished" and status["pid"] == os.getpid() and status["ended"] >= status["started"]
    return folder / "run", step_losses(folder / "run")


def qadapt(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qadapt", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_for_step(run: Path, step: int, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").is_file() and max(step_losses(run), default=0) >= step:
            return
        assert process.poll() is None, process.communicate()[0]
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout} s")


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_loss_curve(reference, tiny_llama_dir, tmp_path):
    recipe = write_recipe(tmp_path, tiny_llama_dir)
    run = tmp_path / "run"
    process = qadapt("train", str(recipe), cwd=tmp_path)
    wait_for_step(run, 5, process)
    assert state_of(RunDir(run))["state"] == "training" and state_of(RunDir(run))["pid"] == process.pid
    process.kill()  # SIGKILL: no handler runs, whatever was being written stays as it was
    process.wait()
    assert not (run / "summary.json").exists()
    assert state_of(RunDir(run))["state"] == "interrupted"
    assert "ended without saying why" in state_of(RunDir(run))["message"]
    assert [p.name for p in (run / "checkpoints").glob("step-*")]  # at least step 4 made it

    resumed = qadapt("train", str(recipe), "--resume", cwd=tmp_path)
    output = resumed.communicate()[0]
    assert resumed.returncode == 0, output
    assert "resume: continuing from" in output
    assert_same_curve(run, reference[1])
    assert state_of(RunDir(run))["state"] == "finished"


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(reference, tiny_llama_dir, tmp_path):
    recipe = write_recipe(tmp_path, tiny_llama_dir, save_every=0)  # the only checkpoint is the signal's
    run = tmp_path / "run"
    process = qadapt("train", str(recipe), "train.lr=1e-2", cwd=tmp_path)
    wait_for_step(run, 3, process)
    process.send_signal(signal.SIGTERM)
    output = process.communicate()[0]
    assert process.returncode == 143, output
    assert "Traceback" not in output
    saved = RunDir(run).latest_checkpoint()
    assert saved is not None and f"checkpoint: {saved}" in output
    assert f"resume with: qadapt train {recipe} train.lr=1e-2 --resume" in output
    status = state_of(RunDir(run))
    assert status["state"] == "interrupted" and status["message"].startswith("stopped by SIGTERM after step")
    assert status["pid"] == process.pid

    train(load_recipe(recipe, ["train.lr=1e-2"]), resume="latest")
    assert_same_curve(run, reference[1])


def copy_unfinished(reference_run: Path, dest: Path) -> Path:
    """The reference run as a crash after its last step would leave it: checkpoints, no adapter or summary."""
    shutil.copytree(reference_run, dest)
    shutil.rmtree(dest / "adapter")
    (dest / "summary.json").unlink()
    return dest


def test_a_corrupt_or_cut_short_checkpoint_is_skipped_with_a_warning(reference, tiny_llama_dir, tmp_path, capsys):
    run = copy_unfinished(reference[0], tmp_path / "run")
    names = [p.name for p in sorted((run / "checkpoints").iterdir())]
    assert names == ["step-000004", "step-000006", "step-000008"]  # keep_checkpoints: 3
    optimizer = run / "checkpoints" / "step-000008" / CheckpointFolder.OPTIMIZER
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    optimizer.write_bytes(bytes(data))
    (run / "checkpoints" / "step-000006" / CheckpointFolder.STATE).unlink()  # a save cut short
    (run / "checkpoints" / ".tmp-step-000010-x").mkdir()  # a temporary folder of an interrupted save

    assert CheckpointFolder(run / "checkpoints" / "step-000008").problem() == (
        f"{CheckpointFolder.OPTIMIZER} does not match its recorded sha256")
    train(load_recipe(write_recipe(tmp_path, tiny_llama_dir)), resume="latest")
    warnings = capsys.readouterr().err
    assert "skipping checkpoint" in warnings and "step-000008" in warnings and "step-000006" in warnings
    assert_same_curve(run, reference[1])  # continued from step 4
    assert not (run / "checkpoints" / ".tmp-step-000010-x").exists()


def test_resuming_with_a_changed_recipe_names_the_changes_and_needs_permission(reference, tiny_llama_dir, tmp_path,
                                                                                capsys):
    copy_unfinished(reference[0], tmp_path / "run")
    recipe = write_recipe(tmp_path, tiny_llama_dir)
    with pytest.raises(QadaptError, match=r"(?s)train.lr: 0.01 -> 0.002.*--allow-recipe-changes"):
        train(load_recipe(recipe, ["train.lr=2e-3", "train.log_every=2"]), resume="latest")
    train(load_recipe(recipe, ["train.log_every=2"]), resume="latest")  # logging is not training: allowed
    assert "train.log_every: 1 -> 2" in capsys.readouterr().out


def test_a_diverging_loss_stops_the_run_and_keeps_the_last_good_checkpoint(reference, tiny_llama_dir, tmp_path):
    run = copy_unfinished(reference[0], tmp_path / "run")
    recipe = load_recipe(write_recipe(tmp_path, tiny_llama_dir), ["train.lr=1e30"])
    with pytest.raises(QadaptError, match=r"diverged at step \d+: the loss is (nan|inf).*step-000008.*train.lr"):
        train(recipe, resume="latest", allow_recipe_changes=True)
    assert RunDir(run).latest_checkpoint().path == run / "checkpoints" / "step-000008"
    status = state_of(RunDir(run))
    assert status["state"] == "failed" and status["message"].startswith("training diverged at step 10")
    assert not (run / "adapter").exists()


def test_an_output_dir_with_a_run_is_not_overwritten_silently(reference, tiny_llama_dir, tmp_path):
    finished = tmp_path / "finished"
    shutil.copytree(reference[0], finished)
    recipe = load_recipe(write_recipe(tmp_path, tiny_llama_dir), [f"output_dir={finished}"])
    with pytest.raises(QadaptError, match="already holds a finished run.*--overwrite"):
        train(recipe)
    with pytest.raises(QadaptError, match="has finished.*nothing to resume"):
        train(recipe, resume="latest")
    unfinished = copy_unfinished(reference[0], tmp_path / "unfinished")
    with pytest.raises(QadaptError, match="holds an unfinished run; pass --resume to continue it, or --overwrite"):
        train(load_recipe(write_recipe(tmp_path, tiny_llama_dir), [f"output_dir={unfinished}"]))
    with pytest.raises(QadaptError, match="pass one of them"):
        train(recipe, resume="latest", overwrite=True)
    (finished / "checkpoints" / "step-000999").mkdir()  # something only the old run had
    train(recipe, overwrite=True)
    assert not (finished / "checkpoints" / "step-000999").exists()
    assert_same_curve(finished, reference[1])
    rows = (finished / "metrics.jsonl").read_text().splitlines()
    assert sum('"loss"' in row for row in rows) == STEPS  # one fresh run's rows, not two runs' appended


def test_low_disk_space_is_found_before_training(tiny_llama_dir, tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=5 * 2**20))
    with pytest.raises(QadaptError, match=r"not enough disk space .*5\.2 MB free.*4 checkpoints of"):
        train(load_recipe(write_recipe(tmp_path, tiny_llama_dir)))
    assert not (tmp_path / "run" / "metrics.jsonl").read_text()


def test_an_adapter_is_not_loaded_onto_another_base(reference, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from qadapt.inference.loader import load_trained_model

    trained_on = Path(load_recipe(reference[0] / "recipe.yaml").model.name)
    other = tmp_path / "other-model"
    model = AutoModelForCausalLM.from_pretrained(trained_on)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1.5)  # same architecture, other weights
    model.save_pretrained(other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(trained_on / name, other)
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["model"]["name"] = str(other)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(QadaptError, match="was trained on .* the same architecture with different weights"):
        load_trained_model(run)


def test_a_pickle_in_a_checkpoint_is_refused_not_run(reference, tiny_llama_dir, tmp_path):
    import hashlib
    import pickle

    run = copy_unfinished(reference[0], tmp_path / "run")
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    folder = run / "checkpoints" / "step-000008"
    optimizer = folder / CheckpointFolder.OPTIMIZER
    optimizer.write_bytes(pickle.dumps({"state": Payload()}))
    state = json.loads((folder / CheckpointFolder.STATE).read_text())  # an attacker can fix the recorded hash too
    state["files"][CheckpointFolder.OPTIMIZER] = {"bytes": optimizer.stat().st_size,
                                                 "sha256": hashlib.sha256(optimizer.read_bytes()).hexdigest()}
    (folder / CheckpointFolder.STATE).write_text(json.dumps(state))
    with pytest.raises(QadaptError, match="refusing to unpickle"):
        train(load_recipe(write_recipe(tmp_path, tiny_llama_dir)), resume=str(folder))
    assert not marker.exists()


@pytest.mark.parametrize("args, expected", [
    (["train", "r.yaml", "--resume"], ["train", "r.yaml", "--resume=latest"]),
    (["train", "r.yaml", "--resume", "train.lr=1e-4"], ["train", "r.yaml", "--resume=latest", "train.lr=1e-4"]),
    (["train", "--resume", "r.yaml"], ["train", "--resume=latest", "r.yaml"]),
    (["train", "r.yaml", "--resume", "--overwrite"], ["train", "r.yaml", "--resume=latest", "--overwrite"]),
    (["train", "r.yaml", "--resume", "runs/x/checkpoints/step-000004"],
     ["train", "r.yaml", "--resume", "runs/x/checkpoints/step-000004"]),
    (["eval", "runs/x", "--resume", "--data", "s.json"], ["eval", "runs/x", "--resume", "--data", "s.json"]),
])
def test_resume_stands_alone_or_names_a_checkpoint(args, expected):
    from qadapt.cli_options import with_resume_value

    assert with_resume_value(args) == expected


def test_resuming_from_a_missing_or_broken_checkpoint_folder_says_why(tiny_llama_dir, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, tiny_llama_dir))
    with pytest.raises(QadaptError, match="checkpoint not found: .*nowhere"):
        train(recipe, resume=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(QadaptError, match=r"cannot resume from .*empty: it has no trainer_state\.json"):
        train(recipe, resume=str(tmp_path / "empty"))


def test_a_full_disk_while_saving_leaves_the_last_checkpoint_and_no_debris(reference, tiny_llama_dir, tmp_path,
                                                                           monkeypatch):
    import errno

    import torch

    run = copy_unfinished(reference[0], tmp_path / "run")
    real_save = torch.save

    def save_until_the_disk_fills(obj, path, *args, **kwargs):
        if ".tmp-step-000010" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    recipe = load_recipe(write_recipe(tmp_path, tiny_llama_dir), ["train.max_steps=12"])
    with pytest.raises(QadaptError, match=r"could not write .*step-000010: No space left on device; nothing "
                                          r"half-written was left; the last complete checkpoint is .*step-000008"):
        train(recipe, resume="latest", allow_recipe_changes=True)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000004", "step-000006", "step-000008"]
    assert RunDir(run).latest_checkpoint().path == run / "checkpoints" / "step-000008"


def test_a_changed_data_file_is_noticed_on_resume(tiny_llama_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(24)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = load_recipe(write_recipe(tmp_path, tiny_llama_dir), [f"data.path={data}", "train.max_steps=4"])
    train(recipe)
    shutil.rmtree(tmp_path / "run" / "adapter")  # as if it had crashed after its step-2 checkpoint
    (tmp_path / "run" / "summary.json").unlink()
    data.write_text(data.read_text().replace("What is 3 + 3?", "What is three plus three?"))
    with pytest.raises(QadaptError, match="the training data differs from what checkpoint .*step-000002 was"):
        train(recipe, resume="latest")
