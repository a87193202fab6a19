"""The qadapt processes the studio starts: each in a session of its own, so that closing the studio (or
its terminal) stops none of them, its output appended to a log the page shows. Training writes its run's
console.log (its state is the run's status.json); an evaluation or an export is a job, whose state is its
process's while this studio runs."""

from __future__ import annotations

import itertools
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CONSOLE_LOG = "console.log"  # in the run directory: what `qadapt train` printed, for every attempt
JOB_LOGS = ".studio"  # under the runs folder: one log per job
LOG_TAIL = 64 * 1024  # bytes of a log the page gets


@dataclass
class Job:
    """An evaluation or export the studio started for a run."""

    id: str
    kind: str
    run: str
    process: subprocess.Popen
    log: Path
    started: float

    def describe(self) -> dict:
        code = self.process.poll()
        state = "running" if code is None else "done" if code == 0 else "failed"
        return {"id": self.id, "kind": self.kind, "run": self.run, "state": state, "returncode": code,
                "started": self.started, "log": tail(self.log)}


def tail(log: Path) -> str:
    """The end of a log, progress bars' carriage returns as new lines."""
    if not log.is_file():
        return ""
    with open(log, "rb") as handle:
        handle.seek(max(0, log.stat().st_size - LOG_TAIL))
        return handle.read().decode("utf-8", errors="replace").replace("\r", "\n")


class Processes:
    """The processes this studio started; finished ones are reaped (waited for) whenever it is asked, so
    that none lingers as a zombie that still looks alive."""

    def __init__(self, cwd: Path, job_logs: Path):
        self.cwd, self.job_logs = cwd, job_logs
        self.running: list[subprocess.Popen] = []
        self.jobs: dict[str, Job] = {}
        self._numbers = itertools.count(1)

    def start(self, args: list[str], log: Path) -> subprocess.Popen:
        """`qadapt ARGS` from the studio's working directory, its output appended to `log`."""
        self.reap()
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            out.write(f"$ qadapt {shlex.join(args)}\n".encode())
            out.flush()
            process = subprocess.Popen([sys.executable, "-m", "qadapt", *args], cwd=self.cwd, stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.running.append(process)
        return process

    def job(self, kind: str, run: str, args: list[str]) -> Job:
        """Start `qadapt ARGS` as job `kind` of run `run`, refused while the run has one of that kind running."""
        if any(j.kind == kind and j.run == run and j.process.poll() is None for j in self.jobs.values()):
            raise ValueError(f"{run} has a {kind} running: wait for it to end")
        number = next(self._numbers)
        job_id = f"{kind}-{number}"
        log = self.job_logs / f"{time.strftime('%Y%m%d-%H%M%S')}-{job_id}.log"
        self.jobs[job_id] = Job(job_id, kind, run, self.start(args, log), log, time.time())
        return self.jobs[job_id]

    def reap(self) -> None:
        self.running = [process for process in self.running if process.poll() is None]


def stop(status: dict) -> int:
    """SIGTERM to the training process a run's status names (it saves a checkpoint, then exits); its pid."""
    if status.get("state") != "training":
        raise ValueError(f"the run is {status.get('state')}, not training")
    if status.get("host") != socket.gethostname():
        raise ValueError(f"the run trains on {status.get('host')}: stop it there")
    os.kill(int(status["pid"]), signal.SIGTERM)
    return int(status["pid"])
