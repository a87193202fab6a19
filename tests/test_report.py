"""`qadapt report`: runs side by side from their directories alone."""

from __future__ import annotations

import json
import re

import pytest

from qadapt.errors import QadaptError
from qadapt.recipe import recipe_from_dict
from qadapt.actions.report import markdown_table, report
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


@pytest.mark.parametrize("first, second", [("1110111011", "0100100010"), ("10" * 30, "01" * 30), ("1111", "1111"),
                                           ("1" * 40 + "0" * 3, "0" * 40 + "1" * 3)])
def test_the_paired_test_is_scipy_s_exact_mcnemar(first, second):
    """McNemar's exact test is a two-sided binomial test on the discordant problems."""
    scipy_stats = pytest.importorskip("scipy.stats")
    from qadapt.scores import mcnemar_p

    gained, lost, p = mcnemar_p(first, second)
    assert (gained, lost) == (sum(a > b for a, b in zip(first, second)), sum(a < b for a, b in zip(first, second)))
    expected = scipy_stats.binomtest(gained, gained + lost, 0.5).pvalue if gained + lost else 1.0
    assert p == pytest.approx(expected, rel=1e-9)


def test_runs_pair_with_the_base_and_their_peft_twin_problem_by_problem():
    from qadapt.actions.report import paired_table

    def row(name, outcomes, trained=True):
        score = {"score": outcomes.count("1") / len(outcomes), "total": len(outcomes), "outcomes": outcomes}
        return {"name": name, "summary": {} if trained else None, "scores": {"AddSub": score}}

    runs = [row("base", "0000000000", trained=False), row("lora", "1111111110"), row("peft-lora", "1111111100")]
    lines = paired_table(runs).splitlines()
    assert lines[2] == "| lora | base | +9 −0 (p=0.0039) |"
    assert lines[3] == "| peft-lora | base | +8 −0 (p=0.0078) |"
    assert lines[4] == "| lora | peft-lora | +1 −0 (p=1) |"
    # --against: every run with a run of the user's choosing (a starting point, a rival), each pair once.
    lines = paired_table(runs, against=["lora"]).splitlines()
    assert lines[2:6] == ["| lora | base | +9 −0 (p=0.0039) |", "| peft-lora | base | +8 −0 (p=0.0078) |",
                              "| lora | peft-lora | +1 −0 (p=1) |", "| base | lora | +0 −9 (p=0.0039) |"]
    assert "| peft-lora | lora | +0 −1 (p=1) |" in lines
    with pytest.raises(QadaptError, match=r"--against dora: no run of that name in the report \(runs: base, lora, "
                                          r"peft-lora\)"):
        paired_table(runs, against=["dora"])


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
