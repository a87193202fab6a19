"""`qadapt report`: runs side by side from their directories alone."""

from __future__ import annotations

import json
import re

import pytest

from qadapt.errors import QadaptError
from qadapt.recipe import recipe_from_dict
from qadapt.report import markdown_table, report
from qadapt.scores import wilson_interval
from qadapt.training.train import train


@pytest.fixture(scope="module")
def two_runs(tiny_llama_dir, tmp_path_factory):
    runs = []
    for kind in ["lora", "series"]:
        folder = tmp_path_factory.mktemp("report") / kind
        train(recipe_from_dict({
            "model": {"name": str(tiny_llama_dir), "quant": "nf4"},
            "adapter": {"kind": kind, "rank": 4, "bottleneck_size": 8},
            "data": {"max_examples": 16, "val_size": 4},
            "train": {"max_steps": 3, "micro_batch_size": 2, "grad_accum": 1, "eval_every": 0, "save_every": 0},
            "eval": {"sets": ["builtin:arithmetic"], "limit": 2, "max_new_tokens": 4},
            "output_dir": str(folder),
        }))
        runs.append(folder)
    return runs


def test_the_table_compares_kind_size_loss_and_accuracy(two_runs, tmp_path):
    out, json_out = tmp_path / "report.md", tmp_path / "report.json"
    table = report(two_runs, out=out, json_path=json_out)
    assert out.read_text() == table + "\n"
    header, _, lora, series, _, note, machine = table.splitlines()
    assert machine.startswith("Wall times measured on: ") and "threads)" in machine
    assert header.startswith("| run | kind | trainable params |") and header.endswith("| arithmetic (n=2) |")
    assert lora.startswith("| lora | lora |") and series.startswith("| series | series |")
    assert "| 3 |" in lora and re.search(r"\| \d+\.\d \(\d+\.\d–\d+\.\d\) \|$", lora)  # accuracy (interval)
    assert "95% Wilson interval" in note
    figures = json.loads(json_out.read_text())
    assert [r["kind"] for r in figures["runs"]] == ["lora", "series"]
    assert figures["runs"][0]["scores"]["arithmetic"]["total"] == 2


def test_wilson_intervals_match_known_values():
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(1319, 1319)[1] == 1.0


def test_mawps_derived_sets_stand_apart_after_the_held_out_ones():
    def run(name):
        return {"name": name, "summary": None, "recipe": None, "scoring_s": 750.0, "scoring_cpu_s": 1490.0, "scores": {
            s: {"score": 0.5, "correct": 5, "total": 10, "low": 0.24, "high": 0.76}
            for s in ["AddSub", "gsm8k", "SingleEq", "AQuA", "custom"]}}

    header = markdown_table([run("base")]).splitlines()[0]
    assert header.index("gsm8k") < header.index("AQuA") < header.index("AddSub (n=10) ¹") < header.index("SingleEq")
    assert header.index("SingleEq") < header.index("custom")
    assert markdown_table([run("base")]).splitlines()[2].startswith("| base | base (untrained) | 0 |  |  |  | 12 min |")
    assert "derived from MAWPS" in markdown_table([run("base")])


def test_the_plot_is_a_png(two_runs, tmp_path):
    pytest.importorskip("matplotlib")
    picture = tmp_path / "runs.png"
    report(two_runs, plot_path=picture)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_folder_that_is_not_a_finished_run_is_named(tmp_path):
    with pytest.raises(QadaptError, match=f"{tmp_path} is not a run directory"):
        report([tmp_path])


def test_scores_with_the_calculator_are_a_row_of_their_own(two_runs, tmp_path):
    import shutil

    from qadapt.inference.evaluate import run_eval

    run = tmp_path / "lora"
    shutil.copytree(two_runs[0], run)
    run_eval(str(run), ["builtin:arithmetic"], limit=3, max_new_tokens=4, calculator=True)
    assert json.loads((run / "eval-calculator" / "metrics.json").read_text())["calculator"] is True
    assert json.loads((run / "eval" / "metrics.json").read_text())["sets"]["arithmetic"]["total"] == 2  # untouched
    _, _, paper, calculated, *_ = report([run]).splitlines()
    assert paper.startswith("| lora | lora |") and paper.endswith(" n=2 |")  # the sets differ in size: n shown
    assert calculated.startswith("| lora + calculator | lora |")
    assert re.search(r"\| \d+\.\d \(\d+\.\d–\d+\.\d\) n=3 \|$", calculated)
