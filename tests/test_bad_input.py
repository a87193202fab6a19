"""Bad input gets one clear line: random recipes, overrides and data rows never raise anything but QadaptError."""

from __future__ import annotations

import json
from dataclasses import fields, is_dataclass

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qadapt import data as D
from qadapt.errors import QadaptError
from qadapt.recipe import Recipe, load_recipe, recipe_from_dict

SECTIONS = {f.name: [g.name for g in fields(getattr(Recipe(), f.name))]
            for f in fields(Recipe) if is_dataclass(getattr(Recipe(), f.name))}
KEYS = [f"{section}.{key}" for section, keys in SECTIONS.items() for key in keys] + ["output_dir"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["nf4", "int8", "lora", "series", "adamw", "learned", "cosine", "3e-4"]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                          max_size=3), max_leaves=6)
names = st.one_of(st.sampled_from(list(SECTIONS) + KEYS), st.text(max_size=10))


@st.composite
def raw_recipes(draw):
    """A mapping mostly shaped like a recipe: real sections and keys, some unknown ones, random values."""
    raw = {}
    for section in draw(st.lists(st.sampled_from(list(SECTIONS) + ["output_dir", "extra"]), max_size=5)):
        if section in SECTIONS and draw(st.booleans()):
            keys = draw(st.lists(st.sampled_from(SECTIONS[section]) | st.text(max_size=8), max_size=4))
            raw[section] = {key: draw(values) for key in keys}
        else:
            raw[section] = draw(values)
    return raw


overrides = st.lists(st.one_of(
    st.builds(lambda key, value: f"{key}={value}", names, st.text(max_size=10)),
    st.builds(lambda key, value: f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}", names, values),
    st.text(max_size=15),
), max_size=4)


def _loads_or_says_why(call):
    try:
        result = call()
    except QadaptError as error:
        message = str(error)
        assert message and "Traceback" not in message
        return None
    assert isinstance(result, Recipe)
    return result


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=raw_recipes(), extra=overrides)
def test_random_recipes_and_overrides_load_or_fail_with_a_clear_error(raw, extra):
    _loads_or_says_why(lambda: recipe_from_dict(raw, extra))


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=80) | st.builds(lambda v: yaml.safe_dump(v), values))
def test_random_recipe_files_load_or_fail_with_a_clear_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    path.write_text(text)
    _loads_or_says_why(lambda: load_recipe(path))


@settings(max_examples=200, deadline=None)
@given(key=st.sampled_from(KEYS), value=values)
def test_any_value_for_any_key_is_accepted_or_named(key, value):
    override = f"{key}={json.dumps(value, allow_nan=True)}"
    recipe = _loads_or_says_why(lambda: recipe_from_dict({}, [override]))
    if recipe is None:  # the error names the key it is about
        with pytest.raises(QadaptError, match=key.replace(".", r"\.")):
            recipe_from_dict({}, [override])


rows = st.one_of(values, st.fixed_dictionaries({"question": values, "answer": values}),
                 st.fixed_dictionaries({"instruction": values, "output": values}, optional={"input": values}))


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(st.one_of(rows.map(json.dumps), st.text(max_size=20)), max_size=6),
       mode=st.sampled_from(["fail", "skip"]))
def test_random_jsonl_rows_become_records_or_a_clear_error(tmp_path_factory, lines, mode):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("\n".join(lines))
    try:
        records = D.load_examples(str(path), bad_rows=mode)
    except QadaptError as error:
        assert str(path) in str(error)
        return
    assert records and all(isinstance(r[k], str) for r in records for k in ("instruction", "input", "output", "answer"))


def test_a_model_that_is_not_a_decoder_or_unknown_is_one_clear_line(tmp_path):
    import transformers

    from qadapt.models import load_base
    from qadapt.recipe import ModelConfig

    transformers.T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8).save_pretrained(
        tmp_path / "t5")
    with pytest.raises(QadaptError, match="is a t5 model without a causal language-model head"):
        load_base(ModelConfig(name=str(tmp_path / "t5")))
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"model_type": "frobnicator"}')
    with pytest.raises(QadaptError, match="model type 'frobnicator', which transformers .* does not know"):
        load_base(ModelConfig(name=str(tmp_path / "odd")))


def test_a_tokenizer_without_eos_is_refused_and_one_without_pad_pads_with_eos(smol_tokenizer, tmp_path):
    from qadapt.models import load_tokenizer
    from qadapt.recipe import ModelConfig

    smol_tokenizer.save_pretrained(tmp_path / "no-pad")
    config = json.loads((tmp_path / "no-pad" / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (tmp_path / "no-pad" / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(ModelConfig(name=str(tmp_path / "no-pad")))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id is not None
    config["eos_token"] = None
    (tmp_path / "no-pad" / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(QadaptError, match="has no EOS token"):
        load_tokenizer(ModelConfig(name=str(tmp_path / "no-pad")))


@pytest.mark.parametrize("overrides, message", [
    (["data.cutoff_len=8"], "data.cutoff_len 8 is shorter than every prompt"),
    (["train.optimizer=sgd"], "train.optimizer: 'sgd' is not one of adamw, adamw_8bit"),
    (["data.path=EMPTY"], "no examples in"),
])
def test_training_inputs_that_cannot_work_fail_before_training(tiny_llama_dir, tmp_path, overrides, message):
    from qadapt.training.train import train

    (tmp_path / "empty.jsonl").write_text("\n\n")
    overrides = [o.replace("EMPTY", str(tmp_path / "empty.jsonl")) for o in overrides]
    with pytest.raises(QadaptError, match=message):
        train(recipe_from_dict({"model": {"name": str(tiny_llama_dir)}, "output_dir": str(tmp_path / "run")},
                               overrides))
