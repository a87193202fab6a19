"""`qadapt report`: runs side by side from their directories alone."""

from __future__ import annotations

import pytest

from qadapt.errors import QadaptError
from qadapt.recipe import recipe_from_dict
from qadapt.report import report
from qadapt.train import train


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
    out = tmp_path / "report.md"
    table = report(two_runs, out=out)
    assert out.read_text() == table + "\n"
    header, _, lora, series = table.splitlines()
    assert header.startswith("| run | kind | trainable params |") and header.endswith("| arithmetic |")
    assert lora.startswith("| lora | lora |") and series.startswith("| series | series |")
    assert lora.endswith("% |") and "| 3 |" in lora  # accuracy column, 3 steps


def test_the_plot_is_a_png(two_runs, tmp_path):
    pytest.importorskip("matplotlib")
    picture = tmp_path / "runs.png"
    report(two_runs, plot_path=picture)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_folder_that_is_not_a_finished_run_is_named(tmp_path):
    with pytest.raises(QadaptError, match=f"{tmp_path} is not a run directory"):
        report([tmp_path])
