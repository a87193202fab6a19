"""Token-classification data in CoNLL format (or a datasets-hub id), and its labels aligned to sub-word tokens.

A CoNLL file has one token per line, its tag in the last column (columns separated by tabs, or else by
spaces), and a blank line between sentences; `-DOCSTART-` lines separate documents. Tags may be IOB1
(an entity may start with I-) or IOB2 (every entity starts with B-); they are read as IOB2. A byte-order
mark, at the start or on a stray line, is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qadapt.data import IGNORE_INDEX  # a sub-token with no label: all but a word's first piece, specials
from qadapt.errors import QadaptError

DOCSTART = "-DOCSTART-"


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
