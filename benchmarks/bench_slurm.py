"""SLURM dispatch of the paper study (1,440 cells) on the local cluster: sbatch calls per resource
shape, harness seconds to submit, `status` and `cancel` seconds.

The cells are really submitted, through `rftbench launch`, but with a begin time an hour away so
that no worker starts; they are cancelled at the end. Two configurations: the launcher's
default resource layers (one shape per protocol x model size), and a single shape, whose 1,440
cells exceed the local cluster's MaxArraySize (1001) and so take two arrays.
"""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmark import cell as cells
from benchmark.cli import main as rftbench
from benchmark.paths import PROJECT_DIR
from benchmark.study import plan
from launchers.slurm import shapes

# What the local node can hold (no GPU, about 20 GB): distinct memory per model size keeps the
# default's nine shapes. The begin time keeps every job pending.
LOCAL = ["launcher=slurm", "launcher.resources.default.gpus_per_node=null", "launcher.resources.default.cpus_per_task=1",
         "launcher.resources.model_size.small.mem=1G", "launcher.resources.model_size.medium.mem=2G",
         "launcher.resources.model_size.large.mem=3G", "+launcher.additional_parameters.begin=now+1hour"]
ONE_SHAPE = ["launcher.resources.protocol=null", "launcher.resources.model_size=null"]


def _timed(argv: list[str]) -> tuple[float, int, str]:
    """Seconds, exit code and output of one in-process `rftbench` command."""
    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = rftbench(argv)
    return time.perf_counter() - start, code, out.getvalue()


def _process_seconds(argv: list[str]) -> float:
    """Wall seconds of `rftbench ARGV` as a user runs it: a fresh interpreter, its imports included."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "benchmark.cli", *argv], cwd=PROJECT_DIR, check=True,
                   capture_output=True)
    return time.perf_counter() - start


def _measure(name: str, overrides: list[str], results_root: Path) -> None:
    os.environ["RFTBENCH_RESULTS"] = str(results_root)
    study = plan(overrides)
    groups = shapes(study.config["launcher"], study.cells)
    launch_seconds, code, _ = _timed(["launch", *overrides])
    assert code == 0, f"launch failed ({code})"
    try:
        array_of = {c.id: cells.read_state(c.directory(study.dir))["job_id"].split("_")[0] for c in study.cells}
        calls_per_shape = [len({array_of[c.id] for c in group}) for _, group in groups.values()]
        status_seconds, _, status = _timed(["status", *overrides])
        assert f"queued {len(study.cells)}" in status, status
        status_process_seconds = _process_seconds(["status", *overrides])
    finally:  # no job is left behind, even when a measurement fails
        cancel_seconds, code, _ = _timed(["cancel", *overrides])
    assert code == 0, f"cancel failed ({code})"
    print(f"{name}_cells={len(study.cells)}")
    print(f"{name}_resource_shapes={len(groups)}")
    print(f"{name}_sbatch_calls={sum(calls_per_shape)}")
    print(f"{name}_max_sbatch_calls_per_shape={max(calls_per_shape)}")
    print(f"{name}_status_seconds={status_seconds:.3f}")
    print(f"{name}_status_process_seconds={status_process_seconds:.3f}")
    print(f"{name}_cancel_seconds={cancel_seconds:.3f}")
    print(f"{name}_launch_seconds={launch_seconds:.3f}", flush=True)


def main() -> None:
    if subprocess.run(["bash", str(PROJECT_DIR / "scripts" / "slurm-local.sh"), "status"],
                      capture_output=True).returncode != 0:
        print("slurm_cluster=down (start it with: scripts/slurm-local.sh start)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        _measure("one_shape", ["study=paper", *LOCAL, *ONE_SHAPE], Path(tmp) / "one_shape")
        _measure("paper", ["study=paper", *LOCAL], Path(tmp) / "paper")


if __name__ == "__main__":
    main()
