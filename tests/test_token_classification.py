"""Token classification: encoder families quantized with a trained head, sub-word labels, entity scores."""

from __future__ import annotations

import pytest
import torch

from conftest import ENCODER_FAMILIES, SHARED_DATA, qadapt
from qadapt.adapters import TrainedHead, attach_adapters
from qadapt.errors import QadaptError
from qadapt.models import load_base, load_tokenizer
from qadapt.adapters.spec import adapter_spec
from qadapt.recipe import ModelConfig
from qadapt.tasks.token_classification import Sentence, entity_scores, load_sentences, predict_tags, tokenize_sentences

LABELS = ["O", "B-PER", "I-PER"]


def load_encoder(folder, quant="nf4"):
    return load_base(ModelConfig(name=str(folder), quant=quant, compute_dtype="fp32"), labels=LABELS)


def kinds_of(model) -> dict[str, str]:
    return {name: type(module).__name__ for name, module in model.named_modules()}


@pytest.mark.parametrize("family", ENCODER_FAMILIES)
def test_each_encoder_family_gets_4bit_layers_adapters_and_an_fp32_head(tiny_encoder_dir, family):
    import bitsandbytes as bnb

    model = load_encoder(tiny_encoder_dir(family))
    assert type(model).__name__.endswith("ForTokenClassification") and model.config.id2label[1] == "B-PER"
    assert type(model.classifier) is torch.nn.Linear  # skipped by bitsandbytes: it is new and trains
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 12  # 6 linears x 2 layers

    wrapped = attach_adapters(model, adapter_spec(kind="lora", rank=4))
    assert len(wrapped) == 13 and wrapped[-1] == "classifier"
    assert isinstance(model.classifier, TrainedHead) and model.classifier.linear.weight.dtype == torch.float32
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.linear.weight", "classifier.linear.bias"} <= trainable
    assert all("lora_" in name or name.startswith("classifier.linear") for name in trainable)
    logits = model(input_ids=torch.tensor([[5, 6, 7, 8]]), attention_mask=torch.ones(1, 4, dtype=torch.long)).logits
    assert logits.shape == (1, 4, 3) and logits.dtype == torch.float32
    logits.sum().backward()
    assert model.classifier.linear.weight.grad is not None


@pytest.mark.parametrize("family", ["bert", "mpnet", "distilbert"])
def test_houlsby_series_adapters_follow_the_attention_and_the_ffn_output(tiny_encoder_dir, family):
    model = load_encoder(tiny_encoder_dir(family))
    wrapped = attach_adapters(model, adapter_spec(kind="series", placement="both", bottleneck_size=8))
    attention, ffn = {"bert": ("attention.output.dense", "output.dense"), "mpnet": ("attn.o", "output.dense"),
                      "distilbert": ("out_lin", "lin2")}[family]
    layers = [name for name in wrapped if name != "classifier"]
    assert len(layers) == 4  # 2 per layer
    assert sum(n.endswith(attention) for n in layers) == 2
    # BERT's FFN output shares its suffix with the attention output; it must not be matched twice.
    assert sum(n.endswith(ffn) and not n.endswith(attention) for n in layers) == 2


def test_parallel_adapter_beside_each_encoder_attention(tiny_encoder_dir):
    model = load_encoder(tiny_encoder_dir("bert"))
    wrapped = attach_adapters(model, adapter_spec(kind="parallel", placement="attention", bottleneck_size=8))
    assert [n for n in wrapped if n != "classifier"] == [f"bert.encoder.layer.{i}.attention" for i in (0, 1)]
    with pytest.raises(QadaptError, match="no MLP block"):
        attach_adapters(load_encoder(tiny_encoder_dir("bert")), adapter_spec(kind="parallel", placement="mlp"))


def test_an_encoder_that_cannot_checkpoint_says_which_key_to_change(tiny_encoder_dir):
    from qadapt.quant import prepare_for_kbit_training

    with pytest.raises(QadaptError, match="MPNetForTokenClassification does not support gradient checkpointing.*"
                                          "train.gradient_checkpointing: false"):
        prepare_for_kbit_training(load_encoder(tiny_encoder_dir("mpnet")), gradient_checkpointing=True)


def test_int8_encoder_keeps_its_head_unquantized(tiny_encoder_dir):
    import bitsandbytes as bnb

    model = load_encoder(tiny_encoder_dir("roberta"), quant="int8")
    assert type(model.classifier) is torch.nn.Linear
    assert sum(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules()) == 12


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return load_tokenizer(ModelConfig(name="all-minilm-l6-v2"), generates=False)


def test_each_word_is_labelled_on_its_first_piece_only(minilm_tokenizer):
    sentence = Sentence(["Obama", "visited", "Kaohsiung", "yesterday"], ["B-PER", "O", "B-LOC", "O"])
    labels = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    row = tokenize_sentences([sentence], minilm_tokenizer, labels, cutoff_len=64).rows[0]
    pieces = minilm_tokenizer.convert_ids_to_tokens(row["input_ids"])
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]" and len(pieces) > 6  # Kaohsiung is several pieces
    labelled = [(piece, labels[label]) for piece, label in zip(pieces, row["labels"]) if label != -100]
    assert [tag for _, tag in labelled] == sentence.tags
    assert labelled[2][0] == pieces[pieces.index(labelled[2][0])] and not labelled[2][0].startswith("##")


def test_words_past_the_cutoff_are_counted_and_predicted_as_o(minilm_tokenizer, tiny_bert_dir):
    sentence = Sentence([f"word{i}" for i in range(40)], ["O"] * 40)
    tagged = tokenize_sentences([sentence], minilm_tokenizer, ["O"], cutoff_len=16)
    assert tagged.truncated == 1 and len(tagged.rows[0]["input_ids"]) == 16
    model = load_base(ModelConfig(name=str(tiny_bert_dir), quant="nf4", compute_dtype="fp32"),
                      labels=["O", "B-X", "I-X"])
    tags = predict_tags(model, minilm_tokenizer, [sentence], batch_size=4, cutoff_len=16)[0]
    assert len(tags) == 40 and tags[-10:] == ["O"] * 10
    with pytest.raises(QadaptError, match=r"tags \['B-ORG'\] are not among the labels"):
        tokenize_sentences([Sentence(["IBM"], ["B-ORG"])], minilm_tokenizer, ["O"], cutoff_len=16)


def test_strict_iob2_entity_scores():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "O"]]
    # An I- that starts nothing is no entity in strict mode; a span cut short is wrong.
    predicted = [["B-PER", "I-PER", "O", "I-LOC"], ["B-LOC", "O"]]
    scores = entity_scores(gold, predicted)
    assert scores["precision"] == 1.0 and scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(0.8) and scores["entities"] == 3
    assert scores["types"]["LOC"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "entities": 2}
    assert entity_scores(gold, [["B-PER", "O", "O", "B-LOC"], ["B-LOC", "O"]])["types"]["PER"]["f1"] == 0.0


def test_hub_dataset_tags_are_read_by_name(monkeypatch):
    import datasets

    features = datasets.Features({
        "tokens": datasets.Sequence(datasets.Value("string")),
        "ner_tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-PER", "I-PER"])),
    })
    rows = datasets.Dataset.from_dict({"tokens": [["Ada", "Lovelace", "wrote"], []], "ner_tags": [[1, 2, 0], []]},
                                      features=features)
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: asked.append((name, config, split))
                        or rows)
    sentences = load_sentences("someone/ner-set:en", "validation")
    assert asked == [("someone/ner-set", "en", "validation")]
    assert sentences == [Sentence(["Ada", "Lovelace", "wrote"], ["B-PER", "I-PER", "O"])]  # empty row dropped


def test_math_data_or_a_missing_file_is_refused_for_tagging(tmp_path):
    with pytest.raises(QadaptError, match="math problems"):
        load_sentences("builtin:arithmetic")
    with pytest.raises(QadaptError, match="data file not found"):
        load_sentences(str(tmp_path / "train.conll"))


WNUT = SHARED_DATA / "wnut17"


@pytest.mark.skipif(not (WNUT / "wnut17train.conll").is_file(), reason="WNUT-17 not in ../shared/data")
def test_wnut17_recipe_trains_then_eval_scores_entities(tmp_path):
    """The shipped recipe, shortened: `qadapt train` then `qadapt eval` on the embedded MiniLM in NF4."""
    import json

    run = tmp_path / "run"
    trained = qadapt("train", "recipes/wnut17-series.yaml", f"output_dir={run}", "train.max_steps=12",
                     "train.save_every=0", "train.eval_every=0", "data.val_size=32", "eval.sets=[]", offline=True)
    assert trained.returncode == 0, trained.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_loss"] < summary["eval_loss_before"]
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["task"] == "token-classification" and len(config["labels"]) == 13 and config["labels"][0] == "O"

    test_set = WNUT / "emerging.test.annotated"
    scored = qadapt("eval", str(run), "--data", str(test_set), "--limit", "50", offline=True)
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert "| emerging.test.annotated | all |" in scored.stdout
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    row = metrics["sets"]["emerging.test.annotated"]
    assert row["sentences"] == 50 and set(row["types"]) <= {l[2:] for l in config["labels"][1:]}
    assert 0 <= row["f1"] <= 1 and row["entities"] == sum(t["entities"] for t in row["types"].values())
    predictions = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 50 and all(len(p["predicted"]) == len(p["tokens"]) for p in predictions)
