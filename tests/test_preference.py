"""Preference pairs as a task (qadapt.tasks.preference) through the one training loop, on the real 4-bit path:
DPO against the model as it started, resumed exactly without recomputing the reference; ORPO without one; and
bad pairs named with their file and line."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import tiny_recipe, write_pairs_file

from qadapt.errors import QadaptError
from qadapt.recipe import recipe_from_dict
from qadapt.training.train import train


def preference_recipe(model_dir, output_dir, data, steps: int = 4, val_size: int = 0, **preference):
    return recipe_from_dict(tiny_recipe(
        model_dir, output_dir, task="preference", adapter={"rank": 4, "dropout": 0.0},
        data={"path": str(data), "max_examples": None, "val_size": val_size},
        train={"max_steps": steps, "micro_batch_size": 2, "grad_accum": 2, "lr": 5e-3, "save_every": 2,
               "warmup_steps": 0, "keep_checkpoints": 4},
        preference=preference))


def metric_rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_dpo_learns_the_pairs_and_resumes_without_recomputing_the_reference(tiny_llama_dir, tmp_path, capsys):
    data = write_pairs_file(tmp_path, count=14)
    run = tmp_path / "run"
    train(preference_recipe(tiny_llama_dir, run, data, val_size=4, beta=0.5))
    all_rows = metric_rows(run)
    rows = [r for r in all_rows if "loss" in r]
    assert capsys.readouterr().out.count("reference: log-probabilities of 10 pairs and 4 held out") == 1
    # The reference is the model as it started: at step 1 every implicit reward is 0, and the loss is log 2.
    assert rows[0]["reward_chosen"] == rows[0]["reward_rejected"] == 0 and rows[0]["loss"] == pytest.approx(0.6931, abs=1e-4)
    assert all(r["margin"] > 0 and r["reward_accuracy"] == 1 for r in rows[1:]) and rows[-1]["loss"] < 0.3
    # The held-out pairs' DPO loss, against their own reference log-probabilities: log 2 before the first step.
    held_out = [(r["step"], r["eval_loss"]) for r in all_rows if "eval_loss" in r]
    assert [step for step, _ in held_out] == [0, 4] and held_out[0][1] == pytest.approx(math.log(2), abs=1e-6)
    assert held_out[1][1] < math.log(2)  # the held-out pairs are of the trained kind
    checkpoint = run / "checkpoints" / "step-000002"
    saved = torch.load(checkpoint / "task_state.pt", weights_only=True)[0]
    assert saved["chosen"].shape == (10,) and saved["val_chosen"].shape == (4,)

    again = tmp_path / "again"
    shutil.copytree(run, again)
    shutil.rmtree(again / "adapter")
    (again / "summary.json").unlink()
    shutil.rmtree(again / "checkpoints" / "step-000004", ignore_errors=True)
    train(preference_recipe(tiny_llama_dir, again, data, val_size=4, beta=0.5), resume="latest")
    assert "reference: log-probabilities" not in capsys.readouterr().out  # read from the checkpoint
    from qadapt.actions.report import read_run, report

    assert read_run(run)["margins"] == [(r["step"], r["margin"]) for r in rows]
    assert metric_rows(again)[-1]["eval_loss"] == pytest.approx(held_out[1][1], abs=1e-6)
    report([run], plot_path=tmp_path / "report.png")  # the margin curve beside the loss
    assert (tmp_path / "report.png").read_bytes().startswith(b"\x89PNG")
    keys = ("loss", "reward_chosen", "reward_rejected", "margin", "reward_accuracy", "logp_chosen", "grad_norm")
    resumed = [r for r in metric_rows(again) if "loss" in r]
    assert [{k: r[k] for k in keys} for r in resumed] == [{k: r[k] for k in keys} for r in rows]


def test_orpo_needs_no_reference_and_trains_the_chosen_answer(tiny_llama_dir, tmp_path, capsys):
    run = tmp_path / "run"
    train(preference_recipe(tiny_llama_dir, run, write_pairs_file(tmp_path), steps=3, loss="orpo"))
    rows = metric_rows(run)
    assert "reference:" not in capsys.readouterr().out
    assert rows[0]["reward_chosen"] != 0 and rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["logp_chosen"] > rows[0]["logp_chosen"]  # its SFT term raises the chosen answers
    assert not (run / "checkpoints" / "step-000002" / "task_state.pt").exists()


def test_bad_pairs_are_named_with_file_and_line_or_skipped(tiny_llama_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                    + json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}) + "\n")
    with pytest.raises(QadaptError, match=r"bad\.jsonl:2: chosen and rejected are the same answer"):
        train(preference_recipe(tiny_llama_dir, tmp_path / "run", data))
    with pytest.raises(QadaptError, match="builtin:arithmetic holds problems, not preference pairs"):
        train(preference_recipe(tiny_llama_dir, tmp_path / "run", "builtin:arithmetic"))
    short = preference_recipe(tiny_llama_dir, tmp_path / "run", write_pairs_file(tmp_path))
    short.data.cutoff_len = 8  # the prompt alone is longer: neither answer keeps a token
    with pytest.raises(QadaptError, match=r"pairs\.jsonl:1: the chosen answer has no token left within "
                                          r"data.cutoff_len 8 \(data.bad_rows=skip drops such pairs\)"):
        train(short)
    short.data.bad_rows = "skip"
    with pytest.raises(QadaptError, match="no preference pairs left to train on"):
        train(short)
    sft = recipe_from_dict(tiny_recipe(tiny_llama_dir, tmp_path / "sft", data={"path": str(write_pairs_file(tmp_path))}))
    with pytest.raises(QadaptError, match=r"pairs\.jsonl:1 is a preference pair .*train pairs with task: preference"):
        train(sft)
    with pytest.raises(QadaptError, match="preference.label_smoothing applies with loss dpo or simpo, not ipo"):
        preference_recipe(tiny_llama_dir, tmp_path / "run", data, loss="ipo", label_smoothing=0.1)
    with pytest.raises(QadaptError, match="preference.sft_weight applies with loss dpo, ipo or simpo: orpo holds"):
        preference_recipe(tiny_llama_dir, tmp_path / "run", data, loss="orpo", sft_weight=1.0)


def test_qadapt_data_shows_both_sides_of_a_pair_with_their_trained_answers(tiny_llama_dir, tmp_path):
    from qadapt.actions.show_data import show_data

    shown = show_data(preference_recipe(tiny_llama_dir, tmp_path / "run", write_pairs_file(tmp_path)), 1)
    chosen, rejected = shown.split("--- example 1: rejected ---\n")
    assert chosen.startswith("--- example 1: chosen ---\n") and "What is 0 plus 3?" in chosen and "What is 0 plus 3?" in rejected
    assert "[[0 + 3 = 3. The answer is 3.<|im_end|>]]" in chosen and "[[The answer is 4.<|im_end|>]]" in rejected
    assert "--- 12 training examples (0 held out)" in shown


def test_conversational_pairs_train_through_the_chat_template(tiny_llama_dir, tmp_path):
    data = tmp_path / "chat-pairs.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"What is {n} plus 1?"}],
             "chosen": [{"role": "assistant", "content": f"The answer is {n + 1}."}],
             "rejected": [{"role": "assistant", "content": f"The answer is {n + 2}."}]} for n in range(8)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = preference_recipe(tiny_llama_dir, tmp_path / "run", data, steps=2)
    recipe.data.template = "chat"
    train(recipe)
    first = metric_rows(tmp_path / "run")[0]
    assert first["loss"] == pytest.approx(0.6931, abs=1e-4) and first["margin"] == 0
