"""The runs page: every run under the runs folder with its state, its metrics as they grow, the report
table of the runs selected, and stop / resume."""

from __future__ import annotations

import json
from pathlib import Path

from qadapt.run_dir import RunDir
from qadapt.run_state import state_of
from qadapt.scores import wilson_interval
from qadapt.studio import processes
from qadapt.studio.web import HttpError, Request, Route

SCRIPT = "runs.js"
DEEPEST = 4  # run folders are looked for this many levels under the runs folder
SKIPPED = {RunDir.ADAPTER, RunDir.CHECKPOINTS, RunDir.EVAL, RunDir.TENSORBOARD}


def run_folders(root: Path) -> list[Path]:
    """The run directories under `root` (a folder with recipe.yaml), sorted by name."""
    found, level = [], [root]
    for _ in range(DEEPEST):
        below = []
        for folder in level:
            for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
                if RunDir(child).is_run():
                    found.append(child)
                elif child.name not in SKIPPED:
                    below.append(child)
        level = below
    return sorted(found)


def metrics_rows(run: RunDir, after: int = 0) -> tuple[list[dict], int]:
    """The training log's complete rows from row `after` on, and the count of complete rows (a row being
    written, with no newline yet, waits for the next call)."""
    if not run.training_log.is_file():
        return [], 0
    text = run.training_log.read_text()
    lines = text.split("\n")[:-1]  # the last piece has no newline: empty, or a row still being written
    rows = []
    for line in lines[after:]:
        try:
            rows.append(json.loads(line))
        except ValueError:
            rows.append({})  # a row cut short by a crash: counted, so that every client numbers rows alike
    return rows, len(lines)


def describe(root: Path, folder: Path) -> dict:
    """What the runs table shows of one run: name, state, task, kind, steps, time, scores, ETA."""
    from qadapt.tasks import task_named  # imports torch: on the first call, not when the studio starts

    run = RunDir(folder)
    status = state_of(run)
    row = {"name": folder.relative_to(root).as_posix(), **{k: status.get(k) for k in ("state", "message", "started",
                                                                                          "ended", "max_steps")}}
    try:
        recipe = run.recipe
        row.update(task=recipe.task, kind=recipe.adapter.kind, model=recipe.model.name, quant=recipe.model.quant,
                   generates=task_named(recipe.task).generates)
    except Exception as exc:  # a recipe this qadapt cannot read: shown, not fatal to the list
        row.update(problem=str(exc).splitlines()[0])
    if run.finished():  # its summary says it all: the training log is not read (the list is asked for every 2 s)
        summary = run.summary
        row.update(step=summary.get("steps", 0), max_steps=summary.get("steps"), wall_s=summary.get("wall_s"),
                   elapsed_s=None, scores=_scores(run), eta_s=None)
        return row
    stepped = [r for r in metrics_rows(run)[0] if "loss" in r]
    last = stepped[-1] if stepped else {}
    row.update(step=last.get("step", 0), elapsed_s=last.get("elapsed_s"),
               eta_s=eta_s(stepped, row.get("max_steps")) if row["state"] == "training" else None)
    return row


def eta_s(stepped: list[dict], max_steps: int | None) -> float | None:
    """Seconds left at the pace of the last 20 steps."""
    if not max_steps or len(stepped) < 2 or "elapsed_s" not in stepped[-1]:
        return None
    recent = stepped[-20:]
    pace = (recent[-1]["elapsed_s"] - recent[0]["elapsed_s"]) / max(1, recent[-1]["step"] - recent[0]["step"])
    return max(0.0, pace * (max_steps - recent[-1]["step"]))


def _scores(run: RunDir) -> dict:
    """Each scored set's accuracy with its count and 95% interval (or a tagging run's F1)."""
    scores = run.scores() or {}
    found = {}
    for name, result in scores.get("sets", {}).items():
        found[name] = {key: result.get(key) for key in ("accuracy", "correct", "total", "f1")}
        if result.get("total"):
            found[name]["interval"] = wilson_interval(result.get("correct", 0), result["total"])
    return found


def list_runs(studio, request: Request) -> list[dict]:
    return [describe(studio.runs, folder) for folder in run_folders(studio.runs)]


def run_detail(studio, request: Request) -> dict:
    folder = studio.run_folder(request.params["run"])
    run = RunDir(folder)
    return {**describe(studio.runs, folder), "recipe": run.recipe_file.read_text(),
            "summary": run.summary if run.finished() else None}


def run_metrics(studio, request: Request) -> dict:
    """Rows from `after` on: a client asks again with `next`, and every client sees the same rows."""
    after = request.arg("after", "0")
    if not after.isdigit():
        raise HttpError(400, f"after must be a row count, got {after!r}")
    rows, count = metrics_rows(RunDir(studio.run_folder(request.params["run"])), int(after))
    return {"rows": rows, "next": count}


def run_console(studio, request: Request) -> dict:
    """The end of what the studio's training processes printed for this run."""
    return {"text": processes.tail(studio.run_folder(request.params["run"]) / processes.CONSOLE_LOG)}


def list_jobs(studio, request: Request) -> list[dict]:
    """The evaluations and exports this studio started, newest first (of one run: `run=NAME`)."""
    run = request.arg("run")
    return [job.describe() for job in reversed(studio.processes.jobs.values()) if run in (None, job.run)]


def report_table(studio, request: Request) -> dict:
    """`qadapt report`'s tables of the finished runs named; the others are named as left out."""
    from qadapt.actions.report import markdown_table, paired_table, read_runs

    names = request.query.get("run", [])
    folders = [studio.run_folder(name) for name in names]
    finished = [f for f in folders if RunDir(f).finished()]
    runs = [row for folder in finished for row in read_runs(folder)]
    return {"table": markdown_table(runs) if runs else "", "paired": paired_table(runs) if runs else "",
            "left_out": [name for name, folder in zip(names, folders) if folder not in finished]}


def stop_run(studio, request: Request) -> dict:
    folder = studio.run_folder(request.params["run"])
    try:
        pid = processes.stop(state_of(RunDir(folder)))
    except ValueError as exc:
        raise HttpError(409, str(exc)) from None
    return {"stopping": pid}


def resume_run(studio, request: Request) -> dict:
    """Continue a run from its latest checkpoint: `qadapt train RUN/recipe.yaml --resume`."""
    folder = studio.run_folder(request.params["run"])
    run = RunDir(folder)
    state = state_of(run)["state"]
    if state not in ("interrupted", "failed"):
        raise HttpError(409, f"the run is {state}: only an interrupted or failed run resumes")
    # output_dir: the run's own folder, wherever the recipe says it was (a path relative to another directory)
    process = studio.processes.start(["train", str(run.recipe_file), f"output_dir={folder}", "--resume"],
                                     folder / processes.CONSOLE_LOG)
    return {"pid": process.pid}


ROUTES = [
    Route("GET", r"/api/runs", list_runs),
    Route("GET", r"/api/runs/(?P<run>.+)/metrics", run_metrics),
    Route("GET", r"/api/runs/(?P<run>.+)/console", run_console),
    Route("GET", r"/api/runs/(?P<run>.+)", run_detail),
    Route("GET", r"/api/report", report_table),
    Route("GET", r"/api/jobs", list_jobs),
    Route("POST", r"/api/runs/(?P<run>.+)/stop", stop_run),
    Route("POST", r"/api/runs/(?P<run>.+)/resume", resume_run),
]
