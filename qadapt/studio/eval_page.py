"""The evaluate page: score a finished run on chosen sets (a `qadapt eval` job); its table of accuracies
with their number of problems and 95% intervals is the runs table's scores."""

from __future__ import annotations

from qadapt.run_dir import RunDir
from qadapt.studio.web import HttpError, Request, Route

SCRIPT = "evaluate.js"
BUILT_IN_SETS = ("builtin:arithmetic", "builtin:word-problems")


def sets_of(studio, request: Request) -> dict:
    """Sets to offer for a run: the built-in ones and its recipe's eval sets (any other can be typed)."""
    run = RunDir(studio.run_folder(request.params["run"]))
    return {"sets": list(dict.fromkeys([*run.recipe.eval.sets, *BUILT_IN_SETS]))}


def evaluate(studio, request: Request) -> dict:
    """`qadapt eval RUN --data SET ... --resume`: sets scored before with the same settings are kept, the
    others are added to the run's scores."""
    name = request.params["run"]
    run = RunDir(studio.run_folder(name))
    if not run.adapter.weights_file.is_file():
        raise HttpError(409, f"{name} has no adapter yet: evaluate it once it has finished")
    sets = request.field("sets", list)
    if not sets or not all(isinstance(s, str) and s.strip() for s in sets):
        raise HttpError(400, "'sets' must name at least one set, as `qadapt eval --data` takes them")
    args = ["eval", str(run.path), *[arg for s in sets for arg in ("--data", s.strip())], "--resume"]
    limit = request.field("limit", int, None)
    if limit is not None:
        if limit < 1:
            raise HttpError(400, f"'limit' must be at least 1, got {limit}")
        args += ["--limit", str(limit)]
    try:
        job = studio.processes.job("eval", name, args)
    except ValueError as exc:
        raise HttpError(409, str(exc)) from None
    return job.describe()


ROUTES = [
    Route("GET", r"/api/runs/(?P<run>.+)/sets", sets_of),
    Route("POST", r"/api/runs/(?P<run>.+)/eval", evaluate),
]
