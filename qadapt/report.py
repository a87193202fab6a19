"""`qadapt report`: runs side by side, as a markdown table and (with matplotlib) a picture.

Everything comes from the run directories: recipe.yaml, summary.json, metrics.jsonl, eval/metrics.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from qadapt.errors import QadaptError
from qadapt.evaluate import METRICS_FILE as EVAL_METRICS_FILE
from qadapt.recipe import load_recipe
from qadapt.run_dir import METRICS_FILE, RECIPE_FILE, SUMMARY_FILE


def read_run(run_dir: Path) -> dict:
    """What a report shows of one run: its recipe, summary, loss curve and eval accuracy."""
    if not (run_dir / RECIPE_FILE).is_file():
        raise QadaptError(f"{run_dir} is not a run directory (no {RECIPE_FILE})")
    if not (run_dir / SUMMARY_FILE).is_file():
        raise QadaptError(f"run {run_dir} has not finished (no {SUMMARY_FILE})")
    rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line.strip()]
    eval_file = run_dir / "eval" / EVAL_METRICS_FILE
    sets = json.loads(eval_file.read_text())["sets"] if eval_file.is_file() else {}
    return {
        "name": run_dir.name,
        "recipe": load_recipe(run_dir / RECIPE_FILE),
        "summary": json.loads((run_dir / SUMMARY_FILE).read_text()),
        "losses": [(r["step"], r["loss"]) for r in rows if "loss" in r],
        "eval_losses": [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r],
        # A math set's accuracy, or a tagging set's entity F1: each run's one score per set.
        "accuracy": {name: row["accuracy"] if "accuracy" in row else row["f1"] for name, row in sets.items()},
    }


def markdown_table(runs: list[dict]) -> str:
    set_names = sorted({name for run in runs for name in run["accuracy"]})
    header = ["run", "kind", "trainable params", "steps", "tokens", "wall time", "final loss", "held-out loss",
              *set_names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        s = run["summary"]
        held_out = "" if s.get("eval_loss") is None else f"{s['eval_loss']:.4f}"
        cells = [run["name"], run["recipe"].adapter.kind, f"{s['trainable_params']:,}", str(s["steps"]),
                 f"{s['tokens_seen']:,}", f"{s['wall_s']:.0f} s", f"{s['last_loss']:.4f}", held_out]
        cells += [f"{100 * run['accuracy'][n]:.1f}%" if n in run["accuracy"] else "" for n in set_names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    """Training and held-out loss curves on the left, accuracy per set on the right."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise QadaptError("a plot needs matplotlib: pip install 'qadapt[plot]'") from None
    set_names = sorted({name for run in runs for name in run["accuracy"]})
    fig, axes = plt.subplots(1, 2 if set_names else 1, figsize=(12 if set_names else 6.5, 4.5), squeeze=False)
    loss_ax = axes[0][0]
    for run in runs:
        steps, losses = zip(*run["losses"])
        line, = loss_ax.plot(steps, _running_mean(losses, 8), label=f"{run['name']} train (mean of 8)")
        if run["eval_losses"]:
            loss_ax.plot(*zip(*run["eval_losses"]), "o--", color=line.get_color(), label=f"{run['name']} held-out")
    loss_ax.set(xlabel="step", ylabel="loss", title="loss")
    loss_ax.legend(fontsize="small")
    if set_names:
        acc_ax, width = axes[0][1], 0.8 / len(runs)
        for i, run in enumerate(runs):
            xs = [j + i * width for j in range(len(set_names))]
            acc_ax.bar(xs, [100 * run["accuracy"].get(n, 0) for n in set_names], width, label=run["name"])
        acc_ax.set_xticks([j + 0.4 - width / 2 for j in range(len(set_names))], set_names)
        acc_ax.set(ylabel="accuracy %", title="accuracy")
        acc_ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _running_mean(values: tuple[float, ...], window: int) -> list[float]:
    """Mean of the last `window` values at each point: single micro-batch losses are noisy."""
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def report(run_dirs: list[Path], out: Path | None = None, plot_path: Path | None = None) -> str:
    if not run_dirs:
        raise QadaptError("name at least one run directory")
    runs = [read_run(Path(d)) for d in run_dirs]
    table = markdown_table(runs)
    if out:
        out.write_text(table + "\n")
    if plot_path:
        plot(runs, plot_path)
    return table
