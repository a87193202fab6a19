"""Recipes load strictly: every shipped one validates; bad keys and values name what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO

from qadapt.errors import QadaptError
from qadapt.recipe import load_recipe, recipe_from_dict

ACCELERATE_CONFIGS = sorted((REPO / "recipes" / "accelerate").glob("*.yaml"))  # for `accelerate launch`
SHIPPED = sorted(set((REPO / "recipes").rglob("*.yaml")) - set(ACCELERATE_CONFIGS))


def test_recipes_are_shipped():
    names = {p.name for p in SHIPPED}
    assert {"quickstart.yaml", "gsm8k-lora.yaml", "llama2-7b-qlora-24gb.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_recipe_loads_and_names_its_command(path: Path):
    recipe = load_recipe(path)
    assert recipe.output_dir
    first = path.read_text().splitlines()[0]  # the command, plain or under `accelerate launch ... -m`
    assert first == f"# qadapt train {path.relative_to(REPO)}" or first.startswith(
        f"# qadapt sweep {path.relative_to(REPO)} ") or (
        first.startswith("# accelerate launch --config_file recipes/accelerate/")
        and first.endswith(f" -m qadapt train {path.relative_to(REPO)}"))


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_launch_without_their_own_mixed_precision(path: Path):
    import yaml

    config = yaml.safe_load(path.read_text())
    assert config["distributed_type"] in ("MULTI_GPU", "FSDP") and config["mixed_precision"] == "no"
    if config["distributed_type"] == "FSDP":  # qadapt's wrap policy needs flat parameters of one requires_grad
        assert config["fsdp_config"]["fsdp_use_orig_params"] is False


def test_unknown_key_names_it_the_valid_keys_and_a_near_miss():
    with pytest.raises(QadaptError) as error:
        recipe_from_dict({"train": {"lrr": 1e-4}})
    message = str(error.value)
    assert "unknown key 'train.lrr'" in message
    assert "did you mean 'train.lr'" in message
    assert "micro_batch_size" in message and "grad_accum" in message


def test_unknown_section_is_reported():
    with pytest.raises(QadaptError, match="unknown key 'modle'.*did you mean 'model'"):
        recipe_from_dict({"modle": {"name": "x"}})


def test_bad_choice_lists_the_choices():
    with pytest.raises(QadaptError, match="model.quant: 'nf5' is not one of nf4, fp4, int8, none"):
        recipe_from_dict({"model": {"quant": "nf5"}})


def test_all_problems_are_collected_then_raised_once():
    with pytest.raises(QadaptError) as error:
        recipe_from_dict({"model": {"quant": "q3"}, "adapter": {"rank": 0}, "train": {"max_steps": "many"}})
    message = str(error.value)
    assert "has 3 problems" in message
    assert "model.quant" in message and "adapter.rank must be at least 1" in message
    assert "train.max_steps: expected a whole number, got 'many'" in message


def test_data_path_takes_one_source_or_a_list_and_multiple_choice_is_a_share():
    assert recipe_from_dict({}, ["data.path=a.jsonl"]).data.sources == ["a.jsonl"]
    assert recipe_from_dict({}, ["data.path=[a.jsonl,builtin:word-problems]"]).data.sources == [
        "a.jsonl", "builtin:word-problems"]
    with pytest.raises(QadaptError, match=r"data.multiple_choice must be in \[0, 1\]"):
        recipe_from_dict({"data": {"multiple_choice": 1.5}})


def test_overrides_are_type_checked_and_applied():
    recipe = recipe_from_dict({}, ["train.lr=1e-4", "model.quant=int8", "adapter.targets=[q_proj,v_proj]"])
    assert recipe.train.lr == pytest.approx(1e-4)
    assert recipe.model.quant == "int8"
    assert recipe.adapter.targets == ["q_proj", "v_proj"]
    with pytest.raises(QadaptError, match="train.micro_batch_size: expected a whole number, got 'four'"):
        recipe_from_dict({}, ["train.micro_batch_size=four"])
    with pytest.raises(QadaptError, match="not of the form section.key=value"):
        recipe_from_dict({}, ["train.lr"])


def test_booleans_are_not_numbers_and_numbers_are_not_booleans():
    with pytest.raises(QadaptError, match="expected true or false"):
        recipe_from_dict({"train": {"gradient_checkpointing": 1}})
    with pytest.raises(QadaptError, match="expected a whole number"):
        recipe_from_dict({"adapter": {"rank": True}})


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    # PyYAML reads 3e-4 as text; a recipe writer means a number.
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  lr: 3e-4\n")
    assert load_recipe(path).train.lr == pytest.approx(3e-4)


def test_missing_and_malformed_recipe_files(tmp_path):
    with pytest.raises(QadaptError, match=r"recipe not found: .*nope\.yaml"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(QadaptError, match="not valid YAML"):
        load_recipe(bad)
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(QadaptError, match="must be a mapping"):
        load_recipe(tmp_path / "list.yaml")


def test_bottleneck_options_are_checked():
    recipe = recipe_from_dict({"adapter": {"kind": "series", "scale": "learned", "activation": "gelu"}})
    assert recipe.adapter.scale == "learned"
    assert recipe_from_dict({"adapter": {"kind": "parallel", "scale": "0.5"}}).adapter.scale == 0.5
    # A lora adapter reads past the bottleneck keys (a saved run lists them all), their values still checked.
    assert recipe_from_dict({"adapter": {"kind": "lora", "bottleneck_size": 64}}).adapter.kind == "lora"
    with pytest.raises(QadaptError, match="adapter.scale: expected a finite number or one of learned, got 'big'"):
        recipe_from_dict({"adapter": {"scale": "big"}})
    with pytest.raises(QadaptError, match="adapter.targets apply to lora, dora and placement: linears"):
        recipe_from_dict({"adapter": {"kind": "parallel", "placement": "mlp", "targets": ["up_proj"]}})
    with pytest.raises(QadaptError, match="adapter.activation: 'swish' is not one of tanh, relu, gelu, silu"):
        recipe_from_dict({"adapter": {"activation": "swish"}})


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.read_text().startswith("# qadapt sweep ")],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_a_shipped_sweep_command_names_runs_that_all_load(path: Path, tmp_path):
    import shlex

    from qadapt.actions.sweep import plan_sweep

    words = shlex.split(path.read_text().splitlines()[0][2:])
    grids = [words[i + 1] for i, word in enumerate(words) if word == "--grid"]
    state = plan_sweep(path, grids, [], tmp_path)  # loads every run's recipe
    names = [run.name for run in state.runs]
    assert len(names) == len(set(names)) >= 4 and names[:4] == ["lora", "dora", "series-mlp", "parallel-mlp"]


def test_the_recipes_adapter_kinds_are_the_adapter_packages():
    from typing import get_args, get_type_hints

    from qadapt.adapters.kinds import KINDS
    from qadapt.adapters.spec import SPECS
    from qadapt.recipe import Recipe

    assert get_args(get_type_hints(Recipe)["adapter"]) == SPECS
    assert [kind for spec in SPECS for kind in get_args(get_type_hints(spec)["kind"])] == list(KINDS)
    for kind in KINDS:
        spec = recipe_from_dict({"adapter": {"kind": kind, "targets": ["up_proj"], "placement": "linears"}}).adapter
        assert spec.kind == kind and spec.targets == ["up_proj"]
        assert type(spec) is KINDS[kind].spec


def test_the_recipes_templates_are_the_text_templates_and_chat():
    """One list of plain-text templates (qadapt.text_templates); the recipe schema names each of them."""
    from typing import get_args

    from qadapt.recipe import Template
    from qadapt.text_templates import TEXT_TEMPLATES

    assert set(get_args(Template)) == {*TEXT_TEMPLATES, "chat"}
