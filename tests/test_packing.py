"""Packing: several examples per row, each seeing only itself, with the losses of the unpacked rows."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import train_tiny_run

from qadapt import data as D
from qadapt.errors import QadaptError
from qadapt.models import load_base
from qadapt.packing import pack, packing_problem
from qadapt.recipe import ModelConfig
from qadapt.tasks.causal_lm import summed_token_loss, target_tokens

PROBLEMS = [{"instruction": f"What is {a} + {b}?", "input": "", "output": f"{a} + {b} = {a + b}. The answer is {a + b}.",
             "answer": str(a + b)} for a, b in [(2, 3), (14, 27), (5, 6), (123, 456), (8, 1)]]


def rows_of(tokenizer, records=PROBLEMS, train_on_inputs=False) -> list[dict]:
    return D.tokenize(records, tokenizer, "alpaca", 256, train_on_inputs).rows


def test_best_fit_decreasing_places_every_example_once_and_is_seeded():
    rows = [{"input_ids": [i] * n, "labels": [i] * n} for i, n in enumerate([5, 3, 7, 2, 2, 4, 6, 1])]
    packed = pack(rows, 10, seed=0)
    assert all(len(r["input_ids"]) <= 10 for r in packed)
    assert sorted(t for r in packed for t in r["input_ids"]) == sorted(t for r in rows for t in r["input_ids"])
    assert len(packed) == 3  # 30 tokens in rows of 10: no room wasted
    for row in packed:  # positions restart at each example; its first label is never a target
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert all(row["labels"][i] == D.IGNORE_INDEX for i in starts)
    assert pack(rows, 10, seed=0) == packed
    with pytest.raises(QadaptError, match="an example of 7 tokens is longer than data.cutoff_len 6"):
        pack(rows, 6, seed=0)


@pytest.fixture(scope="module", params=["tiny_llama_dir", "tiny_gpt2_dir"])
def model(request):
    folder = request.getfixturevalue(request.param)
    return load_base(ModelConfig(name=str(folder), quant="nf4", compute_dtype="fp32")).eval()


def logits_apart(model, rows: list[dict]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**D.model_inputs(D.collate([row], 0))).logits[0] for row in rows]


def logits_packed(model, row: dict) -> list[torch.Tensor]:
    """Each example's logits, cut out of its packed row."""
    with torch.no_grad():
        logits = model(**D.model_inputs(D.collate([row], 0))).logits[0]
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    return [logits[a:b] for a, b in zip(starts, starts[1:])]


@pytest.mark.parametrize("train_on_inputs", [False, True])  # True: every example's first token is a label
def test_packed_logits_and_losses_are_the_unpacked_ones(model, smol_tokenizer, train_on_inputs):
    rows = rows_of(smol_tokenizer, train_on_inputs=train_on_inputs)
    [packed] = pack(rows, 512, seed=0)
    order = [next(i for i, r in enumerate(rows) if r["input_ids"] == packed["input_ids"][a:a + len(r["input_ids"])])
             for a in [i for i, p in enumerate(packed["position_ids"]) if p == 0]]
    for apart, inside in zip(logits_apart(model, [rows[i] for i in order]), logits_packed(model, packed)):
        torch.testing.assert_close(inside, apart, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        batch = D.collate([packed], 0)
        loss = summed_token_loss(model, batch)
        separate = [D.collate([row], 0) for row in rows]
        assert target_tokens(batch) == sum(map(target_tokens, separate))
        torch.testing.assert_close(loss, sum(summed_token_loss(model, b) for b in separate), rtol=1e-5, atol=1e-4)


def test_changing_one_example_leaves_the_others_unchanged(model, smol_tokenizer):
    rows = rows_of(smol_tokenizer)
    changed = rows_of(smol_tokenizer, [PROBLEMS[0] | {"output": "2 + 3 = 5, surely. The answer is 5."}, *PROBLEMS[1:]])
    before, after = (logits_packed(model, pack(r, 512, seed=0)[0]) for r in (rows, changed))
    assert len(before) == len(after) == len(PROBLEMS)
    differ = [a for a in before if not any(a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-4)
                                           for b in after)]
    assert len(differ) == 1  # only the changed example's logits differ, wherever the others now sit in the row


def test_padding_after_a_packed_row_is_a_sequence_of_its_own(model, smol_tokenizer):
    rows = rows_of(smol_tokenizer)
    short, long = pack(rows[:2], 512, seed=0)[0], pack(rows, 512, seed=0)[0]
    with torch.no_grad():
        alone = model(**D.model_inputs(D.collate([short], 0))).logits[0]
        padded = model(**D.model_inputs(D.collate([short, long], 0))).logits[0, :len(short["input_ids"])]
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-4)


def test_a_model_that_carries_state_along_the_sequence_is_refused():
    hybrid = SimpleNamespace(model_type="qwen3_5_text", layer_types=["linear_attention", "full_attention"])
    assert "layers of type linear_attention" in packing_problem(hybrid)
    assert "recurrent / state-space" in packing_problem(SimpleNamespace(model_type="mamba"))
    assert packing_problem(SimpleNamespace(model_type="gemma3_text",
                                           layer_types=["sliding_attention", "full_attention"])) is None


def test_a_packed_run_trains_logs_and_resumes(tiny_llama_dir, tmp_path, capsys):
    options = dict(data={"packing": True, "max_examples": 32, "val_size": 4, "cutoff_len": 256},
                   train={"max_steps": 3, "save_every": 1, "keep_checkpoints": 3, "eval_every": 1})
    run = train_tiny_run(tmp_path / "packed", tiny_llama_dir, **options)
    assert "examples into" in capsys.readouterr().out
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = {row["step"]: row["loss"] for row in log if "loss" in row}
    assert len(losses) == 3 and all(0 <= row["padding_share"] < 1 for row in log if "loss" in row)
    assert len([row["eval_loss"] for row in log if "eval_loss" in row]) == 4  # before training, then every step

    # Resume from the step-1 checkpoint: the same packed rows, so the same losses after it.
    shutil.rmtree(run / "checkpoints" / "step-000002")  # the last step leaves its adapter, not a checkpoint
    shutil.rmtree(run / "adapter")
    (run / "summary.json").unlink()
    from qadapt.recipe import load_recipe
    from qadapt.training.train import train

    train(load_recipe(run / "recipe.yaml"), resume="latest")
    again = {json.loads(line)["step"]: json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text()
             .splitlines() if "loss" in json.loads(line)}
    assert again[2] == pytest.approx(losses[2], rel=1e-5) and again[3] == pytest.approx(losses[3], rel=1e-5)


def test_token_classification_is_not_packed(tmp_path, tiny_bert_dir):
    conll = tmp_path / "train.conll"
    conll.write_text("Ada B-PER\nruns O\n\nBob B-PER\n")
    with pytest.raises(QadaptError, match="data.packing packs examples for a causal LM"):
        train_tiny_run(tmp_path / "run", tiny_bert_dir, task="token-classification",
                       data={"path": str(conll), "packing": True})
