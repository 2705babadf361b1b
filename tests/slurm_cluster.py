"""Skip SLURM tests, with the reason, when the local cluster (scripts/slurm-local.sh) is not up.

Usage in a test module::

    import pytest

    from slurm_cluster import require_slurm

    pytestmark = pytest.mark.slurm  # lets `pytest -m "not slurm"` leave these out


    def test_submits_a_job():
        require_slurm()
        ...

`make test` (scripts/test.sh) starts the cluster first; by hand: `scripts/slurm-local.sh start`.
"""
from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

import pytest

SLURM_LOCAL = Path(__file__).resolve().parents[1] / "scripts" / "slurm-local.sh"


@functools.cache
def slurm_unavailable_reason() -> str | None:
    """Why the local cluster cannot take jobs, or None when it can (checked once per session)."""
    if shutil.which("sinfo") is None:
        return f"SLURM is not installed (no sinfo); start the local cluster with: {SLURM_LOCAL} start"
    try:
        status = subprocess.run(
            ["bash", str(SLURM_LOCAL), "status"], capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        return f"{SLURM_LOCAL} status did not answer within 60 s"
    if status.returncode != 0:
        said = (status.stdout + status.stderr).strip() or f"exit {status.returncode}"
        return f"the local SLURM cluster is not up: {said}"
    return None


def require_slurm() -> None:
    """Skip the calling test (or module, when called at import) unless the local cluster is up."""
    reason = slurm_unavailable_reason()
    if reason is not None:
        pytest.skip(reason, allow_module_level=True)
