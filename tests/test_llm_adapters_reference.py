"""The `llm-adapters` template against LLM-Adapters' own prompt and tokenization, restated here from its
finetune.py and evaluate.py (github.com/AGI-Edgerunners/LLM-Adapters): texts byte for byte, EOS, the
cut-off, the masked prompt."""

from __future__ import annotations

import pytest

from qadapt import data as D

IGNORE = -100
PAD = " " * 16

# finetune.py's generate_prompt(data_point): f-strings indented in the source, so their lines carry the
# indentation; the lines between sections hold 16 spaces; the opening sentence ends in spaces.
def reference_training_text(instruction: str, input: str, output: str) -> str:
    if input:
        return ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request. \n\n"
                f"{PAD}### Instruction:\n{PAD}{instruction}\n{PAD}\n{PAD}### Input:\n{PAD}{input}\n{PAD}\n"
                f"{PAD}### Response:\n{PAD}{output}")
    return ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            f"request.  \n\n{PAD}### Instruction:\n{PAD}{instruction}\n{PAD}\n{PAD}### Response:\n{PAD}{output}")


# evaluate.py's generate_prompt(instruction, input): empty lines between sections.
def reference_answering_text(instruction: str, input: str) -> str:
    if input:
        return ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n"
                f"{PAD}### Instruction:\n{PAD}{instruction}\n\n{PAD}### Input:\n{PAD}{input}\n\n"
                f"{PAD}### Response:\n{PAD}")
    return ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            f"request. \n\n{PAD}### Instruction:\n{PAD}{instruction}\n\n{PAD}### Response:\n{PAD}")


def reference_tokenize(tokenizer, record: dict, cutoff_len: int, train_on_inputs: bool) -> dict:
    """finetune.py's generate_and_tokenize_prompt: the whole text tokenized, cut at cutoff_len, EOS added
    when there is room; without train_on_inputs the prompt's own token count masked."""
    def tokenize(text: str, add_eos: bool = True) -> list[int]:
        ids = tokenizer(text, truncation=True, max_length=cutoff_len)["input_ids"]
        if ids[-1] != tokenizer.eos_token_id and len(ids) < cutoff_len and add_eos:
            ids = ids + [tokenizer.eos_token_id]
        return ids

    ids = tokenize(reference_training_text(record["instruction"], record["input"], record["output"]))
    labels = list(ids)
    if not train_on_inputs:
        prompt = tokenize(reference_training_text(record["instruction"], record["input"], ""), add_eos=False)
        labels = [IGNORE] * len(prompt) + labels[len(prompt):]
    return {"input_ids": ids, "labels": labels}


RECORDS = [
    {"instruction": "Tom has 3 apples and buys 4 more. How many apples does he have?", "input": "",
     "output": "Tom has 3 + 4 = 7 apples.\nThe answer is 7"},
    {"instruction": "Add the numbers.", "input": "12 and 30", "output": " 12 + 30 = 42. The answer is 42"},
    {"instruction": "A long one: " + "count the sheep, " * 30, "input": "", "output": "Many sheep. The answer is 90"},
]


@pytest.mark.parametrize("train_on_inputs", [False, True])
@pytest.mark.parametrize("cutoff_len", [256, 40])
def test_training_rows_are_llm_adapters_rows(smol_tokenizer, train_on_inputs, cutoff_len):
    """Cut-off 40 cuts the long record (no EOS, as the reference) and, without train_on_inputs, drops it
    when no response token is left (the reference would train on nothing there)."""
    ours = D.tokenize(RECORDS, smol_tokenizer, "llm-adapters", cutoff_len, train_on_inputs).rows
    expected = [reference_tokenize(smol_tokenizer, r, cutoff_len, train_on_inputs) for r in RECORDS]
    expected = [row for row in expected if any(label != IGNORE for label in row["labels"][1:])]
    assert ours == expected


def test_answering_prompts_are_evaluate_py_s(smol_tokenizer):
    for record in RECORDS:
        assert D.prompt_text(record, "llm-adapters", smol_tokenizer) == reference_answering_text(
            record["instruction"], record["input"])
        assert D.prompt_text(record, "llm-adapters", smol_tokenizer, training=True) == reference_training_text(
            record["instruction"], record["input"], "")


def test_alpaca_stays_the_clean_text_for_training_and_answering(smol_tokenizer):
    record = RECORDS[1]
    assert D.prompt_text(record, "alpaca", smol_tokenizer, training=True) == D.prompt_text(record, "alpaca",
                                                                                           smol_tokenizer)
    assert "\n\n### Input:\n12 and 30\n\n### Response:\n" in D.prompt_text(record, "alpaca", smol_tokenizer)
