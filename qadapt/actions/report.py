"""`qadapt report`: runs side by side, as a markdown table, JSON and (with matplotlib) a picture.

Everything comes from the run directories: recipe.yaml, summary.json, metrics.jsonl, eval/metrics.json.
A folder holding only `eval/metrics.json` (an untrained base scored by `qadapt sweep`) is a row too.
Scores with the calculator (`eval-calculator/`, `qadapt eval --calculator`) are a row of their own,
"NAME + calculator", never mixed into the paper protocol's.

Each accuracy is shown with the number of problems and its 95% Wilson score interval, so a reader sees
when two runs do not differ: on 100 problems, 5% and 10% overlap. The sets derived from MAWPS (AddSub,
MultiArith, SingleEq) share problems with MAWPS-derived training data (`math_data.json`, the paper's
math_10k), so the table keeps them apart from GSM8K, SVAMP and AQuA. Where scores keep their
per-problem outcomes, a second table pairs each run with the untrained base and with its PEFT twin
(`peft-NAME`) problem by problem (exact McNemar test).
"""

from __future__ import annotations

import json
from pathlib import Path

from qadapt.errors import QadaptError
from qadapt.files import atomic_file
from qadapt.machine import one_line
from qadapt.run_dir import EVAL_METRICS_FILE, RunDir
from qadapt.scores import mcnemar_p, wilson_interval

HELD_OUT_SETS = ("gsm8k", "svamp", "aqua")  # no MAWPS-derived training problem shares their text
MAWPS_SETS = ("addsub", "multiarith", "singleeq", "mawps")  # overlap MAWPS-derived training data


def read_runs(run_dir: Path) -> list[dict]:
    """The rows of one run: as scored by the paper's protocol, then with the calculator if it was."""
    run = read_run(run_dir)
    calculator_scores = RunDir(run_dir).scores(calculator=True)
    if calculator_scores is None:
        return [run]
    sets = calculator_scores["sets"]
    return [run, run | {"name": f"{run['name']} + calculator", "losses": [], "eval_losses": [], "rewards": [], "margins": [],
                        "scores": {name: _score(row) for name, row in sets.items()},
                        "scoring_s": _total(sets, "seconds"), "scoring_cpu_s": _total(sets, "cpu_s")}]


def read_run(run_dir: Path) -> dict:
    """What a report shows of one run: its recipe, summary, loss curve and scores per set."""
    run = RunDir(run_dir)
    scores = run.scores()
    trained = run.is_run()
    if not trained and scores is None:
        raise QadaptError(f"{run.path} is not a run directory (no {run.RECIPE}) nor an evaluated model "
                          f"(no {run.EVAL}/{EVAL_METRICS_FILE})")
    if trained and not run.finished():
        raise QadaptError(f"run {run.path} has not finished (no {run.SUMMARY})")
    rows = [json.loads(line) for line in run.training_log.read_text().splitlines() if line.strip()] if trained else []
    sets = scores["sets"] if scores else {}
    return {
        "name": run.path.name,
        "recipe": run.recipe if trained else None,
        "summary": run.summary if trained else None,
        "losses": [(r["step"], r["loss"]) for r in rows if "loss" in r],
        "eval_losses": [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r],
        "rewards": [(r["step"], r["reward"]) for r in rows if "reward" in r],  # a run that learned from rewards
        "margins": [(r["step"], r["margin"]) for r in rows if "margin" in r],  # one that learned from pairs
        "scores": {name: _score(row) for name, row in sets.items()},
        "scoring_s": _total(sets, "seconds"),
        "scoring_cpu_s": _total(sets, "cpu_s"),
    }


def _total(sets: dict, key: str) -> float | None:
    """The sum of a per-set figure, when every set has it (evaluations from before sets were timed have none)."""
    values = [row.get(key) for row in sets.values()]
    return sum(values) if values and None not in values else None


def _score(row: dict) -> dict:
    """A math set's accuracy with its count and interval, or a tagging set's entity F1 (no interval)."""
    if "accuracy" not in row:
        return {"score": row["f1"]}
    low, high = wilson_interval(row["correct"], row["total"])
    score = {"score": row["accuracy"], "correct": row["correct"], "total": row["total"], "low": low, "high": high}
    return score | ({"outcomes": row["outcomes"]} if "outcomes" in row else {})


def pairs(runs: list[dict], against: list[str] = ()) -> list[tuple[str, str]]:
    """(run, what it is compared with): every trained run against the untrained base (`base`), a run `X`
    against its PEFT twin `peft-X` (tools/peer_fidelity.py) when the report has them, and every run against
    each run named in `against` (a starting point, a rival)."""
    names = [run["name"] for run in runs]
    unknown = [name for name in against if name not in names]
    if unknown:
        raise QadaptError(f"--against {unknown[0]}: no run of that name in the report (runs: {', '.join(names)})")
    found = [(run["name"], "base") for run in runs if run["summary"] is not None and "base" in names]
    found += [(name, f"peft-{name}") for name in sorted(names) if f"peft-{name}" in names]
    found += [(name, other) for other in against for name in names if name != other]
    return list(dict.fromkeys(found))


def paired(runs: list[dict], against: list[str] = ()) -> list[dict]:
    """For each pair and each set both scored on the same problems (per-problem outcomes kept): problems only
    the run got right, only the other got right, and the exact two-sided McNemar p."""
    by_name = {run["name"]: run for run in runs}
    rows = []
    for name, other in pairs(runs, against):
        for set_name_, score in by_name[name]["scores"].items():
            theirs = by_name[other]["scores"].get(set_name_, {})
            if "outcomes" in score and len(theirs.get("outcomes", "")) == len(score["outcomes"]):
                gained, lost, p = mcnemar_p(score["outcomes"], theirs["outcomes"])
                rows.append({"run": name, "against": other, "set": set_name_, "gained": gained, "lost": lost, "p": p})
    return rows


def paired_table(runs: list[dict], against: list[str] = ()) -> str:
    """A markdown table of `paired`: one line per pair, a cell per set, empty when nothing pairs."""
    rows = paired(runs, against)
    if not rows:
        return ""
    set_names = [n for n in ordered_sets(runs) if any(r["set"] == n for r in rows)]
    cells = {(r["run"], r["against"], r["set"]): f"+{r['gained']} −{r['lost']} (p={r['p']:.2g})" for r in rows}
    lines = ["| run | against | " + " | ".join(set_names) + " |", "|" + "---|" * (len(set_names) + 2)]
    for name, other in dict.fromkeys((r["run"], r["against"]) for r in rows):
        lines.append(f"| {name} | {other} | " + " | ".join(cells.get((name, other, n), "") for n in set_names) + " |")
    return ("\n".join(lines) + "\n\nPaired on the same problems: problems only the run got right (+), only the "
            "other (−), and the exact two-sided McNemar p; p ≥ 0.05 says the two do not differ on that set.")


def ordered_sets(runs: list[dict]) -> list[str]:
    """Set names: the held-out math sets first, then the MAWPS-derived ones, then any others."""
    names = {name for run in runs for name in run["scores"]}

    order = HELD_OUT_SETS + MAWPS_SETS

    def group(name: str) -> tuple[int, int, str]:
        key = name.lower()
        return (0 if key in HELD_OUT_SETS else 1 if key in MAWPS_SETS else 2), \
            order.index(key) if key in order else 0, key

    return sorted(names, key=group)


def markdown_table(runs: list[dict]) -> str:
    set_names = ordered_sets(runs)
    totals = {n: {run["scores"][n].get("total") for run in runs if n in run["scores"]} for n in set_names}
    set_headers = [f"{n} (n={next(iter(totals[n]))})" if len(totals[n]) == 1 and None not in totals[n] else n
                   for n in set_names]
    if any(n.lower() in MAWPS_SETS for n in set_names):
        set_headers = [f"{h} ¹" if n.lower() in MAWPS_SETS else h for n, h in zip(set_names, set_headers)]
    header = ["run", "kind", "trainable params", "steps", "tokens", "training time", "scoring time", "final loss",
              "held-out loss", *set_headers]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        s = run["summary"]
        scoring = "" if run["scoring_s"] is None else _duration(run["scoring_s"])
        if s is None:
            cells = [run["name"], "base (untrained)", "0", "", "", "", scoring, "", ""]
        else:
            held_out = "" if s.get("eval_loss") is None else f"{s['eval_loss']:.4f}"
            cells = [run["name"], run["recipe"].adapter.kind, f"{s['trainable_params']:,}", str(s["steps"]),
                     f"{s['tokens_seen']:,}", _duration(s["wall_s"]), scoring, f"{s['last_loss']:.4f}", held_out]
        cells += [_cell(run["scores"][n], len(totals[n]) > 1) if n in run["scores"] else "" for n in set_names]
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["Accuracy in %, with its 95% Wilson interval."]
    machines = sorted({one_line(r["summary"]["machine"]) for r in runs if r["summary"] and "machine" in r["summary"]})
    if machines:  # wall times mean little without the machine that made them
        notes.append(f"Wall times measured on: {'; '.join(machines)}.")
    if any(n.lower() in MAWPS_SETS for n in set_names):
        notes.append("¹ derived from MAWPS, like part of math_data.json / math_10k: training data may share "
                     "their problems (see the data line on overlap), so they are not held-out tests.")
    return "\n".join(lines) + "\n\n" + "\n".join(notes)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 600 else f"{seconds / 60:.0f} min"


def _cell(score: dict, with_total: bool) -> str:
    if "total" not in score:
        return f"{100 * score['score']:.1f}"
    text = f"{100 * score['score']:.1f} ({100 * score['low']:.1f}–{100 * score['high']:.1f})"
    return text + (f" n={score['total']}" if with_total else "")


def report_json(runs: list[dict], against: list[str] = ()) -> dict:
    """The figures behind the table, for scripts: per run its settings, summary and scores."""
    return {"runs": [{
        "name": run["name"],
        "kind": run["recipe"].adapter.kind if run["recipe"] else "base",
        "recipe": run["recipe"].to_dict() if run["recipe"] else None,
        "summary": run["summary"],
        "scores": run["scores"],
        "scoring_s": run["scoring_s"],
        "scoring_cpu_s": run["scoring_cpu_s"],
    } for run in runs], "sets": ordered_sets(runs), "paired": paired(runs, against)}


# Curves beside the loss, for the runs that log them: (key in read_run, y label, title).
CURVES = (("rewards", "mean reward of the step's completions", "reward"),
          ("margins", "chosen − rejected implicit reward", "preference margin"))


def plot(runs: list[dict], path: Path) -> None:
    """Training and held-out loss curves on the left, then the mean reward of runs that learned from rewards
    and the margin of runs that learned from pairs, then scores per set (with intervals)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise QadaptError("a plot needs matplotlib: pip install 'qadapt[plot]'") from None
    set_names = ordered_sets(runs)
    curves = [(key, ylabel, title) for key, ylabel, title in CURVES if any(run.get(key) for run in runs)]
    panels = 1 + len(curves) + bool(set_names)
    fig, axes = plt.subplots(1, panels, figsize=(0.5 + 6 * panels, 4.5), squeeze=False)
    loss_ax = axes[0][0]
    for run in runs:
        if not run["losses"]:
            continue
        steps, losses = zip(*run["losses"])
        line, = loss_ax.plot(steps, _running_mean(losses, 8), label=f"{run['name']} train (mean of 8)")
        if run["eval_losses"]:
            loss_ax.plot(*zip(*run["eval_losses"]), "o--", color=line.get_color(), label=f"{run['name']} held-out")
    loss_ax.set(xlabel="step", ylabel="loss", title="loss")
    loss_ax.legend(fontsize="small")
    for ax, (key, ylabel, title) in zip(axes[0][1:], curves):
        for run in runs:
            if run.get(key):
                steps, values = zip(*run[key])
                ax.plot(steps, _running_mean(values, 8), label=f"{run['name']} (mean of 8 steps)")
        ax.set(xlabel="step", ylabel=ylabel, title=title)
        ax.legend(fontsize="small")
    if set_names:
        acc_ax, width = axes[0][-1], 0.8 / len(runs)
        for i, run in enumerate(runs):
            xs = [j + i * width for j in range(len(set_names))]
            scores = [run["scores"].get(n, {"score": 0}) for n in set_names]
            heights = [100 * s["score"] for s in scores]
            errors = [[100 * (s["score"] - s.get("low", s["score"])) for s in scores],
                      [100 * (s.get("high", s["score"]) - s["score"]) for s in scores]]
            acc_ax.bar(xs, heights, width, yerr=errors, capsize=2, label=run["name"])
        acc_ax.set_xticks([j + 0.4 - width / 2 for j in range(len(set_names))], set_names)
        acc_ax.set(ylabel="score % (95% interval)", title="accuracy")
        acc_ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _running_mean(values: tuple[float, ...], window: int) -> list[float]:
    """Mean of the last `window` values at each point: single micro-batch losses are noisy."""
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def report(run_dirs: list[Path], out: Path | None = None, plot_path: Path | None = None,
           json_path: Path | None = None, against: list[str] = ()) -> str:
    """The table (and paired comparisons) of `run_dirs`; `against` names runs every other run is paired with."""
    if not run_dirs:
        raise QadaptError("name at least one run directory")
    runs = [row for d in run_dirs for row in read_runs(Path(d))]
    table = markdown_table(runs)
    comparisons = paired_table(runs, against)
    if comparisons:
        table += "\n\n" + comparisons
    for path, text in [(out, table + "\n"), (json_path, json.dumps(report_json(runs, against), indent=2) + "\n")]:
        if path:
            with atomic_file(Path(path)) as tmp:
                tmp.write_text(text)
    if plot_path:
        plot(runs, plot_path)
    return table
