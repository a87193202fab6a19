"""The causal-LM task: instruction tuning a decoder on prompt → response rows, scored on math sets.

The loss is next-token cross-entropy on the response tokens, computed a chunk of positions at a time so
that the (tokens × vocabulary) logits never exist whole; the scores are the paper's accuracies
(qadapt.tasks.math_sets).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qadapt import data as data_lib
from qadapt.choices import multiple_choice_copies
from qadapt.console import say
from qadapt.errors import QadaptError
from qadapt.packing import pack, refuse_unpackable
from qadapt.tasks.base import EvalOptions, Task, TrainingData, read_sources, split_rows
from qadapt.tasks.math_sets import load_eval_set, score_math_sets

LOSS_CHUNK_TOKENS = 128  # positions whose logits exist at once: 128 × a 49k vocabulary is 25 MB in fp32


class CausalLM(Task):
    name = "causal-lm"
    score_key = "accuracy"
    exports = frozenset({"merge", "peft", "gguf"})
    generates = True

    def load_tokenizer(self, cfg):
        from qadapt.models import load_tokenizer

        return load_tokenizer(cfg, generates=True)

    def run_tokenizer(self, recipe, run_dir=None):
        from qadapt.chat_templates import use_run_template

        tokenizer = self.load_tokenizer(recipe.model)
        use_run_template(tokenizer, recipe.data, run_dir)  # the chat template it trains, or trained, with
        return tokenizer

    def auto_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def logits_head(self, model):
        return model.get_output_embeddings()

    def training_data(self, recipe, tokenizer) -> TrainingData:
        # A wrong eval set fails now, not after training; its questions are counted in the training data.
        eval_sets = [load_eval_set(spec) for spec in recipe.eval.sets]
        tokenized = instruction_rows(recipe, tokenizer, {s.name: s.records for s in eval_sets})
        d = recipe.data
        cut = (f"{tokenized.truncated} cut at {d.cutoff_len} tokens, {tokenized.dropped} dropped (no response left)")
        data = split_rows(recipe, tokenized.rows, None, cut, (tokenized.truncated, tokenized.dropped))
        if d.packing:
            data.train_rows = packed_rows(recipe, data.train_rows)
        return data

    def summed_loss(self, model, batch: dict) -> torch.Tensor:
        return summed_token_loss(model, batch)

    def loss_targets(self, batch: dict) -> int:
        return target_tokens(batch)

    def set_scores(self, metrics: dict) -> dict[str, float]:
        return {name: row["accuracy"] for name, row in metrics["sets"].items()}

    def set_size(self, spec: str, limit: int | None) -> int | None:
        return len(load_eval_set(spec, limit).records)

    def evaluate(self, target: str, specs: list[str], options: EvalOptions, out: Path, load) -> dict:
        return score_math_sets(target, specs, options, out, load)


def packed_rows(recipe, rows: list[dict]) -> list[dict]:
    """The training rows packed (qadapt.packing), for a model whose layers all attend."""
    from qadapt.models import load_config

    d = recipe.data
    refuse_unpackable(load_config(recipe.model))
    packed = pack(rows, d.cutoff_len, recipe.train.seed)
    tokens = sum(len(r["input_ids"]) for r in rows)
    say(f"data: packed {len(rows):,} examples into {len(packed):,} rows of up to {d.cutoff_len} tokens "
        f"({tokens / (len(packed) * d.cutoff_len):.0%} full)")
    return packed


def instruction_rows(recipe, tokenizer, eval_records: dict[str, list[dict]]) -> data_lib.TokenizedData:
    """Templated instruction data (or conversations); the eval sets' questions are counted in it (and
    dropped with data.exclude_eval_overlap)."""
    d = recipe.data
    records = read_sources(d.sources, lambda source: data_lib.load_examples(source, d.split, d.bad_rows, d.format))
    pair = next((r for r in records if "chosen" in r), None)
    if pair is not None:
        raise QadaptError(f"{pair['where']} is a preference pair (chosen, rejected): train pairs with task: preference")
    if eval_records:
        records = data_lib.eval_overlap(records, eval_records, d.exclude_eval_overlap)
    if d.multiple_choice:
        copies = multiple_choice_copies(records, d.multiple_choice, recipe.train.seed)
        say(f"data: {len(copies):,} five-option copies of numeric problems (data.multiple_choice={d.multiple_choice})")
        records += copies
    tokenized = data_lib.tokenize(records, tokenizer, d.template, d.cutoff_len, d.train_on_inputs, d.train_on,
                                  d.bad_rows)
    if not tokenized.rows:
        raise QadaptError(f"data.cutoff_len {d.cutoff_len} is shorter than every prompt in {', '.join(d.sources)}: no "
                          "example keeps a response token to learn from; raise data.cutoff_len")
    return tokenized


def summed_token_loss(model, batch: dict) -> torch.Tensor:
    """Cross-entropy summed over target tokens (next-token prediction), computed in fp32.

    A model of a known family computes its logits a chunk of positions at a time, so the (tokens ×
    vocabulary) logits, their fp32 copy and their gradient never exist whole. With a frozen plain head
    (the usual case) each chunk's gradient to the hidden states is computed with its loss
    (`LinearCrossEntropy`); a head that trains (adapters on it) is checkpointed chunk by chunk instead.
    A model wrapped for several processes (DDP/FSDP) runs its plain forward, which its gradient hooks need.
    """
    from transformers import PreTrainedModel

    from qadapt.adapters import FAMILIES

    labels = batch["labels"][:, 1:].flatten()
    inputs = data_lib.model_inputs(batch)
    if not isinstance(model, PreTrainedModel) or model.config.model_type not in FAMILIES:
        logits = model(**inputs).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels,
                               ignore_index=data_lib.IGNORE_INDEX, reduction="sum")
    hidden = model.base_model(**inputs)[0]
    hidden, head = hidden[:, :-1].flatten(0, 1), model.get_output_embeddings()
    scaling, cap = head_output_transform(model.config)
    if hidden.requires_grad and torch.is_grad_enabled() and _frozen_plain_linear(head):
        return LinearCrossEntropy.apply(hidden, head.weight, head.bias, labels, scaling, cap)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, labels.numel(), LOSS_CHUNK_TOKENS):
        rows = slice(start, start + LOSS_CHUNK_TOKENS)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, head, hidden[rows], labels[rows], scaling, cap,
                                       use_reentrant=False)
        else:
            total = total + _chunk_loss(head, hidden[rows], labels[rows], scaling, cap)
    return total


def head_output_transform(config) -> tuple[float, float | None]:
    """(divisor, soft cap) that a family's forward applies to the LM head's output before the loss:
    Granite divides the logits by `logits_scaling`, Gemma caps them softly at `final_logit_softcapping`."""
    return float(getattr(config, "logits_scaling", None) or 1.0), getattr(config, "final_logit_softcapping", None)


def _frozen_plain_linear(head) -> bool:
    """A head whose output is hidden · Wᵀ (+ b) with nothing in it to train (no adapter, not quantized)."""
    return (type(head) is torch.nn.Linear and not head.weight.requires_grad
            and (head.bias is None or not head.bias.requires_grad))


class LinearCrossEntropy(torch.autograd.Function):
    """Σ cross-entropy of a frozen head's logits, with the gradient to the hidden states computed in
    the forward pass, chunk by chunk, while each chunk's logits are at hand.

    Checkpointing the chunks instead computes every chunk's logits twice (forward, then again in
    backward): on the embedded model that is a 1024 × 576 × 49152 matmul and a log-softmax more per
    step. For z = cap · tanh(logits / scaling / cap) (without a cap: logits / scaling), the loss of a
    row is −log_softmax(z)[label], and its gradient to the logits is (softmax(z) − onehot(label)) ·
    dz/dlogits, where dz/dlogits = (1 − (z / cap)²) / scaling.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, scaling: float, cap: float | None):
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)  # contiguous rows
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, labels.numel(), LOSS_CHUNK_TOKENS):
            rows = slice(start, start + LOSS_CHUNK_TOKENS)
            z = F.linear(hidden[rows], weight, bias).float()
            if scaling != 1.0:
                z /= scaling
            if cap is not None:
                z = torch.tanh(z / cap).mul_(cap)
            targets = labels[rows]
            counted = targets != data_lib.IGNORE_INDEX
            picked = targets.clamp_min(0).unsqueeze(1)
            slope = 1 - (z / cap).square_() if cap is not None else None
            # log_softmax, as cross_entropy computes it, so the gradient is the one autograd would take.
            log_probs = torch.log_softmax(z, dim=1)
            del z
            total -= (log_probs.gather(1, picked).squeeze(1) * counted).sum()
            # The gradient to z, in place: softmax − onehot on counted rows, zero elsewhere.
            grad = log_probs.exp_()
            grad.scatter_add_(1, picked, torch.full_like(picked, -1, dtype=grad.dtype))
            grad *= counted.unsqueeze(1)
            if slope is not None:
                grad *= slope
            if scaling != 1.0:
                grad /= scaling
            torch.mm(grad.to(weight.dtype), weight, out=grad_hidden[rows])
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total, None, None, None, None, None  # grad_total is 0-d: keeps the dtype


def _chunk_loss(head, hidden: torch.Tensor, labels: torch.Tensor, scaling: float = 1.0,
                cap: float | None = None) -> torch.Tensor:
    logits = head_logits(head, hidden, scaling, cap)
    return F.cross_entropy(logits.float(), labels, ignore_index=data_lib.IGNORE_INDEX, reduction="sum")


def head_logits(head, hidden: torch.Tensor, scaling: float = 1.0, cap: float | None = None) -> torch.Tensor:
    """The logits a family's forward returns for `hidden`: the head's output, divided and soft-capped as
    `head_output_transform` says."""
    logits = head(hidden)
    if scaling != 1.0:
        logits = logits / scaling
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def target_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != data_lib.IGNORE_INDEX).sum())
