"""Whether a run is training, finished, interrupted or failed: RUN/status.json, written by `qadapt train`.

A run directory alone cannot say whether a process is still writing it. The training process records
itself when it opens the run (pid, host, start), and its outcome when it ends: `finished`, `interrupted`
(stopped by Ctrl-C / SIGTERM after a checkpoint) or `failed` (with the error's line). A process killed
outright cannot write: a `training` run whose process is gone reads as interrupted. Runs written before
status.json existed read from what they hold (a summary: finished; else interrupted).

Imports no torch: the studio and the sweep read states without loading a model.
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from qadapt.errors import TrainingStopped
from qadapt.files import atomic_file
from qadapt.run_dir import RunDir

STATES = ("training", "finished", "interrupted", "failed")


def start(run: RunDir) -> None:
    """Record a new training attempt: `training`, by this process, from now."""
    _write(run, {"state": "training", "pid": os.getpid(), "process_start": _process_start(os.getpid()),
                 "host": socket.gethostname(), "started": time.time()})


def update(run: RunDir, **figures) -> None:
    """Add figures (`max_steps`) to the attempt this process records."""
    status = _ours(run)
    if status is not None:
        _write(run, {**status, **figures})


def end(run: RunDir, state: str, message: str | None = None) -> None:
    """Record the outcome of the attempt this process records (other processes' and refused runs' status
    is left alone)."""
    if state not in STATES[1:]:
        raise ValueError(f"an attempt ends {', '.join(STATES[1:])}, not {state!r}")
    status = _ours(run)
    if status is not None:
        _write(run, {**status, "state": state, "ended": time.time(), **({"message": message} if message else {})})


def _ours(run: RunDir) -> dict | None:
    """The run's status when it is this process's training attempt."""
    status = _read(run)
    if status is None or status["state"] != "training" or status.get("host") != socket.gethostname():
        return None
    return status if status.get("pid") == os.getpid() else None


def _write(run: RunDir, status: dict) -> None:
    with atomic_file(run.status_file) as tmp:
        tmp.write_text(json.dumps(status, indent=2))


@contextmanager
def outcome_recorded(run: RunDir) -> Iterator[None]:
    """Around a training attempt: its outcome, as `end` records it, however the block ends."""
    try:
        yield
    except TrainingStopped as stopped:
        end(run, "interrupted", str(stopped))
        raise
    except KeyboardInterrupt:
        end(run, "interrupted", "quit at once: resuming continues from its latest checkpoint")
        raise
    except BaseException as exc:
        lines = str(exc).strip().splitlines()
        end(run, "failed", lines[0] if lines else type(exc).__name__)
        raise
    end(run, "finished")


def state_of(run: RunDir) -> dict:
    """The run's status: {"state", and "pid", "started", "ended", "message" where known}."""
    status = _read(run)
    if status is None:  # a run from before status.json, or one whose process never got this far
        if run.finished():
            return {"state": "finished"}
        return {"state": "interrupted", "message": "no process is recorded for this run"}
    if status["state"] == "training" and not _alive(status):
        return {**status, "state": "interrupted",
                "message": f"its process ({status.get('pid')}) ended without saying why: killed, or the machine "
                           "stopped; resuming continues from its latest checkpoint"}
    return status


def _read(run: RunDir) -> dict | None:
    try:
        status = json.loads(run.status_file.read_text())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) and status.get("state") in STATES else None


def _alive(status: dict) -> bool:
    """Whether the recorded process still runs (another host's: assumed so). Where /proc is, the process's
    start time must match too, so that a reused pid is not taken for it."""
    if status.get("host") != socket.gethostname():
        return True
    if status.get("process_start") is not None:
        return _process_start(status.get("pid")) == status["process_start"]
    try:
        os.kill(int(status["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def _process_start(pid) -> str | None:
    """When process `pid` started, in clock ticks since boot (field 22 of /proc/PID/stat); None when it
    is not running (a zombie, ended but not yet waited for by its parent, is not)."""
    try:
        fields = Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError, TypeError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]
