"""What produced a result: code version, library versions, machine and scheduler job.

Every result row carries these columns (benchopt-style), so a table can be trusted on its own.
"""
from __future__ import annotations

import os
import platform
import socket
import subprocess
from functools import cache
from importlib import metadata
from typing import Any

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


def slurm_job_id() -> str | None:
    """`<array job>_<task>` inside an array task, the job id inside a plain job, else None."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID")


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


def provenance(device: str) -> dict[str, Any]:
    """All provenance columns of a run's rows."""
    return {**code_and_versions(), "device": device, "slurm_job_id": slurm_job_id()}
