"""The `llm-adapters` template against LLM-Adapters' own prompt and tokenization, restated here from its
finetune.py and evaluate.py (github.com/AGI-Edgerunners/LLM-Adapters): texts byte for byte, EOS, the
cut-off, the masked prompt."""

from __future__ import annotations

import pytest
import torch
from conftest import token_batch
from torch import nn

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


# --- the paper's per-linear bottleneck placements, restated from the paper and its code's equations ---

class PaperBottleneckLinear(nn.Module):
    """LLM-Adapters' adapter around one linear: `mh_adapter` on its input, `output_adapter` on its output,
    `parallel_adapter` beside it; down and up without biases, in fp32, tanh between, times a fixed scale."""

    def __init__(self, base: nn.Module, adapter_type: str, size: int, scale: float = 1.0):
        super().__init__()
        from qadapt.adapters.base import layer_dims

        self.base, self.adapter_type, self.scale = base, adapter_type, scale
        n_in, n_out = layer_dims(base)
        width_in, width_out = {"mh_adapter": (n_in, n_in), "output_adapter": (n_out, n_out),
                               "parallel_adapter": (n_in, n_out)}[adapter_type]
        self.adapter_down = nn.Linear(width_in, size, bias=False)
        self.adapter_up = nn.Linear(size, width_out, bias=False)

    def bottleneck(self, h: torch.Tensor) -> torch.Tensor:
        return self.adapter_up(torch.tanh(self.adapter_down(h.float()))).to(h.dtype) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adapter_type == "mh_adapter":
            return self.base(x + self.bottleneck(x))
        h = self.base(x)
        return h + self.bottleneck(h if self.adapter_type == "output_adapter" else x)


# The reference's LLaMA table: which side of each target linear its series adapter takes.
PAPER_SIDES = {"gate_proj": "mh_adapter", "up_proj": "mh_adapter", "down_proj": "output_adapter"}


def paper_wrapped(model: nn.Module, kind: str, targets: list[str], size: int) -> dict[str, PaperBottleneckLinear]:
    wrapped = {}
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in targets:
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            side = "parallel_adapter" if kind == "parallel" else PAPER_SIDES[leaf]
            wrapped[name] = PaperBottleneckLinear(module, side, size)
            setattr(parent, leaf, wrapped[name])
    return wrapped


@pytest.mark.parametrize("quant", ["none", "int8"])
@pytest.mark.parametrize("kind, targets", [("series", ["up_proj", "gate_proj"]),
                                           ("parallel", ["up_proj", "down_proj"])])
def test_three_steps_with_the_paper_s_targets_are_the_reference_s(load_tiny, quant, kind, targets):
    """The paper's LLaMA-7B Series and Parallel commands' targets (init bert, no dropout) on the tiny LLaMA:
    three AdamW steps of qadapt's adapters and of the restated reference from the same weights give the same
    losses and adapter weights (fp32 rounding)."""
    from qadapt.adapters import adapter_params, attach_adapters
    from qadapt.adapters.spec import adapter_spec

    torch.manual_seed(0)
    ours = load_tiny(quant)
    attach_adapters(ours, adapter_spec(kind=kind, placement="linears", targets=targets, bottleneck_size=8,
                                        init="bert", dropout=0.0))
    theirs = load_tiny(quant)
    reference = paper_wrapped(theirs, kind, targets, size=8)
    theirs.requires_grad_(False)
    with torch.no_grad():
        for name, layer in reference.items():
            layer.adapter_down.weight.copy_(ours.get_submodule(name).bottleneck.down.weight)
            layer.adapter_up.weight.copy_(ours.get_submodule(name).bottleneck.up.weight)
    their_params = {name: p for name, layer in reference.items()
                    for name, p in [(f"{name}.bottleneck.down.weight", layer.adapter_down.weight),
                                    (f"{name}.bottleneck.up.weight", layer.adapter_up.weight)]}
    for p in their_params.values():
        p.requires_grad_(True)
    our_params = adapter_params(ours)
    assert our_params.keys() == their_params.keys()
    losses = []
    for model, params in ((ours, our_params), (theirs, their_params)):
        optimizer = torch.optim.AdamW(params.values(), lr=1e-2)
        model.train()
        losses.append([])
        for step in range(3):
            loss = model(**token_batch(seed=step, batch=2, length=16)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[-1].append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for name, p in our_params.items():
        assert ((p - their_params[name]).norm() / their_params[name].norm()).item() < 1e-5, name
