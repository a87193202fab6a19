"""Data: formats, templates, loss masks, truncation, batching and the built-in arithmetic problems."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import SHARED_DATA

from qadapt.builtin_data import arithmetic
from qadapt import data as D
from qadapt.errors import QadaptError

RECORD = {"instruction": "What is 2 + 3?", "input": "", "output": "2 + 3 = 5. The answer is 5.", "answer": "5"}


def test_gsm8k_record_drops_calculator_annotations_and_states_the_answer():
    record = D.gsm8k_record("Q?", "She sold 48/2 = <<48/2=24>>24 clips.\nTotal 1,000 + 24.\n#### 1,024")
    assert record["output"] == "She sold 48/2 = 24 clips.\nTotal 1,000 + 24.\nThe answer is 1024."
    assert record["answer"] == "1024"


def test_both_file_formats_load(tmp_path):
    gsm = tmp_path / "g.jsonl"
    gsm.write_text(json.dumps({"question": "Q1", "answer": "1 + 1 = 2\n#### 2"}) + "\n\n")
    assert D.load_examples(str(gsm)) == [{"instruction": "Q1", "input": "", "output": "1 + 1 = 2\nThe answer is 2.", "answer": "2"}]
    adapters = tmp_path / "a.json"
    adapters.write_text(json.dumps([{"instruction": "I", "input": "ctx", "output": "O", "answer": 4.0}]))
    assert D.load_examples(str(adapters)) == [{"instruction": "I", "input": "ctx", "output": "O", "answer": "4.0"}]


@pytest.mark.skipif(not (SHARED_DATA / "gsm8k").is_dir(), reason="../shared/data not present")
def test_shared_gsm8k_and_math_sets_load():
    gsm = D.load_examples(str(SHARED_DATA / "gsm8k" / "train.jsonl"))
    assert len(gsm) == 7473 and all(r["output"].endswith(f"The answer is {r['answer']}.") for r in gsm)
    assert len(D.load_examples(str(SHARED_DATA / "math-eval" / "math_data.json"))) == 3260


@pytest.mark.parametrize("name, content, error", [
    ("broken.jsonl", '{"question": "a", "answer": "#### 1"}\n{"question": \n', r"broken\.jsonl:2: not valid JSON"),
    ("odd.jsonl", '{"text": "hello"}\n', r"odd\.jsonl:1: the example has fields \['text'\]; expected GSM8K"),
    ("typed.json", '[{"question": "a", "answer": "#### 1"}, {"question": 5, "answer": "#### 1"}]',
     r"typed\.json:2: GSM8K fields question and answer must be text \(data.bad_rows=skip drops such rows\)"),
    ("problems.jsonl", '{"prompt": "What is 2 plus 2?", "answer": 4}\n{"prompt": "", "answer": 1}\n',
     r"problems\.jsonl:2: fields prompt and answer must be text \(answer may be a number\)"),
    ("wrapped.json", '{"data": []}', r"wrapped\.json: expected a list of examples, got a JSON dict"),
    ("empty.jsonl", "\n", r"no examples in .*empty\.jsonl"),
])
def test_bad_data_is_reported_with_file_and_line(tmp_path, name, content, error):
    (tmp_path / name).write_text(content)
    with pytest.raises(QadaptError, match=error):
        D.load_examples(str(tmp_path / name))


def test_bad_rows_can_be_skipped_and_counted(tmp_path, capsys):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"question": "a", "answer": "#### 1"}\n{"question": \n[1, 2]\n'
                    '{"question": "b", "answer": "#### 2"}\n')
    assert [r["answer"] for r in D.load_examples(str(path), bad_rows="skip")] == ["1", "2"]
    assert "skipped 2 malformed rows of 4 in" in capsys.readouterr().out
    path.write_text('{"question": \n')
    with pytest.raises(QadaptError, match=r"no usable examples in .*mixed\.jsonl: all 1 rows are malformed"):
        D.load_examples(str(path), bad_rows="skip")


def test_missing_data_file_names_the_path_and_json_lines_load_from_a_json_file(tmp_path):
    with pytest.raises(QadaptError, match=r"data file not found: .*missing\.jsonl"):
        D.load_examples(str(tmp_path / "missing.jsonl"))
    lines = tmp_path / "lines.json"
    lines.write_text('{"question": "a", "answer": "#### 1"}\n{"question": "b", "answer": "#### 2"}\n')
    assert [r["answer"] for r in D.load_examples(str(lines))] == ["1", "2"]


def test_alpaca_template_is_the_papers():
    assert D.prompt_text(RECORD, "alpaca", None) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nWhat is 2 + 3?\n\n### Response:\n"
    )
    with_input = D.prompt_text({**RECORD, "input": "x = 1"}, "alpaca", None)
    assert "paired with an input" in with_input and "### Input:\nx = 1\n\n### Response:\n" in with_input


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_loss_only_on_the_response_and_eos(smol_tokenizer, template):
    tokenized = D.tokenize([RECORD], smol_tokenizer, template, cutoff_len=512, train_on_inputs=False)
    row = tokenized.rows[0]
    prompt = D.prompt_text(RECORD, template, smol_tokenizer)
    n_prompt = len(smol_tokenizer(prompt, add_special_tokens=template == "alpaca")["input_ids"])
    assert row["labels"][:n_prompt] == [D.IGNORE_INDEX] * n_prompt
    assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
    assert row["input_ids"][-1] == smol_tokenizer.eos_token_id
    response = smol_tokenizer.decode(row["input_ids"][n_prompt:-1])
    assert response == RECORD["output"]
    if template == "chat":
        assert RECORD["instruction"] in smol_tokenizer.decode(row["input_ids"][:n_prompt])


def test_train_on_inputs_supervises_everything(smol_tokenizer):
    row = D.tokenize([RECORD], smol_tokenizer, "alpaca", 512, train_on_inputs=True).rows[0]
    assert row["labels"] == row["input_ids"]


def test_cutoff_truncates_and_counts(smol_tokenizer):
    long = {**RECORD, "output": "word " * 200}
    n_prompt = len(smol_tokenizer(D.prompt_text(RECORD, "alpaca", None))["input_ids"])
    n_full = len(D.tokenize([RECORD], smol_tokenizer, "alpaca", 512, False).rows[0]["input_ids"])
    tokenized = D.tokenize([RECORD, long], smol_tokenizer, "alpaca", cutoff_len=n_full, train_on_inputs=False)
    assert (tokenized.truncated, tokenized.dropped) == (1, 0)
    assert [len(r["input_ids"]) for r in tokenized.rows] == [n_full, n_full]
    too_short = D.tokenize([RECORD], smol_tokenizer, "alpaca", cutoff_len=n_prompt - 1, train_on_inputs=False)
    assert (too_short.truncated, too_short.dropped, too_short.rows) == (1, 1, [])


def test_collate_pads_right_and_masks_padding():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = D.collate(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_example_order_is_seeded_epoch_permutations_and_resumable():
    stream = D.ExampleOrder(5, seed=3)
    first = [next(stream) for _ in range(15)]
    assert all(sorted(first[i:i + 5]) == list(range(5)) for i in (0, 5, 10))
    assert first[:5] != first[5:10]
    resumed = D.ExampleOrder(5, seed=3, start=7)
    assert [next(resumed) for _ in range(8)] == first[7:]
    assert stream.position == 15 and resumed.position == 15


def test_held_out_slice_is_disjoint_and_sized():
    train, held = D.split_held_out(list(range(100)), 10, seed=1)
    assert len(held) == 10 and len(train) == 90 and not set(train) & set(held)


def test_builtin_arithmetic_is_deterministic_split_and_correct():
    train = arithmetic.problems("train", 500)
    assert train == arithmetic.problems("train", 500)
    test = arithmetic.problems("test", 200)
    assert not {p["instruction"] for p in train} & {p["instruction"] for p in test}
    steps = set()
    for problem in train + test:
        equations = re.findall(r"(\d+) ([-+x/]) (\d+) = (\d+)", problem["output"])
        steps.add(len(equations))
        for a, op, b, result in equations:
            value = {"+": int(a) + int(b), "-": int(a) - int(b), "x": int(a) * int(b), "/": int(a) / int(b)}[op]
            assert value == int(result), problem
        assert problem["output"].endswith(f"The answer is {problem['answer']}.")
        assert int(problem["answer"]) >= 0
    assert {1, 2, 3} <= steps
    with pytest.raises(QadaptError, match="splits train, test"):
        D.load_examples("builtin:arithmetic", split="validation")


def test_builtin_arithmetic_loads_as_data():
    records = D.load_examples(D.BUILTIN_ARITHMETIC, "test")
    assert len(records) == D.BUILTIN_SIZES["test"] and set(records[0]) == {"instruction", "input", "output", "answer"}
    assert torch.tensor([len(r["output"]) for r in records]).min() > 20


def test_training_questions_shared_with_eval_sets_are_counted_and_can_be_dropped(capsys):
    def record(question):
        return {"instruction": question, "input": "", "output": "x", "answer": "1"}

    train = [record("Tom has 3.5 apples, and Ann has 2!"), record("A new question?"), record("  tom HAS 3.5 apples and ann has 2")]
    evals = {"AddSub": [record("Tom has 3.5 apples and Ann has 2.")], "gsm8k": [record("Something else")]}
    assert D.eval_overlap(train, evals, exclude=False) == train
    assert "2 of 3 training questions also appear in the eval sets (AddSub 2): kept" in capsys.readouterr().out
    assert D.eval_overlap(train, evals, exclude=True) == [train[1]]


@pytest.mark.skipif(not (SHARED_DATA / "math-eval").is_dir(), reason="needs ../shared/data")
def test_math_data_json_is_made_of_the_test_sets_and_gsm8k_train_is_not(capsys):
    """LLM-Adapters' math_data.json holds the questions of the paper's test sets (80% of GSM8K's):
    training on it and scoring those sets measures recall, not math."""
    from qadapt.tasks.math_sets import load_eval_set

    math = SHARED_DATA / "math-eval"
    evals = {name: load_eval_set(str(math / name / "test.json")).records for name in ("gsm8k", "AQuA", "MultiArith")}
    kept = D.eval_overlap(D.load_examples(str(math / "math_data.json")), evals, exclude=True)
    assert "gsm8k 1055, AQuA 203, MultiArith 480" in capsys.readouterr().out
    assert len(kept) == 3260 - 1055 - 203 - 480
    gsm8k_train = D.load_examples(str(SHARED_DATA / "gsm8k" / "train.jsonl"))
    assert D.eval_overlap(gsm8k_train, evals, exclude=True) == gsm8k_train


def test_builtin_word_problems_are_varied_split_and_every_step_is_right():
    from qadapt.builtin_data import word_problems

    train, test = word_problems.problems("train", 1000), word_problems.problems("test", 200)
    assert train == word_problems.problems("train", 1000)
    assert not {p["instruction"] for p in train} & {p["instruction"] for p in test}
    openings = {" ".join(p["instruction"].split()[1:3]) for p in train}
    assert len(openings) > 100  # not one story told a hundred ways
    for problem in train + test:
        equations = re.findall(r"(\d+) ([-+*/]) (\d+) = \$?(\d+)", problem["output"])
        assert equations, problem
        for a, op, b, result in equations:
            value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b), "/": int(a) / int(b)}[op]
            assert value == int(result), problem
        assert problem["output"].endswith(f"The answer is {problem['answer']}.") and int(problem["answer"]) >= 0
        assert int(equations[-1][3]) == int(problem["answer"])
    assert D.load_examples(D.BUILTIN_WORD_PROBLEMS, "test") == word_problems.problems("test", 500)
    with pytest.raises(QadaptError, match="unknown built-in data 'builtin:nope'; choose one of builtin:arithmetic"):
        D.load_examples("builtin:nope")


def test_a_list_of_sources_is_read_in_turn_and_mixed(tmp_path, smol_tokenizer, capsys):
    from qadapt.recipe import recipe_from_dict
    from qadapt.training.train import prepare_data

    gsm8k = tmp_path / "gsm8k.jsonl"
    gsm8k.write_text("".join(json.dumps({"question": f"What is {n} + 1?", "answer": f"Zorp: {n} + 1 = {n + 1}\n#### {n + 1}"})
                             + "\n" for n in range(30)))
    recipe = recipe_from_dict({"data": {"path": [str(gsm8k), D.BUILTIN_WORD_PROBLEMS], "val_size": 0}})
    rows = prepare_data(recipe, smol_tokenizer).train_rows
    assert f"data: 30 from {gsm8k} + 4,000 from builtin:word-problems" in capsys.readouterr().out
    assert len(rows) == 30 + D.BUILTIN_SIZES["train"]
    responses = [smol_tokenizer.decode([t for t in row["labels"] if t >= 0]) for row in rows]
    assert sum(text.startswith("Zorp: ") and "The answer is" in text for text in responses) == 30

    with pytest.raises(QadaptError, match="data.path must name a data source"):
        recipe_from_dict({"data": {"path": []}})
