"""The new-run page: a shipped or saved recipe, its keys edited in a form drawn from the recipe schema,
every problem shown where it belongs, `qadapt plan`'s memory estimate, and the run started as a
`qadapt train` process of its own."""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path

from qadapt.errors import QadaptError
from qadapt.recipe import Recipe, load_recipe
from qadapt.recipe_schema import recipe_keys
from qadapt.run_dir import RunDir
from qadapt.studio import processes
from qadapt.studio.runs_page import run_folders
from qadapt.studio.web import HttpError, Request, Route, inside

SCRIPT = "new_run.js"
# Set in the recipe file only: the page never turns on running a model repository's code, and it names
# the run folder itself.
LOCKED_KEYS = ("model.trust_remote_code", "output_dir")
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
SHIPPED, SAVED = "shipped:", "run:"


def recipe_file(studio, recipe_id: str) -> Path:
    """The YAML file a recipe id names: `shipped:NAME.yaml` under the recipes folder, `run:NAME` a run's own."""
    if recipe_id.startswith(SHIPPED) and studio.recipes is not None:
        path = inside(studio.recipes, recipe_id.removeprefix(SHIPPED), "recipe")
    elif recipe_id.startswith(SAVED):
        path = RunDir(studio.run_folder(recipe_id.removeprefix(SAVED))).recipe_file
    else:
        raise HttpError(400, f"recipe id {recipe_id!r} is not shipped:NAME.yaml or run:NAME")
    if not path.is_file() or path.suffix not in (".yaml", ".yml"):
        raise HttpError(404, f"no recipe {recipe_id!r}")
    return path


def list_recipes(studio, request: Request) -> list[dict]:
    """The recipes under the recipes folder (other YAML there, such as accelerate configs, left out), then
    each run's own."""
    shipped = [p for p in sorted(studio.recipes.rglob("*.yaml")) if _is_recipe(p)] if studio.recipes else []
    found = [{"id": SHIPPED + p.relative_to(studio.recipes).as_posix(), "label": p.relative_to(studio.recipes).as_posix(),
              "about": _header(p)} for p in shipped]
    return found + [{"id": SAVED + name, "label": f"run {name}", "about": ""}
                    for name in (f.relative_to(studio.runs).as_posix() for f in run_folders(studio.runs))]


def _is_recipe(path: Path) -> bool:
    try:
        load_recipe(path)
    except QadaptError:
        return False
    return True


def _header(path: Path) -> str:
    """The comment lines a recipe file starts with (what it is for, its command, what it measured)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# "))
    return "\n".join(lines)


def schema(studio, request: Request) -> dict:
    return {"keys": recipe_keys(), "locked": list(LOCKED_KEYS)}


def recipe_values(studio, request: Request) -> dict:
    """The recipe as loaded (defaults filled in), one value per key."""
    recipe_id = request.arg("id") or ""
    try:
        recipe = load_recipe(recipe_file(studio, recipe_id))
    except QadaptError as exc:
        raise HttpError(422, str(exc)) from None
    return {"values": flat(recipe)}


def flat(recipe: Recipe) -> dict:
    values = {}
    for section, content in asdict(recipe).items():
        if isinstance(content, dict):
            values.update({f"{section}.{key}": value for key, value in content.items()})
        else:
            values[section] = content
    return values


def overrides_of(request: Request) -> list[str]:
    """The form's changed keys as `section.key=value` overrides (each value YAML, as on the command line)."""
    changed = request.field("overrides", dict, {})
    for key, text in changed.items():
        if key in LOCKED_KEYS:
            raise HttpError(403, f"{key} is set in the recipe file itself, not from the page")
        if not isinstance(text, str):
            raise HttpError(400, f"the value of {key} must be YAML text, got {type(text).__name__}")
    return [f"{key}={text}" for key, text in changed.items()]


def problems_of(error: QadaptError) -> list[dict]:
    """A recipe error as its problems, each with the key it names (None: the page shows it on top)."""
    text = str(error)
    lines = [line.removeprefix("  - ") for line in text.splitlines()[1:]] if " problems:\n" in text else [
        text.split(": ", 1)[1] if ": " in text else text]
    problems = []
    for line in lines:
        key = re.search(r"\b((?:model|adapter|data|train|eval|grpo|preference)\.\w+|output_dir|task)\b", line)
        problems.append({"key": key.group(1) if key else None, "message": line})
    return problems


def check(studio, request: Request) -> dict:
    """The recipe with the form's overrides: its problems, or `qadapt plan`'s estimate for a GPU size."""
    path = recipe_file(studio, request.field("recipe"))
    gpu_memory = request.field("gpu_memory", (int, float), 24)
    try:
        recipe = load_recipe(path, overrides_of(request))
    except QadaptError as exc:
        return {"problems": problems_of(exc), "plan": None}
    return {"problems": [], "plan": _plan(recipe, float(gpu_memory))}


def _plan(recipe: Recipe, gpu_memory: float) -> dict:
    from qadapt.training.plan import GIB, plan_memory

    try:
        plan = plan_memory(recipe, gpu_memory)
    except QadaptError as exc:
        return {"error": str(exc)}
    return {"parts_gib": {name: round(value / GIB, 3) for name, value in plan.parts.items()},
            "allocated_gib": round(plan.allocated / GIB, 3), "needed_gib": round(plan.needed / GIB, 3),
            "gpu_memory_gib": gpu_memory, "fits": plan.fits}


def start(studio, request: Request) -> dict:
    """A new run under the runs folder, trained by a `qadapt train` process of its own."""
    name = request.field("name")
    if not RUN_NAME.fullmatch(name):
        raise HttpError(400, f"run name {name!r}: letters, digits, '.', '_' and '-' only, up to 100")
    folder = inside(studio.runs, name, "run")
    if folder.exists():
        raise HttpError(409, f"{name} already exists under {studio.runs}: choose another name")
    path = recipe_file(studio, request.field("recipe"))
    overrides = overrides_of(request) + [f"output_dir={folder}"]
    try:
        load_recipe(path, overrides)
    except QadaptError as exc:
        raise HttpError(422, str(exc)) from None
    folder.mkdir(parents=True)
    process = studio.processes.start(["train", str(path), *overrides], folder / processes.CONSOLE_LOG)
    return {"name": name, "pid": process.pid}


ROUTES = [
    Route("GET", r"/api/recipes", list_recipes),
    Route("GET", r"/api/schema", schema),
    Route("GET", r"/api/recipe", recipe_values),
    Route("POST", r"/api/check", check),
    Route("POST", r"/api/start", start),
]
