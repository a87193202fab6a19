"""Many adapters on one base, measured: load the base once, each run's adapter into an AdapterBank, and
report per adapter its file size, load and switch times, trainable parameters and entity scores.

    .venv/bin/python tools/adapter_bank_report.py runs/wnut17-series runs/wnut17-lora runs/wnut17-parallel \\
        --data ../shared/data/wnut17/emerging.test.annotated [--json report.json]

Every run must be a token-classification run on the same base. Before the adapters, the same sets are
scored with freshly attached adapters and an untrained head (the first run's adapter config, seed 0):
the floor that training has to clear. Times are wall-clock on this machine, each measured once.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from qadapt.inference.adapter_bank import AdapterBank
from qadapt.adapters import attach_adapters
from qadapt.inference.loader import head_labels, load_frozen_base
from qadapt.run_dir import RunDir
from qadapt.tasks import task_named
from qadapt.tasks.token_classification import entity_scores, load_sentences, predict_tags


def scores(model, tokenizer, sets: dict, cutoff_len: int) -> dict[str, dict]:
    return {name: entity_scores([s.tags for s in sentences],
                                predict_tags(model, tokenizer, sentences, 64, cutoff_len))
            for name, sentences in sets.items()}


def untrained(run_dir: Path, tokenizer, sets: dict) -> dict[str, dict]:
    run = RunDir(run_dir)
    recipe = run.trained_recipe
    torch.manual_seed(0)
    model, _ = load_frozen_base(recipe.model, head_labels(run.adapter))
    attach_adapters(model, recipe.adapter)
    model.eval()
    return scores(model, tokenizer, sets, recipe.data.cutoff_len)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--data", action="append", required=True, help="A CoNLL set to score; repeatable.")
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    args = parser.parse_args()
    torch.set_num_threads(2)
    first = RunDir(args.runs[0]).trained_recipe
    tokenizer = task_named(first.task).load_tokenizer(first.model)
    sets = {Path(spec).name: load_sentences(spec, "test") for spec in args.data}
    report = {"untrained": untrained(args.runs[0], tokenizer, sets)}

    bank = AdapterBank.from_runs(args.runs)
    report.update(base=first.model.name, quant=first.model.quant, base_load_s=bank.base_load_s, adapters={})
    for run_dir in args.runs:
        name = run_dir.name
        started = time.perf_counter()
        bank.activate(name)
        switch_s = time.perf_counter() - started
        loaded = bank.adapters[name]
        run = RunDir(run_dir)
        summary = run.summary
        report["adapters"][name] = {
            "kind": loaded.config.kind, "trainable_params": summary["trainable_params"],
            "file_mb": loaded.file_bytes / 1e6, "load_s": loaded.load_s, "switch_s": switch_s,
            "train_wall_s": summary["wall_s"],
            "sets": scores(bank.model, tokenizer, sets, run.trained_recipe.data.cutoff_len),
        }
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def print_report(report: dict) -> None:
    set_names = list(report["untrained"])
    print(f"base {report['base']} ({report['quant']}): loaded and quantized in {report['base_load_s']:.2f} s")
    header = ["adapter", "kind", "trainable params", "file MB", "load ms", "switch ms", "train s",
              *[f"{n} P / R / F1" for n in set_names]]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))

    def cells(row: dict) -> list[str]:
        return [f"{100 * row[n]['precision']:.1f} / {100 * row[n]['recall']:.1f} / {100 * row[n]['f1']:.1f}"
                for n in set_names]

    print("| untrained head | | | | | | | " + " | ".join(cells(report["untrained"])) + " |")
    for name, a in report["adapters"].items():
        print(f"| {name} | {a['kind']} | {a['trainable_params']:,} | {a['file_mb']:.2f} | {1e3 * a['load_s']:.1f} | "
              f"{1e3 * a['switch_s']:.1f} | {a['train_wall_s']:.0f} | " + " | ".join(cells(a["sets"])) + " |")


if __name__ == "__main__":
    main()
