"""CoNLL token-classification data: sentences, IOB2 tags, labels aligned to sub-word tokens."""

from __future__ import annotations

import pytest
from conftest import SHARED_DATA

from qadapt.tasks.token_classification import IGNORE_INDEX, aligned_labels, iob2, label_names, read_conll
from qadapt.errors import QadaptError

WNUT17 = SHARED_DATA / "wnut17"


@pytest.mark.skipif(not WNUT17.is_dir(), reason="needs ../shared/data/wnut17")
def test_wnut17_reads_with_its_sentence_counts_and_six_entity_types():
    counts = {name: len(read_conll(WNUT17 / name))
              for name in ("wnut17train.conll", "emerging.dev.conll", "emerging.test.annotated")}
    assert counts == {"wnut17train.conll": 3394, "emerging.dev.conll": 1009, "emerging.test.annotated": 1287}
    train = read_conll(WNUT17 / "wnut17train.conll")
    kinds = {"corporation", "creative-work", "group", "location", "person", "product"}
    assert label_names(train) == ["O"] + [f"{p}-{k}" for k in sorted(kinds) for p in "BI"]
    assert train[0].tokens[14:17] == ["Empire", "State", "Building"]
    assert train[0].tags[14:17] == ["B-location", "I-location", "I-location"]


def test_space_separated_docstart_bom_and_iob1_are_read(tmp_path):
    path = tmp_path / "conll2003.txt"
    path.write_text("\ufeff-DOCSTART- -X- -X- O\n\nEU NNP B-NP I-ORG\nrejects VBZ B-VP O\nGerman JJ B-NP I-MISC\n"
                    "\n\ufeff\nPeter NNP B-NP I-PER\nBlackburn NNP I-NP I-PER\n")
    sentences = read_conll(path)
    assert [s.tokens for s in sentences] == [["EU", "rejects", "German"], ["Peter", "Blackburn"]]
    assert [s.tags for s in sentences] == [["B-ORG", "O", "B-MISC"], ["B-PER", "I-PER"]]


def test_malformed_conll_names_file_and_line(tmp_path):
    path = tmp_path / "bad.conll"
    path.write_text("Hello\tO\nworld\n")
    with pytest.raises(QadaptError, match=r"bad\.conll:2: expected a token and its tag"):
        read_conll(path)
    path.write_text("Hello\tX-thing\n")
    with pytest.raises(QadaptError, match="tag 'X-thing' is not O, B-TYPE or I-TYPE"):
        read_conll(path)
    with pytest.raises(QadaptError, match="data file not found"):
        read_conll(tmp_path / "missing.conll")


def test_iob2_starts_every_entity_with_b():
    assert iob2(["I-PER", "I-PER", "O", "I-LOC", "I-ORG", "B-ORG"]) == \
        ["B-PER", "I-PER", "O", "B-LOC", "B-ORG", "B-ORG"]


def test_only_the_first_piece_of_a_word_is_labelled(smol_tokenizer):
    words = ["Empire", "Statebuildingness", "rocks"]
    encoded = smol_tokenizer(words, is_split_into_words=True)
    labels = aligned_labels(encoded.word_ids(), [3, 4, 0])
    firsts = [labels[i] for i, word in enumerate(encoded.word_ids()) if word is not None and
              (i == 0 or encoded.word_ids()[i - 1] != word)]
    assert firsts == [3, 4, 0]
    assert labels.count(IGNORE_INDEX) == len(labels) - 3  # the other pieces, and any special tokens
