"""`qadapt eval`: sets, scoring of a whole run, and the files it leaves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SHARED_DATA, tiny_recipe

from qadapt.tasks.answers import is_correct
from qadapt.errors import QadaptError
from qadapt.inference.evaluate import run_eval
from qadapt.tasks.math_sets import load_eval_set
from qadapt.scores import set_name
from qadapt.recipe import recipe_from_dict
from qadapt.training.train import train


@pytest.mark.parametrize("spec, name", [
    ("../shared/data/math-eval/AQuA/test.json", "AQuA"),
    ("data/gsm8k/test.jsonl", "gsm8k"),
    ("my_problems.json", "my_problems"),
    ("builtin:arithmetic", "arithmetic"),
    ("openai/gsm8k:main", "gsm8k"),
    ("../shared/data/math-eval/AddSub/test.json@150", "AddSub"),
])
def test_set_names(spec, name):
    assert set_name(spec) == name


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data")
def test_the_papers_sets_load_with_their_answer_kind():
    aqua = load_eval_set(str(SHARED_DATA / "math-eval" / "AQuA" / "test.json"), limit=5)
    assert aqua.multiple_choice and len(aqua.golds) == 5 and all(g in "ABCDE" for g in aqua.golds)
    gsm8k = load_eval_set(str(SHARED_DATA / "gsm8k" / "test.jsonl"))
    assert not gsm8k.multiple_choice and len(gsm8k.golds) == 1319 and gsm8k.golds[0] == 18.0
    for name in ["gsm8k", "AddSub", "SVAMP", "MultiArith", "SingleEq"]:
        assert all(isinstance(g, float) for g in load_eval_set(str(SHARED_DATA / "math-eval" / name / "test.json")).golds)


def test_a_set_with_an_unreadable_answer_is_an_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "q", "input": "", "output": "", "answer": "seven"}]))
    with pytest.raises(QadaptError, match="problem 1 has answer 'seven', not a number or a letter A-E"):
        load_eval_set(str(bad))


def test_run_eval_needs_a_set():
    with pytest.raises(QadaptError, match="at least one evaluation set with --data"):
        run_eval("smollm2-135m", [])


def eval_recipe(tiny_llama_dir, tmp_path, **eval_section) -> dict:
    return tiny_recipe(tiny_llama_dir, tmp_path / "run", adapter={"alpha": 8}, data={"max_examples": 16},
                       train={"max_steps": 2}, eval=eval_section)


def test_a_wrong_eval_set_fails_before_training(tiny_llama_dir, tmp_path):
    recipe = recipe_from_dict(eval_recipe(tiny_llama_dir, tmp_path, sets=["/no/such/test.json"]))
    with pytest.raises(QadaptError, match="data file not found: /no/such/test.json"):
        train(recipe)
    assert not (tmp_path / "run" / "adapter").exists()


def test_training_with_an_eval_section_scores_the_run_and_eval_reproduces_it(tiny_llama_dir, tmp_path):
    recipe = recipe_from_dict(eval_recipe(tiny_llama_dir, tmp_path, sets=["builtin:arithmetic"], limit=4,
                                          max_new_tokens=8, batch_size=3))
    summary = train(recipe).summary
    run = tmp_path / "run"
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    row = metrics["sets"]["arithmetic"]
    assert summary["accuracy"] == {"arithmetic": row["accuracy"]}
    predictions = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == row["total"] == 4
    assert set(predictions[0]) == {"set", "prompt", "output", "extracted", "gold", "correct"}
    assert all(p["correct"] == is_correct(p["extracted"], p["gold"]) for p in predictions)
    assert row["correct"] == sum(p["correct"] for p in predictions)
    assert row["no_answer"] == sum(p["extracted"] is None for p in predictions)
    assert row["seconds"] > 0 and row["cpu_s"] > 0  # each set's scoring time, wall and CPU
    assert row["outcomes"] == "".join("1" if p["correct"] else "0" for p in predictions)  # for paired tests

    # `qadapt eval RUN` reloads base + adapter from the run directory and decodes to the same answers, reading
    # the run's recipe and adapter config once each (qadapt.run_dir.RunDir).
    reads = []
    real_read_text = Path.read_text
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "read_text", lambda self, *a, **k: reads.append(self.name) or real_read_text(self, *a, **k))
        again = run_eval(str(run), ["builtin:arithmetic"], limit=4, max_new_tokens=8, batch_size=4,
                         out=tmp_path / "again")
    assert reads.count("recipe.yaml") == 1 and reads.count("adapter_config.json") == 1, reads
    reloaded = [json.loads(line) for line in (tmp_path / "again" / "predictions.jsonl").read_text().splitlines()]
    assert [p["output"] for p in reloaded] == [p["output"] for p in predictions]
    assert _untimed(again["sets"]) == _untimed(metrics["sets"])

    # --resume keeps the sets already scored with the same settings and scores only the new ones.
    kept_file = tmp_path / "again" / "predictions.jsonl"
    kept_file.write_text(kept_file.read_text().replace('"output": "', '"output": "KEPT ', 1))
    both = run_eval(str(run), ["builtin:arithmetic", "builtin:word-problems"], limit=4, max_new_tokens=8,
                    out=tmp_path / "again", resume=True)
    rows = [json.loads(line) for line in (tmp_path / "again" / "predictions.jsonl").read_text().splitlines()]
    assert rows[0]["output"].startswith("KEPT ")  # read back, not decoded again
    assert [p["set"] for p in rows] == ["arithmetic"] * 4 + ["word-problems"] * 4
    assert both["sets"]["arithmetic"] == again["sets"]["arithmetic"] and both["sets"]["word-problems"]["total"] == 4
    first_three = run_eval(str(run), ["builtin:arithmetic@3", "builtin:word-problems"], limit=4, max_new_tokens=8,
                           out=tmp_path / "again", resume=True)  # a set's first 3: that set scored again
    rows = [json.loads(line) for line in (tmp_path / "again" / "predictions.jsonl").read_text().splitlines()]
    assert first_three["sets"]["arithmetic"]["total"] == 3 and first_three["sets"]["word-problems"]["total"] == 4
    assert [p["set"] for p in rows].count("arithmetic") == 3 and not rows[-1]["output"].startswith("KEPT ")
    assert first_three["sets"]["word-problems"] == both["sets"]["word-problems"]
    other = run_eval(str(run), ["builtin:word-problems"], limit=2, max_new_tokens=8, out=tmp_path / "again",
                     resume=True)  # another limit: nothing kept
    assert list(other["sets"]) == ["word-problems"] and other["sets"]["word-problems"]["total"] == 2

    # Without --out, --resume finds the scores in the run's own eval/ folder (the training's here).
    own = run / "eval" / "predictions.jsonl"
    own.write_text(own.read_text().replace('"output": "', '"output": "KEPT ', 1))
    run_eval(str(run), ["builtin:arithmetic"], limit=4, max_new_tokens=8, resume=True)
    assert json.loads(own.read_text().splitlines()[0])["output"].startswith("KEPT ")


def _untimed(sets: dict) -> dict:
    """Set rows without their scoring times, which differ from one evaluation to the next."""
    return {name: {k: v for k, v in row.items() if k not in ("seconds", "cpu_s")} for name, row in sets.items()}
