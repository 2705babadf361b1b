"""What produced a result: code version, library versions, machine, and the job that ran it.

Every result row carries these columns (benchopt-style), so a table can be trusted on its own.
The job is described by its launcher (`JobRecord`): the worker never reads a scheduler's
environment, so a cell runs the same under any launcher.
"""
from __future__ import annotations

import platform
import socket
import subprocess
from functools import cache
from importlib import metadata
from typing import Any, TypedDict

from benchmark.paths import PROJECT_DIR


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(PROJECT_DIR), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


class JobRecord(TypedDict, total=False):
    """What a launcher tells a worker of the job that runs it (launchers.Launcher.job_record).
    A cell's worker writes it into every state of the cell, so `status`, `resume` and `cancel`
    find the cell's own launcher and job; its rows carry the job id."""

    launcher: str         # the launcher config's name (`launcher=<name>`)
    launcher_kind: str    # the registered launcher that runs that config (launchers.LAUNCHERS)
    launcher_config: str  # the config's key under the study (<study>/launchers/<key>.json)
    job_id: str           # the scheduler's id of the job (a SLURM array task: "<array>_<task>")
    log: str              # the job's own log (the scheduler's messages and the traceback land there)
    cpus: int             # CPUs allocated to the job: the worker sizes its torch threads to them
    host: str             # a worker that is not a cell (no cell state): where, and which process
    pid: int


@cache
def code_and_versions() -> dict[str, Any]:
    """Provenance that does not change within a process (computed once)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "python_version": platform.python_version(),
        "torch_version": _version("torch"),
        "timm_version": _version("timm"),
        "autoattack_version": _version("pyautoattack"),
        "host": socket.gethostname(),
    }


def provenance(device: str, job_id: str | None) -> dict[str, Any]:
    """All provenance columns of a run's rows; `job_id`: the JobRecord's (the column keeps its
    name, `slurm_job_id`, from the one scheduler that gives jobs ids today)."""
    return {**code_and_versions(), "device": device, "slurm_job_id": job_id}
