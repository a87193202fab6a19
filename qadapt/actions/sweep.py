"""`qadapt sweep`: many runs of one recipe, one after another, each an ordinary run directory.

    qadapt sweep RECIPE --grid KEY=V1,V2 [--grid ...] [overrides] [--out DIR]

The runs are the cross product of the grids (the first grid varies slowest). A value may be a YAML
mapping that sets several keys of a section at once, `--grid 'adapter={kind: lora},{kind: series,
placement: mlp}'`, so one sweep can compare settings that are not a product. Each run trains in its
own process (qadapt.actions.sweep_job: the library's train, resumed when interrupted) into DIR/<name>, named
after its grid values, and is then scored on the recipe's eval sets, set by set (qadapt eval's library
call, fp32 compute by default, so that answers do not depend on the batch). Each job leaves a result
file; the sweep reads that, never the job's screen (which it shows and keeps in DIR/logs). With `--baseline` the untrained base is scored too, into DIR/base.

Nothing is lost when a sweep is stopped, killed or moved to another machine: the same command skips
the finished runs and sets, resumes the interrupted run from its last checkpoint, and retries the runs
that failed. A run that fails is recorded with its one-line error in DIR/sweep.json and the sweep goes
on. It ends with `qadapt report` over every run in DIR: report.md, report.json and report.png. With
`--results KEPT` each finished run's result files are also kept in KEPT/<name> (qadapt.actions.kept_results), a
folder to commit, and a run kept there by the recipe the sweep has now counts as done and joins the report.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import get_args

import yaml

from qadapt.errors import QadaptError, TrainingStopped
from qadapt.files import atomic_file
from qadapt.actions.kept_results import keep_results
from qadapt.recipe import DType, load_recipe, training_differences
from qadapt.run_dir import RunDir
from qadapt.scores import set_name

SWEEP_FILE = "sweep.json"
LOGS_DIR = "logs"
BASELINE = "base"
BY_VALUE = ("kind", "placement")  # keys a run is named by their value alone (series-mlp)
TRAINED_OTHERWISE = "trained with another recipe"


@dataclass
class SweepRun:
    name: str
    overrides: list[str]  # the grid's values for this run
    status: str = "pending"  # pending, done or failed
    error: str | None = None
    train_s: float | None = None
    eval_s: float | None = None


@dataclass
class SweepState:
    recipe: str
    grids: list[str]
    overrides: list[str]
    runs: list[SweepRun] = field(default_factory=list)


def split_values(text: str) -> list[str]:
    """`a,b,[c,d],{k: v, j: w}` -> ['a', 'b', '[c,d]', '{k: v, j: w}']: commas inside brackets stay."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    values.append(current.strip())
    return values


def expand_grids(grids: list[str]) -> list[list[str]]:
    """The cross product of `KEY=V1,V2` grids, as lists of `KEY=V` overrides."""
    axes = []
    for grid in grids:
        key, sep, values = grid.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise QadaptError(f"--grid {grid!r} is not of the form section.key=value1,value2")
        choices = split_values(values)
        if any(not c for c in choices):
            raise QadaptError(f"--grid {grid!r} has an empty value")
        axes.append([f"{key.strip()}={c}" for c in choices])
    return [list(combination) for combination in itertools.product(*axes)] if axes else [[]]


def run_name(overrides: list[str]) -> str:
    """A folder name from a run's grid values: `adapter.kind=dora train.lr=1e-3` -> `kind-dora_lr-1e-3`."""
    leaves = [item.partition("=")[0].split(".")[-1] for item in overrides]
    parts = []
    for item, leaf in zip(overrides, leaves):
        key, _, value = item.partition("=")
        label = leaf if leaves.count(leaf) == 1 else key
        parsed = yaml.safe_load(value) if value.strip() else value
        if isinstance(parsed, dict):  # {kind: series, placement: mlp, init: bert} -> series-mlp_init-bert
            named = ["-".join(_safe(_text(v)) for k, v in parsed.items() if k in BY_VALUE)]
            named += [f"{_safe(str(k))}-{_safe(_text(v))}" for k, v in parsed.items() if k not in BY_VALUE]
            parts.append("_".join(n for n in named if n))
        else:
            parts.append(f"{_safe(label)}-{_safe(value)}")
    return "_".join(parts) or "run"


def _text(value) -> str:
    return "-".join(map(str, value)) if isinstance(value, list) else str(value)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "x"


def plan_sweep(recipe: Path, grids: list[str], overrides: list[str], out: Path) -> SweepState:
    """Every run's recipe checked before anything trains (a typo fails now, not after hours); names unique."""
    state = SweepState(str(recipe), list(grids), list(overrides))
    for combination in expand_grids(grids):
        load_recipe(recipe, [*overrides, *combination])
        name = run_name(combination)
        taken = {r.name for r in state.runs}
        if name in taken or name == BASELINE:
            name = f"{name}-{len(state.runs) + 1}"
        state.runs.append(SweepRun(name, combination))
    earlier = _read_state(out)
    if earlier and (earlier.recipe, earlier.grids, earlier.overrides) == (state.recipe, state.grids, state.overrides):
        by_name = {r.name: r for r in earlier.runs}
        state.runs = [by_name.get(r.name, r) for r in state.runs]  # keep the times and errors recorded
    return state


def _read_state(out: Path) -> SweepState | None:
    path = out / SWEEP_FILE
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    return SweepState(raw["recipe"], raw["grids"], raw["overrides"], [SweepRun(**r) for r in raw["runs"]])


def _save_state(out: Path, state: SweepState) -> None:
    with atomic_file(out / SWEEP_FILE) as tmp:
        tmp.write_text(json.dumps(asdict(state), indent=2) + "\n")


def sweep(recipe: Path, grids: list[str], overrides: list[str], out: Path, baseline: bool = False,
          eval_dtype: str = "fp32", results: Path | None = None) -> str:
    """Train and score every run of the sweep that is not done yet; return the report's table.

    `results`: keep each finished run's result files there (qadapt.actions.kept_results), and count a run whose
    kept copy is finished and trained by the same recipe as done.
    """
    from qadapt.actions.report import report

    if eval_dtype not in get_args(DType):
        raise QadaptError(f"--eval-dtype {eval_dtype!r} is not one of {', '.join(get_args(DType))}")
    _set_size.cache_clear()  # a set file may have changed since an earlier sweep in this process
    state = plan_sweep(recipe, grids, overrides, out)
    sweep_recipe = load_recipe(recipe, overrides)
    out.mkdir(parents=True, exist_ok=True)
    _save_state(out, state)
    scoring = _eval_options(sweep_recipe, eval_dtype)
    if baseline and scoring:
        kept_base = results / BASELINE if results else None
        if kept_base is None or not _scored_all(kept_base, sweep_recipe):
            _score_baseline(sweep_recipe, scoring, out)
            if results and _scored_all(out / BASELINE, sweep_recipe):
                keep_results(out / BASELINE, results)
    timer = _Eta(len(state.runs), [r.train_s + r.eval_s for r in state.runs if r.status == "done" and r.train_s
                                    and r.eval_s])
    for index, run in enumerate(state.runs, 1):
        run_dir = out / run.name
        changed = _trained_otherwise(run_dir, recipe, [*overrides, *run.overrides])
        if changed:
            run.status, run.error = "failed", changed
            print(f"sweep: {run.name}: {changed}", flush=True)
            _save_state(out, state)
            timer.skip()
            continue
        finished_here = _finished(run_dir, sweep_recipe)
        if finished_here or _kept_and_current(results, run.name, recipe, [*overrides, *run.overrides], sweep_recipe):
            if results and finished_here:
                keep_results(run_dir, results)
            run.status, run.error = "done", None
            timer.skip()
            continue
        print(f"sweep: run {index} of {len(state.runs)}: {run.name} ({' '.join(run.overrides) or 'the recipe'})"
              f"{timer.eta()}", flush=True)
        started = time.perf_counter()
        error = _train(recipe, [*overrides, *run.overrides], run_dir, out, run)
        if error is None and scoring:
            error = _evaluate(run_dir, scoring, out / LOGS_DIR / f"{run.name}.eval.log", run)
        run.status, run.error = ("failed", error) if error else ("done", None)
        if error:
            print(f"sweep: {run.name} failed: {error}", flush=True)
        elif results:
            print(f"sweep: {run.name}'s results kept in {keep_results(run_dir, results)}", flush=True)
        _save_state(out, state)
        # A run that failed at once would make the rest look quick: only finished runs set the pace.
        timer.skip() if error else timer.done(time.perf_counter() - started)
    finished = [out / BASELINE] if RunDir(out / BASELINE).scores() else []
    stale = {r.name for r in state.runs if r.status == "failed" and (r.error or "").startswith(TRAINED_OTHERWISE)}
    finished += sorted(p.parent for p in out.glob(f"*/{RunDir.SUMMARY}") if p.parent.name not in {BASELINE, *stale})
    if results:  # what other sessions or machines finished: their kept copies, where this one has no run
        here = {p.name for p in finished}
        kept = [results / BASELINE] if RunDir(results / BASELINE).scores() else []
        kept += sorted(p.parent for p in results.glob(f"*/{RunDir.SUMMARY}") if p.parent.name != BASELINE)
        finished += [p for p in kept if p.name not in here and p.name not in stale]
    failed = [r for r in state.runs if r.status == "failed"]
    print(f"sweep: {len(state.runs) - len(failed)} of {len(state.runs)} runs done"
          + (f"; failed: {', '.join(f'{r.name} ({r.error})' for r in failed)}" if failed else ""), flush=True)
    if not finished:
        return ""
    plot = out / "report.png" if _has_matplotlib() else None
    table = report(finished, out=out / "report.md", plot_path=plot, json_path=out / "report.json")
    print(table)
    print(f"report: {out / 'report.md'}, {out / 'report.json'}" + (f", {plot}" if plot else ""))
    return table


def _trained_otherwise(run_dir: Path, recipe: Path, overrides: list[str]) -> str | None:
    """For a finished run: why its recipe trains another model than the sweep's now does, else None.

    A sweep continued after its recipe changed would otherwise put old and new runs in one table.
    """
    run = RunDir(run_dir)
    if not run.finished():
        return None  # an interrupted run is checked by train --resume
    changes = training_differences(run.recipe, load_recipe(recipe, overrides))
    if not changes:
        return None
    shown = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changes)
    return f"{TRAINED_OTHERWISE} ({shown}): left out; move {run_dir} away to train it again, or use another --out"


def _finished(run_dir: Path, sweep_recipe) -> bool:
    """Trained (summary.json) and scored on every eval set of the recipe."""
    return RunDir(run_dir).finished() and _scored_all(run_dir, sweep_recipe)


def _kept_and_current(results: Path | None, name: str, recipe: Path, overrides: list[str], sweep_recipe) -> bool:
    """Whether `results` keeps a finished, fully scored copy of the run, trained by the recipe it has now."""
    kept = results / name if results else None
    if kept is None or not _finished(kept, sweep_recipe):
        return False
    return not training_differences(RunDir(kept).recipe, load_recipe(recipe, overrides))


def _scored_all(folder: Path, recipe) -> bool:
    """Whether folder/eval/metrics.json holds every eval set of the recipe, each on as many problems as the
    recipe asks now (its `eval.limit`, a set's '@N')."""
    scored = (RunDir(folder).scores() or {"sets": {}})["sets"]
    for spec in recipe.eval.sets:
        row = scored.get(set_name(spec))
        expected = _set_size(recipe.task, spec, recipe.eval.limit)
        if row is None or expected not in (None, row.get("total", row.get("sentences"))):
            return False
    return True


@functools.lru_cache(maxsize=None)
def _set_size(task: str, spec: str, limit: int | None) -> int | None:
    """How many items the task scores of `spec`: read once per sweep, though every run's check asks."""
    from qadapt.tasks import task_named

    return task_named(task).set_size(spec, limit)


def _eval_options(recipe, eval_dtype: str) -> dict | None:
    """run_eval's options for the recipe's eval section (None: it names no sets)."""
    e = recipe.eval
    if not e.sets:
        return None
    return {"sets": list(e.sets), "options": {"limit": e.limit, "batch_size": e.batch_size,
                                              "max_new_tokens": e.max_new_tokens, "strict": e.strict,
                                              "compute_dtype": eval_dtype}}


def _train(recipe: Path, overrides: list[str], run_dir: Path, out: Path, run: SweepRun) -> str | None:
    """Train one run (resuming it if it was interrupted); None, or the one-line error it failed with."""
    if RunDir(run_dir).finished():
        return None
    # Interrupted (the folder exists): continue from its last checkpoint, or from step 0 if it has none.
    job = {"action": "train", "recipe": str(recipe), "overrides": [*overrides, f"output_dir={run_dir}"],
           "resume": run_dir.exists()}
    started = time.perf_counter()
    error = _run_job(job, out / LOGS_DIR / f"{run.name}.train.log")
    run.train_s = (run.train_s or 0) + time.perf_counter() - started
    return error


def _evaluate(target_dir: Path, scoring: dict, log: Path, run: SweepRun | None, target: str | None = None,
              loading: dict | None = None) -> str | None:
    started = time.perf_counter()
    options = {**scoring["options"], **(loading or {})}
    job = {"action": "eval", "target": target or str(target_dir), "sets": scoring["sets"],
           "out": str(RunDir(target_dir).eval_dir()), "options": options}
    error = _run_job(job, log)
    if run is not None:
        run.eval_s = (run.eval_s or 0) + time.perf_counter() - started
    return error


def _score_baseline(recipe, scoring: dict, out: Path) -> None:
    """The untrained base, loaded as the runs load it, on the same sets: the row every run is compared to."""
    base_dir = out / BASELINE
    if _scored_all(base_dir, recipe):
        return
    print(f"sweep: scoring the untrained base {recipe.model.name} ({recipe.model.quant})", flush=True)
    loading = {"quant": recipe.model.quant, "template": recipe.data.template}
    error = _evaluate(base_dir, scoring, out / LOGS_DIR / f"{BASELINE}.eval.log", None, recipe.model.name, loading)
    if error:
        print(f"sweep: scoring the base failed: {error}", flush=True)


def _run_job(job: dict, log: Path) -> str | None:
    """Run one job in its own process (qadapt.actions.sweep_job), its output shown and kept in `log`; None, or the
    one-line error its result file records.

    The job runs in a session of its own, and a Ctrl-C or SIGTERM the sweep gets is passed on to it once,
    so a run saves a checkpoint and stops; then the sweep stops too, saying how to go on.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    job_file, result_file = log.with_suffix(".job.json"), log.with_suffix(".result.json")
    result_file.unlink(missing_ok=True)
    job_file.write_text(json.dumps({**job, "result": str(result_file)}, indent=1) + "\n")
    code, received = _watch([sys.executable, "-m", "qadapt.actions.sweep_job", str(job_file)], log,
                            header=f"{job['action']} {job.get('target') or job.get('recipe')}")
    result = json.loads(result_file.read_text()) if result_file.is_file() else None
    # Stopped: it saved a checkpoint (130 / 143), or a signal ended it before it could (-2 / -15), or we passed one on.
    stopped = result is not None and result["status"] == "stopped"
    if received or stopped or -code in (signal.SIGINT, signal.SIGTERM):
        exit_code = 128 + received[0] if received else result["exit_code"] if stopped else 128 - code
        raise TrainingStopped(f"the sweep was stopped ({job['action']} exited {code}); run the same qadapt sweep "
                              "command again to continue where it stopped", exit_code)
    if result is not None:
        return result.get("error")
    return _died(code, log)


def _watch(command: list[str], log: Path, header: str) -> tuple[int, list[int]]:
    """Run `command`, its output shown and appended to `log`, forwarding SIGINT / SIGTERM to it; return its
    exit code and the signals the sweep received."""
    process: subprocess.Popen | None = None
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        if process is not None:
            process.send_signal(signum)

    # Forwarding starts before the command does: a signal that comes while it starts is passed on once it runs.
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with open(log, "ab") as kept:
            kept.write(f"\n$ {header}\n".encode())
            kept.flush()
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            if received:
                process.send_signal(received[0])
            for chunk in iter(lambda: os.read(process.stdout.fileno(), 65536), b""):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                kept.write(chunk)
            code = process.wait()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    return code, received


def _died(code: int, log: Path) -> str:
    """Why a job that left no result ended: the signal that killed it, or its exit code (the log says more)."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (the system may have run out of memory)" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exited with code {code} before writing its result; see {log}"


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


class _Eta:
    """The time left, from the mean time of the runs trained and scored so far (this call's and earlier ones')."""

    def __init__(self, count: int, earlier: list[float]):
        self.left, self.times = count, list(earlier)

    def skip(self) -> None:
        self.left -= 1

    def done(self, seconds: float) -> None:
        self.left -= 1
        self.times.append(seconds)

    def eta(self) -> str:
        if not self.times:
            return ""
        seconds = sum(self.times) / len(self.times) * self.left
        return f"; about {_duration(seconds)} left"


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"
