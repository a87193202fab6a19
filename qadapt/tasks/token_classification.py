"""The token-classification task (e.g. NER): CoNLL data, sub-word alignment, a trained head, entity F1.

Data: a CoNLL file has one token per line, its tag in the last column (columns separated by tabs, or else
by spaces), and a blank line between sentences; `-DOCSTART-` lines separate documents. Tags may be IOB1
(an entity may start with I-) or IOB2 (every entity starts with B-); they are read as IOB2. A byte-order
mark, at the start or on a stray line, is ignored. A hub dataset with `tokens` and `ner_tags` works too.

Model: an encoder with a new, unquantized head for the labels found in the data, trained whole beside the
adapters (qadapt.adapters.head). A word is seen as one or more sub-word pieces; its label sits on the
first piece and the others are ignored (aligned_labels), and a prediction is read off the same piece.
The loss sums over labelled pieces, so the training loop is the causal one.

Scores: entities in seqeval's strict IOB2 mode (an entity counts only if its type and its exact span
match; an I- tag that starts nothing starts no entity), as CoNLL's conlleval and the papers do. Results go
where the math evaluation's go: metrics.json and predictions.jsonl (one line per sentence).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from qadapt.data import IGNORE_INDEX  # a sub-token with no label: all but a word's first piece, specials
from qadapt.errors import QadaptError
from qadapt.scores import set_name, write_results
from qadapt.tasks.base import EvalOptions, Task, TrainingData, read_sources, split_rows

DOCSTART = "-DOCSTART-"
AVERAGES = ("micro avg", "macro avg", "weighted avg")


@dataclass
class Sentence:
    tokens: list[str]
    tags: list[str]  # IOB2


def load_sentences(spec: str, split: str = "train") -> list[Sentence]:
    """The sentences of a CoNLL file, or of a hub dataset with `tokens` and `ner_tags` columns (`id[:config]`)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return read_conll(path)
    if spec.startswith("builtin:"):
        raise QadaptError(f"data {spec!r} is a set of math problems; token classification reads a CoNLL file "
                          "(word ... tag per line) or a hub dataset with tokens and ner_tags")
    if spec.startswith((".", "/", "~")) or path.suffix or spec.count("/") > 1:
        raise QadaptError(f"data file not found: {path}")
    return _hub_sentences(spec, split)


def _hub_sentences(spec: str, split: str) -> list[Sentence]:
    import datasets

    name, _, config = spec.partition(":")
    try:
        rows = datasets.load_dataset(name, config or None, split=split)
    except Exception as exc:  # the hub client raises many types; the user needs one line
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise QadaptError(f"cannot load dataset {spec!r} (not a local file): {first_line}; offline, use a "
                          "CoNLL file") from None
    column = next((c for c in ("ner_tags", "tags") if c in rows.column_names), None)
    if "tokens" not in rows.column_names or column is None:
        raise QadaptError(f"dataset {spec!r} has columns {rows.column_names}; token classification needs "
                          "tokens and ner_tags")
    names = getattr(rows.features[column].feature, "names", None)  # a ClassLabel: ids stand for tag names
    return [Sentence(list(row["tokens"]), iob2([names[t] if names else t for t in row[column]], f"{spec}[{i}]"))
            for i, row in enumerate(rows) if row["tokens"]]


def read_conll(path: str | Path) -> list[Sentence]:
    """The sentences of a CoNLL file, tags converted to IOB2; a malformed line names file and line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise QadaptError(f"data file not found: {path}")
    sentences, tokens, tags = [], [], []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.replace("\ufeff", "").strip()
        if not line or line.startswith(DOCSTART):
            if tokens:
                sentences.append(Sentence(tokens, iob2(tags, f"{path}:{number}")))
            tokens, tags = [], []
            continue
        columns = line.split("\t") if "\t" in line else line.split()
        if len(columns) < 2:
            raise QadaptError(f"{path}:{number}: expected a token and its tag, got {line!r}")
        tokens.append(columns[0].strip())
        tags.append(columns[-1].strip())
    if tokens:
        sentences.append(Sentence(tokens, iob2(tags, str(path))))
    if not sentences:
        raise QadaptError(f"no sentences in {path}")
    return sentences


def iob2(tags: list[str], where: str = "") -> list[str]:
    """IOB1 or IOB2 tags as IOB2: an I- that does not continue an entity of its type becomes B-."""
    converted = []
    for tag in tags:
        prefix, _, kind = tag.partition("-")
        if tag != "O" and (prefix not in ("B", "I") or not kind):
            raise QadaptError(f"{where}: tag {tag!r} is not O, B-TYPE or I-TYPE")
        previous = converted[-1] if converted else "O"
        if prefix == "I" and previous[2:] != kind:
            tag = f"B-{kind}"
        converted.append(tag)
    return converted


def label_names(sentences: list[Sentence]) -> list[str]:
    """Every tag in the data: O first, then B- and I- of each entity type, types in alphabetical order."""
    kinds = sorted({tag[2:] for sentence in sentences for tag in sentence.tags if tag != "O"})
    return ["O"] + [f"{prefix}-{kind}" for kind in kinds for prefix in ("B", "I")]


def aligned_labels(word_ids: list[int | None], word_labels: list[int]) -> list[int]:
    """One label per sub-word token: a word's label on its first piece; IGNORE_INDEX on the rest and on
    special tokens (whose word id is None), so each word is scored once."""
    labels, previous = [], None
    for word in word_ids:
        labels.append(IGNORE_INDEX if word is None or word == previous else word_labels[word])
        previous = word
    return labels


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


def entity_scores(golds: list[list[str]], predicted: list[list[str]]) -> dict:
    """Overall (micro-averaged) and per-type precision, recall, F1 and gold entity count."""
    from seqeval.metrics import classification_report
    from seqeval.scheme import IOB2

    report = classification_report(golds, predicted, mode="strict", scheme=IOB2, output_dict=True, zero_division=0)

    def row(scores: dict) -> dict:
        return {"precision": float(scores["precision"]), "recall": float(scores["recall"]),
                "f1": float(scores["f1-score"]), "entities": int(scores["support"])}

    return {**row(report["micro avg"]), "types": {kind: row(s) for kind, s in report.items() if kind not in AVERAGES}}


def evaluate_tagging_set(model, tokenizer, spec: str, limit: int | None, batch_size: int, cutoff_len: int,
                         on_done=None) -> tuple[dict, list[dict]]:
    """(scores row, prediction rows) of one CoNLL set (a hub id: its test split)."""
    sentences = load_sentences(spec, "test")[:limit]
    predicted = predict_tags(model, tokenizer, sentences, batch_size, cutoff_len, on_done)
    name = set_name(spec)
    rows = [{"set": name, "tokens": s.tokens, "gold": s.tags, "predicted": p, "correct": s.tags == p}
            for s, p in zip(sentences, predicted)]
    return {**entity_scores([s.tags for s in sentences], predicted), "sentences": len(sentences)}, rows


def format_tagging_table(sets: dict[str, dict]) -> str:
    lines = ["| set | type | precision | recall | F1 | gold entities |", "|---|---|---|---|---|---|"]
    for name, row in sets.items():
        for kind, scores in [("all", row), *sorted(row["types"].items())]:
            lines.append(f"| {name} | {kind} | {100 * scores['precision']:.1f} | {100 * scores['recall']:.1f} | "
                         f"{100 * scores['f1']:.1f} | {scores['entities']} |")
    return "\n".join(lines)


def read_eval_sets(specs: list[str]) -> None:
    """Read every eval set's test split once, so that a wrong one fails before a model is loaded."""
    for spec in specs:
        load_sentences(spec, "test")


def score_tagging_sets(target: str, specs: list[str], options: EvalOptions, out_dir: Path, load) -> dict:
    """Entity scores of the model `load()` gives on every CoNLL set; print, write, return them."""
    from tqdm import tqdm

    if not specs:
        raise QadaptError("name at least one evaluation set with --data (a CoNLL file, or a hub id with tokens "
                          "and ner_tags)")
    read_eval_sets(specs)  # every set read before the model loads
    loaded = load()
    results, predictions = {}, []
    with tqdm(desc="eval", unit="sentence") as bar:
        for spec in specs:
            row, rows = evaluate_tagging_set(loaded.model, loaded.tokenizer, spec, options.limit, options.batch_size,
                                             loaded.cutoff_len, bar.update)
            results[set_name(spec)] = row
            predictions += rows
    metrics = {"target": target, "task": TokenClassification.name, "scheme": "IOB2 strict", "sets": results}
    write_results(out_dir, metrics, predictions)
    print(format_tagging_table(results))
    print(f"metrics and predictions: {out_dir}")
    return metrics


def summed_tag_loss(model, batch: dict) -> torch.Tensor:
    """Cross-entropy summed over labelled positions (each word's first piece), computed in fp32."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def tagged_tokens(batch: dict) -> int:
    return int((batch["labels"] != IGNORE_INDEX).sum())


class TokenClassification(Task):
    name = "token-classification"
    score_key = "entity_f1"
    exports = frozenset()  # the head lives in the adapter: nothing to merge into a causal LM
    generates = False

    def load_tokenizer(self, cfg):
        from qadapt.models import load_tokenizer

        return load_tokenizer(cfg, generates=False)  # an encoder: its own [PAD], no generation to stop

    def auto_class(self):
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification

    def logits_head(self, model):
        from qadapt.adapters import TOKEN_CLASSIFIER

        return model.get_submodule(TOKEN_CLASSIFIER)

    def head_labels(self, adapter_config: dict, where: str) -> list[str]:
        if not adapter_config.get("labels"):
            raise QadaptError(f"{where} is a {self.name} adapter without its labels")
        return adapter_config["labels"]

    def training_data(self, recipe, tokenizer) -> TrainingData:
        d = recipe.data
        if d.packing:
            raise QadaptError("data.packing packs examples for a causal LM; a token-classification encoder attends "
                              "both ways and needs its sentences apart: set data.packing: false")
        read_eval_sets(recipe.eval.sets)  # a wrong eval set fails now, not after training
        sentences = read_sources(d.sources, lambda source: load_sentences(source, d.split))
        labels = label_names(sentences)
        tagged = tokenize_sentences(sentences, tokenizer, labels, d.cutoff_len)
        cut = f"{tagged.truncated} with words cut off at {d.cutoff_len} tokens"
        return split_rows(recipe, tagged.rows, labels, cut, (tagged.truncated, 0))

    def summed_loss(self, model, batch: dict) -> torch.Tensor:
        return summed_tag_loss(model, batch)

    def loss_targets(self, batch: dict) -> int:
        return tagged_tokens(batch)

    def set_scores(self, metrics: dict) -> dict[str, float]:
        return {name: row["f1"] for name, row in metrics["sets"].items()}

    def set_size(self, spec: str, limit: int | None) -> int | None:
        return len(load_sentences(spec, "test")[:limit])

    def evaluate(self, target: str, specs: list[str], options: EvalOptions, out: Path, load) -> dict:
        return score_tagging_sets(target, specs, options, out, load)
