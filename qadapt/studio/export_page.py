"""The export page: a finished run merged, or exported for PEFT, llama.cpp (GGUF) or Ollama, as a
`qadapt merge` / `qadapt export` job; its log shows the progress and the figures each exporter verifies."""

from __future__ import annotations

from qadapt.export import EXPORTERS
from qadapt.run_dir import RunDir
from qadapt.studio.web import HttpError, Request, Route

SCRIPT = "export.js"
EXPORTS = "exports"  # in the run directory: one entry per export
MERGED = "merged"


def export(studio, request: Request) -> dict:
    """Write RUN/exports/FORMAT[-TYPE][.gguf]; the exporter refuses an entry that exists."""
    name = request.params["run"]
    run = RunDir(studio.run_folder(name))
    if not run.adapter.weights_file.is_file():
        raise HttpError(409, f"{name} has no adapter yet: export it once it has finished")
    kind = request.field("format")
    gguf_type = request.field("type", str, "f16")
    formats = [MERGED, *EXPORTERS]
    if kind not in formats:
        raise HttpError(400, f"format {kind!r} is not one of {', '.join(formats)}")
    if kind == MERGED:
        args = ["merge", str(run.path), "--out", str(run.path / EXPORTS / MERGED)]
    else:
        entry = kind if kind == "peft" else f"{kind}-{gguf_type}" + (".gguf" if kind == "gguf" else "")
        args = ["export", str(run.path), "--format", kind, "--type", gguf_type, "--out", str(run.path / EXPORTS / entry)]
    try:
        job = studio.processes.job("export", name, args)
    except ValueError as exc:
        raise HttpError(409, str(exc)) from None
    return job.describe()


def formats(studio, request: Request) -> dict:
    from qadapt.export.gguf_export import GGUF_TYPES

    return {"formats": [MERGED, *EXPORTERS], "gguf_types": list(GGUF_TYPES)}


ROUTES = [
    Route("GET", r"/api/export-formats", formats),
    Route("POST", r"/api/runs/(?P<run>.+)/export", export),
]
