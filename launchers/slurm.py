"""Submit cells to a SLURM cluster as submitit job arrays, and ask SLURM what became of them.

One array per resource shape (`resources` in the launcher config), split so that no array
exceeds the cluster's MaxArraySize: 1,440 cells cost a few sbatch calls, not 1,440. Arrays are
submitted held and released once every cell of the array has recorded its job id: a worker
never starts before its cell says `submitted`, so that record can never overwrite the worker's.

The worker is a submitit Checkpointable: on a time limit or preemption signal it records the
requeue in the cell's state and submitit requeues the job; the restarted worker resumes training
from the last completed epoch (benchmark.train) and AutoAttack from its saved state.

Every config of kind `slurm` runs this launcher (conf/launcher/slurm.yaml, slurm_cpu.yaml). What
became of jobs is asked of sacct, in one call for all the jobs asked about.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import submitit
from pydantic import Field, model_validator
from submitit.core.utils import FailedJobError
from submitit.slurm.slurm import SlurmInfoWatcher

from benchmark import cell as cells
from benchmark.cell import Cell
from benchmark.errors import RFTBenchError
from benchmark.paths import PROJECT_DIR
from benchmark.provenance import JobRecord
from benchmark.schema import Count, Positive, Strict
from benchmark.study import merged
from launchers import JobState, Launcher

if TYPE_CHECKING:
    from benchmark.study import Study

TOOLS = ("sbatch", "srun", "sacct", "scontrol", "scancel")
SLURM_OPTIONS = ("partition", "account", "qos", "constraint")
COMMAND_TIMEOUT_S = 60
# `scontrol show config` answers in well under a second; without a controller it retries for a
# minute, longer than anyone should wait for the error.
CHECK_TIMEOUT_S = 20
# DerivedExitCode: the worst of the job's steps; the allocation's ExitCode hides a step's signal.
SACCT_FIELDS = "JobID,State,ExitCode,DerivedExitCode,Reason,Elapsed"

# sacct states of a job that may still run, and what it is doing.
JOB_ALIVE = {"PENDING": "queued", "REQUEUED": "queued", "REQUEUE_HOLD": "queued", "REQUEUE_FED": "queued",
        "RESV_DEL_HOLD": "queued", "SPECIAL_EXIT": "queued", "SUSPENDED": "queued", "STOPPED": "queued",
        "CONFIGURING": "running", "RUNNING": "running", "COMPLETING": "running", "RESIZING": "running",
        "SIGNALING": "running", "STAGE_OUT": "running"}
# What a job that ended without its worker recording why died of.
ENDED = {"BOOT_FAIL": "its node failed to boot", "CANCELLED": "it was cancelled",
         "COMPLETED": "it completed without its worker recording an outcome",
         "DEADLINE": "it reached its deadline", "FAILED": "it failed",
         "NODE_FAIL": "its node failed", "OUT_OF_MEMORY": "it ran out of memory",
         "PREEMPTED": "it was preempted and not requeued", "TIMEOUT": "it reached its time limit"}


class Resources(Strict):
    """Layers of submitit SlurmExecutor parameters (time, mem, cpus_per_task, gpus_per_node, ...),
    merged default < protocol < model size < model; null drops a layer or a value."""

    default: dict[str, Any]
    protocol: dict[str, dict[str, Any] | None] | None
    model_size: dict[str, dict[str, Any] | None] | None
    model: dict[str, dict[str, Any] | None] | None

    @model_validator(mode="after")
    def _submitit_parameters(self) -> Resources:
        # submitit's own list of SlurmExecutor parameters (an unknown one would reach the user as
        # its ValueError at submission, after the cells were written).
        valid = submitit.SlurmExecutor._valid_parameters()
        layers = [self.default, *(shape for layer in (self.protocol, self.model_size, self.model)
                                  for shape in (layer or {}).values() if shape)]
        unknown = sorted({key for shape in layers for key in shape} - valid)
        if unknown:
            raise ValueError(f"unknown SlurmExecutor parameter {unknown[0]!r}; valid: {', '.join(sorted(valid))}")
        return self


class SlurmConfig(Strict):
    """conf/launcher/slurm.yaml (and slurm_cpu.yaml, which builds on it)."""

    name: str
    kind: str
    partition: str | None
    account: str | None
    qos: str | None
    constraint: str | None
    resources: Resources
    array_parallelism: Count           # array tasks of one array running at once
    max_array_size: Count | None       # null: the cluster's MaxArraySize
    setup: list[str]                   # shell lines run before the worker
    log_folder: str | None
    max_requeues: Annotated[int, Field(ge=0)]
    signal_delay_s: Annotated[int, Field(ge=0)]
    poll_seconds: Positive
    additional_parameters: dict[str, Any]


class SlurmLauncher(Launcher):
    """A config of kind `slurm`: cells as held job arrays, workers as one job array."""

    kind = "slurm"
    schema = SlurmConfig

    def check(self, study: Study) -> None:
        """A clear error, before anything is written, when no SLURM cluster answers here."""
        missing = [tool for tool in TOOLS if shutil.which(tool) is None]
        if missing:
            raise RFTBenchError(
                f"launcher={self.name} needs the SLURM commands, but {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not on PATH: run on a machine of the cluster, "
                "or use launcher=local (a local test cluster: scripts/slurm-local.sh start)")
        cluster_config()
        for shape, group in shapes(self.config, study.cells).values():
            check_ranks(shape, group[0])

    def processes(self, cell: Cell) -> int:
        """The ranks of the cell: its job's tasks (nodes x ntasks_per_node), each a process of one
        data-parallel group (benchmark.distributed; one GPU per task on CUDA)."""
        shape = resources(self.config, cell)
        return shape.get("nodes", 1) * shape.get("ntasks_per_node", 1)

    def launch(self, study: Study, todo: list[Cell]) -> int:
        """Submit `todo` as held job arrays, record each cell's job id, then release the arrays."""
        limit = _max_array_size(self.config)
        study_dir = study.dir.resolve()
        folder = self._log_folder(study)
        worker = CellJob(_runtime_config(study.config), self.config["max_requeues"], self.job_record())
        submitted: list[str] = []
        for shape, group in shapes(self.config, todo).values():
            for chunk in _chunks(group, limit):
                executor = self._executor(folder, shape, f"rftbench-{study.name}", hold=True)
                jobs = _submit(executor, [(worker, c.directory(study_dir)) for c in chunk], shape, "cells",
                               done_before=submitted)
                array_id = jobs[0].job_id.split("_")[0]
                self._record_then_release(array_id, [(c.directory(study_dir), job) for c, job in zip(chunk, jobs)])
                submitted.append(array_id)
                print(f"submitted job {array_id}: {len(chunk)} cells, {_describe(shape)}")
        print(f"study {study.name}: {len(todo)} cells submitted in {len(submitted)} job arrays "
              f"({', '.join(submitted)}); logs in {folder}; follow with: rftbench status study={study.name} --watch")
        return 0

    def submit_workers(self, study: Study, fn: Callable[[], None], n: int, name: str) -> list[JobRecord]:
        """One job array of `n` tasks, each calling `fn()`, with the config's default resources."""
        shape = resources(self.config, None)
        executor = self._executor(self._log_folder(study), shape, f"rftbench-{study.name}-{name}", hold=False)
        jobs = _submit(executor, [(fn,)] * n, shape, "workers", done_before=[])
        return [self.job_record(job_id=job.job_id, log=str(job.paths.stderr)) for job in jobs]

    @classmethod
    def cancel(cls, study: Study, todo: list[Cell]) -> int:
        """scancel the jobs of `todo` (queued or running cells) and mark the cells failed."""
        records = {cell.id: cells.read_state(cell.directory(study.dir)) for cell in todo}
        active = [cell for cell in todo if records[cell.id].get("job_id")]
        if active:
            _run(["scancel", *job_ranges(records[c.id]["job_id"] for c in active)])
        for cell in active:
            cells.write_state(cell.directory(study.dir), "failed", **_job_of(records[cell.id]),
                              reason="cancelled by user")
        print(f"study {study.name}: cancelled {len(active)} queued or running cells")
        return 0

    @classmethod
    def job_states(cls, records: dict[str, dict[str, Any]]) -> dict[str, JobState] | None:
        """From ONE sacct call for the jobs of all `records`."""
        ids = {key: record["job_id"] for key, record in records.items() if record.get("job_id")}
        jobs = sacct(ids.values())
        if jobs is None:
            return None
        return {key: outcome(job_id, jobs[job_id]) for key, job_id in ids.items() if job_id in jobs}

    def _log_folder(self, study: Study) -> Path:
        return Path(self.config["log_folder"] or study.dir / "logs").resolve()

    def _executor(self, folder: Path, shape: dict[str, Any], job_name: str, hold: bool) -> submitit.SlurmExecutor:
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=self.config["max_requeues"])
        executor.update_parameters(
            **shape, job_name=job_name, array_parallelism=self.config["array_parallelism"],
            signal_delay_s=self.config["signal_delay_s"],
            # The worker imports the project even when it is not installed on the nodes.
            setup=[f"export PYTHONPATH={PROJECT_DIR}${{PYTHONPATH:+:$PYTHONPATH}}", *self.config["setup"]],
            additional_parameters={**self.config["additional_parameters"], **({"hold": True} if hold else {})},
        )
        return executor

    def _record_then_release(self, array_id: str, submitted: list[tuple[Path, submitit.Job]]) -> None:
        """Record `submitted` in each cell, then release the held array; cancel it if recording fails."""
        try:
            for cell_dir, job in submitted:
                cells.write_state(cell_dir, "submitted", **self.job_record(job_id=job.job_id, log=str(job.paths.stderr)))
        except BaseException:
            subprocess.run(["scancel", array_id], capture_output=True, timeout=COMMAND_TIMEOUT_S)
            raise
        _run(["scontrol", "release", array_id])


# --- the cluster ------------------------------------------------------------------------------

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

def resources(launcher: dict[str, Any], cell: Cell | None) -> dict[str, Any]:
    """The submitit SlurmExecutor parameters of `cell` (None: of a job that is no cell): the
    launcher's sbatch options, then `resources` default < protocol < model size < model (null
    layers and values dropped)."""
    layers = launcher["resources"]
    shape = merged({key: launcher[key] for key in SLURM_OPTIONS}, layers.get("default") or {})
    if cell is not None:
        for layer, choice in (("protocol", cell.protocol), ("model_size", cell.config["model"].get("size")),
                              ("model", cell.model)):
            shape = merged(shape, (layers.get(layer) or {}).get(choice) or {})
    return {key: value for key, value in shape.items() if value is not None}


def check_ranks(shape: dict[str, Any], cell: Cell) -> None:
    """Refuse a shape with more tasks (ranks) per node than GPUs per node when it asks for GPUs
    (`cell`: one cell of that shape, named in the message)."""
    tasks, gpus = shape.get("ntasks_per_node", 1), shape.get("gpus_per_node")
    if tasks < 1:
        raise RFTBenchError(f"launcher resources of {cell.slug}: ntasks_per_node={tasks}, at least 1 is needed")
    if gpus and tasks > int(str(gpus).rpartition(":")[2]):
        raise RFTBenchError(f"launcher resources of {cell.slug}: ntasks_per_node={tasks} ranks but gpus_per_node={gpus}: "
                            "at most one rank per GPU (set ntasks_per_node <= gpus_per_node)")


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


def _describe(shape: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in sorted(shape.items()))


# --- submission -------------------------------------------------------------------------------

def _submit(executor: submitit.SlurmExecutor, calls: list[tuple[Any, ...]], shape: dict[str, Any],
            what: str, done_before: list[str]) -> list[submitit.Job]:
    """One job array (one sbatch call) of a task per call `(fn, *args)`, `what` naming them."""
    try:
        # submitit prints sbatch's complaint itself as well: keep only ours, which carries it.
        with contextlib.redirect_stderr(io.StringIO()), executor.batch():
            jobs = [executor.submit(*call) for call in calls]
    except FailedJobError as err:
        before = f" (job arrays {', '.join(done_before)} were submitted before it)" if done_before else ""
        raise RFTBenchError(f"sbatch refused the job array of {len(calls)} {what} ({_describe(shape)}): "
                            f"{str(err).strip()}. None of these {what} was submitted{before}.") from None
    return jobs


def _runtime_config(config: dict[str, Any]) -> dict[str, Any]:
    """The part of the root config the worker needs, its paths made absolute (jobs may start
    in another directory)."""
    return {"paths": {kind: str(Path(path).resolve()) for kind, path in config["paths"].items()},
            "runtime": config["runtime"]}


# --- the worker -------------------------------------------------------------------------------

class CellJob(submitit.helpers.Checkpointable):
    """What an array task runs: one cell. Checkpointable, so a time limit or preemption signal
    requeues it (at most `max_requeues` times per submission) instead of killing it."""

    def __init__(self, runtime_config: dict[str, Any], max_requeues: int, job: JobRecord):
        self.runtime_config, self.max_requeues, self.job = runtime_config, max_requeues, job

    def __call__(self, cell_dir: Path) -> None:
        from benchmark.run import Runtime, run_cell  # torch: imported by the job, not by `launch`

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:  # the ranks of one cell find each other by torch.distributed's variables
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        job = JobRecord(**self.job, job_id=env.job_id, log=str(env.paths.stderr), **({"cpus": int(cpus)} if cpus else {}))
        run_cell(cell_dir, Runtime.from_config(self.runtime_config), job=job)

    def checkpoint(self, cell_dir: Path) -> submitit.helpers.DelayedSubmission:
        """Called by submitit's signal handler: record the requeue, then let submitit requeue.
        The cell's own checkpoints (last epoch, AutoAttack state) are already on disk."""
        state = cells.read_state(cell_dir)
        requeues = state.get("requeues", 0)
        if requeues >= self.max_requeues:
            raise RequeueLimitError(f"stopped by a time limit or preemption after {requeues} requeues "
                                    f"(launcher.max_requeues={self.max_requeues})")
        cells.write_state(cell_dir, "requeued", **_job_of(state), requeues=requeues + 1,
                          reason="time limit or preemption signal: requeued")
        return submitit.helpers.DelayedSubmission(self, cell_dir)


class RequeueLimitError(RuntimeError):
    """A cell was stopped by time limits or preemptions more often than the launcher allows."""


def _job_of(state: dict[str, Any]) -> JobRecord:
    """The job record inside a cell's state record."""
    return JobRecord(**{key: state[key] for key in JobRecord.__annotations__ if key in state})


# --- what SLURM says --------------------------------------------------------------------------

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


def sacct(job_ids: Iterable[str]) -> dict[str, dict[str, str]] | None:
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


def outcome(job_id: str, info: dict[str, str]) -> JobState:
    """The state of the job `job_id` that sacct describes by `info` and, when it ended, why."""
    state = info.get("State", "UNKNOWN")
    name = state.split()[0].rstrip("+")  # "CANCELLED by 0" -> CANCELLED
    if name in JOB_ALIVE:
        return JobState(JOB_ALIVE[name])
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
    return JobState("ended", f"SLURM job {job_id}: {why} ({', '.join(detail)})")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown signal"
