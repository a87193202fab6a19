"""Token classification (e.g. NER): sentences to sub-word rows for training, and word tags predicted back.

A word is seen by the model as one or more sub-word pieces; its label sits on the first piece and the
others are ignored (qadapt.conll.aligned_labels), and a prediction is read off the same first piece.
The loss (qadapt.loss.summed_tag_loss) sums over labelled pieces, so the training loop is the causal one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qadapt.conll import Sentence, aligned_labels
from qadapt.errors import QadaptError


@dataclass
class TaggedData:
    rows: list[dict]  # input_ids and labels, lists of ints
    truncated: int  # sentences whose last words fell beyond cutoff_len (they are not trained on)


def _encode(tokenizer, sentences: list[Sentence], cutoff_len: int, **kwargs):
    if not getattr(tokenizer, "is_fast", False):
        raise QadaptError("token classification needs a fast (Rust) tokenizer, which maps pieces back to words; "
                          f"{type(tokenizer).__name__} is not one")
    return tokenizer([s.tokens for s in sentences], is_split_into_words=True, truncation=True,
                     max_length=cutoff_len, **kwargs)


def tokenize_sentences(sentences: list[Sentence], tokenizer, labels: list[str], cutoff_len: int) -> TaggedData:
    """Rows of sub-word ids with each word's label id on its first piece."""
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({tag for s in sentences for tag in s.tags} - index.keys())
    if unknown:
        raise QadaptError(f"tags {unknown} are not among the labels this model was trained for ({', '.join(labels)})")
    encoded = _encode(tokenizer, sentences, cutoff_len)
    rows, truncated = [], 0
    for i, sentence in enumerate(sentences):
        word_ids = encoded.word_ids(i)
        truncated += _words_seen(word_ids) < len(sentence.tokens)
        rows.append({"input_ids": encoded["input_ids"][i],
                     "labels": aligned_labels(word_ids, [index[tag] for tag in sentence.tags])})
    return TaggedData(rows, truncated)


def _words_seen(word_ids: list[int | None]) -> int:
    return max((w for w in word_ids if w is not None), default=-1) + 1


@torch.no_grad()
def predict_tags(model, tokenizer, sentences: list[Sentence], batch_size: int, cutoff_len: int,
                 on_done=None) -> list[list[str]]:
    """Each word's predicted tag, read off its first piece; words cut off by cutoff_len are tagged O."""
    names = model.config.id2label
    device = next(model.parameters()).device
    predicted = []
    for start in range(0, len(sentences), batch_size):
        batch = sentences[start:start + batch_size]
        encoded = _encode(tokenizer, batch, cutoff_len, padding=True, return_tensors="pt")
        logits = model(input_ids=encoded["input_ids"].to(device),
                       attention_mask=encoded["attention_mask"].to(device)).logits
        best = logits.argmax(-1).tolist()
        for row, sentence in enumerate(batch):
            tags = ["O"] * len(sentence.tokens)
            previous = None
            for position, word in enumerate(encoded.word_ids(row)):
                if word is not None and word != previous:
                    tags[word] = names[best[row][position]]
                previous = word
            predicted.append(tags)
        if on_done:
            on_done(len(batch))
    return predicted
