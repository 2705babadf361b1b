"""Submit cells to a SLURM cluster as submitit job arrays, and ask SLURM what became of them.

One array per resource shape (`resources` in conf/launcher/slurm.yaml), split so that no array
exceeds the cluster's MaxArraySize: 1,440 cells cost a few sbatch calls, not 1,440. Arrays are
submitted held and released once every cell of the array has recorded its job id: a worker
never starts before its cell says `submitted`, so that record can never overwrite the worker's.

The worker is a submitit Checkpointable: on a time limit or preemption signal it records the
requeue in the cell's state and submitit requeues the job; the restarted worker resumes training
from the last completed epoch (benchmark.train) and AutoAttack from its saved state.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import shutil
import signal
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import FailedJobError
from submitit.slurm.slurm import SlurmInfoWatcher

from benchmark import cell as cells
from benchmark.cell import Cell
from benchmark.errors import RFTBenchError
from benchmark.paths import PROJECT_DIR
from benchmark.study import Study, merged

NAME = "slurm"
TOOLS = ("sbatch", "srun", "sacct", "scontrol", "scancel")
SLURM_OPTIONS = ("partition", "account", "qos", "constraint")
COMMAND_TIMEOUT_S = 60
# `scontrol show config` answers in well under a second; without a controller it retries for a
# minute, longer than anyone should wait for the error.
CHECK_TIMEOUT_S = 20
# DerivedExitCode: the worst of the job's steps; the allocation's ExitCode hides a step's signal.
SACCT_FIELDS = "JobID,State,ExitCode,DerivedExitCode,Reason,Elapsed"

# sacct states of a job that may still run the cell, and the state `status` shows for each.
JOB_ALIVE = {"PENDING": "queued", "REQUEUED": "queued", "REQUEUE_HOLD": "queued", "REQUEUE_FED": "queued",
        "RESV_DEL_HOLD": "queued", "SPECIAL_EXIT": "queued", "SUSPENDED": "queued", "STOPPED": "queued",
        "CONFIGURING": "running", "RUNNING": "running", "COMPLETING": "running", "RESIZING": "running",
        "SIGNALING": "running", "STAGE_OUT": "running"}
# What a job that ended without the cell recording why died of.
ENDED = {"BOOT_FAIL": "its node failed to boot", "CANCELLED": "it was cancelled",
         "COMPLETED": "it completed without the cell writing its rows",
         "DEADLINE": "it reached its deadline", "FAILED": "it failed",
         "NODE_FAIL": "its node failed", "OUT_OF_MEMORY": "it ran out of memory",
         "PREEMPTED": "it was preempted and not requeued", "TIMEOUT": "it reached its time limit"}


# --- the cluster ------------------------------------------------------------------------------

def check(study: Study) -> None:
    """A clear error, before anything is written, when no SLURM cluster answers here."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise RFTBenchError(
            f"launcher=slurm needs the SLURM commands, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not on PATH: run on a machine of the cluster, "
            "or use launcher=local (a local test cluster: scripts/slurm-local.sh start)")
    cluster_config()


@functools.cache
def cluster_config() -> dict[str, str]:
    """`scontrol show config` as a dict: it answers only when the controller is reachable."""
    try:
        done = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                              timeout=CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RFTBenchError(f"no SLURM controller answers: `scontrol show config` gave no answer within "
                            f"{CHECK_TIMEOUT_S} s") from None
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip() or f"exit code {done.returncode}"
        raise RFTBenchError(f"no SLURM controller answers (`scontrol show config`: {said})")
    pairs = (line.split("=", 1) for line in done.stdout.splitlines() if " = " in line)
    return {key.strip(): value.strip() for key, value in pairs}


def _max_array_size(launcher: dict[str, Any]) -> int:
    return int(launcher["max_array_size"] or cluster_config()["MaxArraySize"])


def _run(command: list[str]) -> str:
    """Run a SLURM command; its own error message becomes the RFTBenchError's."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RFTBenchError(f"`{' '.join(command[:2])} ...` did not answer within {COMMAND_TIMEOUT_S} s") from None
    if done.returncode != 0:
        raise RFTBenchError(f"`{' '.join(command[:2])} ...` failed: {(done.stderr or done.stdout).strip()}")
    return done.stdout


# --- resource shapes --------------------------------------------------------------------------

def resources(launcher: dict[str, Any], cell: Cell) -> dict[str, Any]:
    """The cell's submitit SlurmExecutor parameters: the launcher's sbatch options, then
    `resources` default < protocol < model size < model (null layers and values dropped)."""
    layers = launcher["resources"]
    shape = merged({key: launcher[key] for key in SLURM_OPTIONS}, layers.get("default") or {})
    for layer, choice in (("protocol", cell.protocol), ("model_size", cell.config["model"].get("size")),
                          ("model", cell.model)):
        shape = merged(shape, (layers.get(layer) or {}).get(choice) or {})
    return {key: value for key, value in shape.items() if value is not None}


def shapes(launcher: dict[str, Any], todo: Iterable[Cell]) -> dict[str, tuple[dict[str, Any], list[Cell]]]:
    """The cells grouped by resource shape: {canonical JSON of the shape: (shape, cells)}."""
    groups: dict[str, tuple[dict[str, Any], list[Cell]]] = {}
    for cell in todo:
        shape = resources(launcher, cell)
        groups.setdefault(json.dumps(shape, sort_keys=True), (shape, []))[1].append(cell)
    return groups


def _chunks(items: list[Cell], size: int) -> Iterator[list[Cell]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# --- the worker -------------------------------------------------------------------------------

class CellJob(submitit.helpers.Checkpointable):
    """What an array task runs: one cell. Checkpointable, so a time limit or preemption signal
    requeues it (at most `max_requeues` times per submission) instead of killing it."""

    def __init__(self, runtime_config: dict[str, Any], max_requeues: int):
        self.runtime_config, self.max_requeues = runtime_config, max_requeues

    def __call__(self, cell_dir: Path) -> None:
        from benchmark.run import Runtime, run_cell  # torch: imported by the job, not by `launch`

        env = submitit.JobEnvironment()
        run_cell(cell_dir, Runtime.from_config(self.runtime_config),
                 job={"launcher": NAME, "job_id": env.job_id, "log": str(env.paths.stderr)})

    def checkpoint(self, cell_dir: Path) -> submitit.helpers.DelayedSubmission:
        """Called by submitit's signal handler: record the requeue, then let submitit requeue.
        The cell's own checkpoints (last epoch, AutoAttack state) are already on disk."""
        state = cells.read_state(cell_dir)
        requeues = state.get("requeues", 0)
        if requeues >= self.max_requeues:
            raise RequeueLimitError(f"stopped by a time limit or preemption after {requeues} requeues "
                                    f"(launcher.max_requeues={self.max_requeues})")
        cells.write_state(cell_dir, "requeued", **_job_details(state), requeues=requeues + 1,
                          reason="time limit or preemption signal: requeued")
        return submitit.helpers.DelayedSubmission(self, cell_dir)


class RequeueLimitError(RuntimeError):
    """A cell was stopped by time limits or preemptions more often than the launcher allows."""


def _job_details(state: dict[str, Any]) -> dict[str, Any]:
    return {key: state[key] for key in ("launcher", "job_id", "log") if key in state}


# --- launch and cancel ------------------------------------------------------------------------

def launch(study: Study, todo: list[Cell]) -> int:
    """Submit `todo` as held job arrays, record each cell's job id, then release the arrays."""
    launcher = study.config["launcher"]
    limit = _max_array_size(launcher)
    study_dir = study.dir.resolve()
    folder = Path(launcher["log_folder"] or study_dir / "logs").resolve()
    worker = CellJob(_runtime_config(study.config), launcher["max_requeues"])
    submitted: list[str] = []
    for shape, group in shapes(launcher, todo).values():
        for chunk in _chunks(group, limit):
            jobs = _submit_array(folder, launcher, shape, worker, [c.directory(study_dir) for c in chunk],
                                 job_name=f"rftbench-{study.name}", done_before=submitted)
            array_id = jobs[0].job_id.split("_")[0]
            _record_then_release(array_id, [(c.directory(study_dir), job) for c, job in zip(chunk, jobs)])
            submitted.append(array_id)
            print(f"submitted job {array_id}: {len(chunk)} cells, {_describe(shape)}")
    print(f"study {study.name}: {len(todo)} cells submitted in {len(submitted)} job arrays "
          f"({', '.join(submitted)}); logs in {folder}; follow with: rftbench status study={study.name} --watch")
    return 0


def _runtime_config(config: dict[str, Any]) -> dict[str, Any]:
    """The part of the root config the worker needs, its paths made absolute (jobs may start
    in another directory)."""
    return {"paths": {kind: str(Path(path).resolve()) for kind, path in config["paths"].items()},
            "runtime": config["runtime"]}


def _record_then_release(array_id: str, submitted: list[tuple[Path, submitit.Job]]) -> None:
    """Record `submitted` in each cell, then release the held array; cancel it if recording fails."""
    try:
        for cell_dir, job in submitted:
            cells.write_state(cell_dir, "submitted", launcher=NAME, job_id=job.job_id, log=str(job.paths.stderr))
    except BaseException:
        subprocess.run(["scancel", array_id], capture_output=True, timeout=COMMAND_TIMEOUT_S)
        raise
    _run(["scontrol", "release", array_id])


def _submit_array(folder: Path, launcher: dict[str, Any], shape: dict[str, Any], worker: CellJob,
                  cell_dirs: list[Path], job_name: str, done_before: list[str]) -> list[submitit.Job]:
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=launcher["max_requeues"])
    executor.update_parameters(
        **shape, job_name=job_name, array_parallelism=launcher["array_parallelism"],
        signal_delay_s=launcher["signal_delay_s"],
        # The worker imports the project even when it is not installed on the nodes.
        setup=[f"export PYTHONPATH={PROJECT_DIR}${{PYTHONPATH:+:$PYTHONPATH}}", *launcher["setup"]],
        additional_parameters={**launcher["additional_parameters"], "hold": True},
    )
    try:
        # submitit prints sbatch's complaint itself as well: keep only ours, which carries it.
        with contextlib.redirect_stderr(io.StringIO()):
            return executor.map_array(worker, cell_dirs)
    except FailedJobError as err:
        before = f" (job arrays {', '.join(done_before)} were submitted before it)" if done_before else ""
        raise RFTBenchError(f"sbatch refused the job array of {len(cell_dirs)} cells ({_describe(shape)}): "
                            f"{str(err).strip()}. None of these cells was submitted{before}.") from None


def job_ranges(job_ids: Iterable[str]) -> list[str]:
    """Job ids in SLURM's compact form, one word per array ("12_[0-99,120]"): scancel takes an
    array's tasks in one request instead of one request per task."""
    tasks: dict[str, list[int]] = {}
    plain: set[str] = set()
    for job_id in job_ids:
        array, _, task = job_id.partition("_")
        if task:
            tasks.setdefault(array, []).append(int(task))
        else:
            plain.add(job_id)
    return sorted(plain) + [f"{array}_[{_ranges(numbers)}]" for array, numbers in sorted(tasks.items())]


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    runs: list[list[int]] = []  # [first, last] of each run of consecutive numbers
    for n in sorted(set(numbers)):
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ",".join(f"{first}-{last}" if last > first else str(first) for first, last in runs)


def _describe(shape: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in sorted(shape.items()))


def cancel(study: Study, todo: list[Cell]) -> int:
    """scancel the jobs of the queued or running cells in `todo` and mark them failed."""
    from benchmark.sweep import LIVE, cell_states

    states = cell_states(study, todo)
    active = [c for c in todo if states[c.id]["state"] in LIVE and states[c.id].get("job_id")]
    if active:
        _run(["scancel", *job_ranges(states[c.id]["job_id"] for c in active)])
    for cell in active:
        cells.write_state(cell.directory(study.dir), "failed", **_job_details(states[cell.id]),
                          reason="cancelled by user")
    print(f"study {study.name}: cancelled {len(active)} queued or running cells")
    return 0


# --- what SLURM says --------------------------------------------------------------------------

def job_states(job_ids: Iterable[str]) -> dict[str, dict[str, str]] | None:
    """sacct's record (the SACCT_FIELDS) of each job id, from ONE sacct call for all of them
    (asked per array, answered per task); None when sacct cannot answer (no SLURM here,
    accounting down)."""
    arrays = sorted({job_id.split("_")[0] for job_id in job_ids})
    if not arrays or shutil.which("sacct") is None:
        return None if arrays else {}
    try:
        done = subprocess.run(["sacct", "-X", "--parsable2", "-o", SACCT_FIELDS, "-j", ",".join(arrays)],
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        return None
    return SlurmInfoWatcher().read_info(done.stdout)


def outcome(job_id: str, info: dict[str, str]) -> tuple[str, str | None]:
    """The state `status` shows for a cell whose job sacct describes by `info` (queued,
    running or failed) and, for failed, why."""
    state = info.get("State", "UNKNOWN")
    name = state.split()[0].rstrip("+")  # "CANCELLED by 0" -> CANCELLED
    if name in JOB_ALIVE:
        return JOB_ALIVE[name], None
    why = ENDED.get(name, f"it ended in state {name}")
    detail = [state]
    code, _, job_signal = info.get("ExitCode", "0:0").partition(":")
    step_signal = info.get("DerivedExitCode", "0:0").partition(":")[2]
    number = int(job_signal or 0) or int(step_signal or 0)
    if number:
        detail.append(f"killed by signal {number} ({_signal_name(number)})")
    elif code not in ("", "0"):
        detail.append(f"exit code {code}")
    if info.get("Elapsed"):
        detail.append(f"after {info['Elapsed']}")
    return "failed", f"SLURM job {job_id}: {why} ({', '.join(detail)})"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown signal"
