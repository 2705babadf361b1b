"""Run cells on this machine, one after another, in this process, with a progress bar.

A failing cell is recorded as failed (its state carries the reason and traceback) and the
sweep goes on with the next cell; the exit code is non-zero when any cell failed.

With `launcher.nproc=N` > 1 a cell runs as N spawned processes, the ranks of one data-parallel
group (benchmark.distributed: torch.distributed's environment variables, Gloo on the CPU, one GPU
per rank on CUDA). This process watches them: when one ends in failure the others get
RANK_GRACE_S to fail in turn (a rank that dies breaks its peers' next collective) and are then
stopped, and the cell is failed with the reason of the rank that failed first.

A local job has no scheduler to ask: its worker's record says on which host and in which process
it runs, and a process of this host that is gone is known dead at once (a worker on another host
is judged by its heartbeat, benchmark.sweep).
"""
from __future__ import annotations

import functools
import glob
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from benchmark import cell as cells
from benchmark.cell import Cell
from benchmark.errors import RFTBenchError
from benchmark.provenance import JobRecord
from benchmark.schema import Count, Strict
from launchers import JobState, Launcher

if TYPE_CHECKING:
    from benchmark.study import Study

HOST = os.uname().nodename  # what a worker records as its host (benchmark.run)
RANK_GRACE_S = 20.0  # after a rank failed, how long its peers may take to fail before they are stopped


class LocalConfig(Strict):
    """conf/launcher/local.yaml."""

    name: str
    kind: str
    nproc: Count                 # processes per cell (the ranks of one data-parallel group)


class LocalLauncher(Launcher):
    """`conf/launcher/local.yaml`: cells run in the launching process; workers as child processes."""

    kind = "local"
    schema = LocalConfig

    def check(self, study: Study) -> None:
        """Refuse fewer than one rank, or on CUDA more ranks than this machine's visible GPUs."""
        nproc, device = self.config["nproc"], study.config["runtime"]["device"]
        if nproc < 1:
            raise RFTBenchError(f"launcher.nproc={nproc}: a cell needs at least one process (launcher.nproc >= 1)")
        gpus = visible_gpus()
        on_cuda = device.startswith("cuda") or (device == "auto" and gpus > 0)
        if on_cuda and nproc > gpus:
            raise RFTBenchError(f"launcher.nproc={nproc} ranks on CUDA (runtime.device={device}), but this machine "
                                f"shows {gpus} GPUs: at most one rank per GPU (launcher.nproc <= {gpus})")

    def processes(self, cell: Cell) -> int:
        return self.config["nproc"]

    def launch(self, study: Study, todo: list[Cell]) -> int:
        job = self.job_record()  # the worker adds its host and pid
        nproc = self.config["nproc"]
        runtime_config = {"paths": {kind: str(Path(path).resolve()) for kind, path in study.config["paths"].items()},
                          "runtime": study.config["runtime"]}
        # Several ranks: the spawned processes import torch; this one need not (it would delay them).
        run = (functools.partial(run_ranks, runtime_config=runtime_config, job=job, nproc=nproc) if nproc > 1
               else _in_process(runtime_config, job))
        failed: list[Cell] = []
        print(f"study {study.name}: running {len(todo)} cells locally"
              f"{f' ({nproc} processes each)' if nproc > 1 else ''}; results in {study.dir}")
        with tqdm(todo, unit="cell", file=sys.stdout, dynamic_ncols=True) as bar:
            for cell in bar:
                bar.set_description(cell.slug)
                if not run(cell.directory(study.dir)):
                    failed.append(cell)
        for cell in failed:
            reason = cells.read_state(cell.directory(study.dir)).get("reason")
            print(f"FAILED {cell.slug} ({cell.id}): {reason}  [log: {cell.directory(study.dir) / cells.LOG_FILE}]")
        print(f"study {study.name}: {len(todo) - len(failed)} cells done, {len(failed)} failed; "
              f"rows in {study.dir / 'cells'}/*/{cells.ROWS_FILE}")
        return 1 if failed else 0

    def submit_workers(self, study: Study, fn: Callable[[], None], n: int, name: str) -> list[JobRecord]:
        """`n` child processes (spawned: no state shared with this one), each logging to
        `<study>/logs/<name>-<i>.log`."""
        folder = study.dir / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        spawn = multiprocessing.get_context("spawn")
        records = []
        for i in range(n):
            log = folder / f"{name}-{i}.log"
            process = spawn.Process(target=_logged, args=(fn, log), name=f"{name}-{i}")
            process.start()
            records.append(self.job_record(host=HOST, pid=process.pid, log=str(log)))
        return records

    @classmethod
    def cancel(cls, study: Study, todo: list[Cell]) -> int:
        print("the local launcher runs cells in the foreground: stop it with Ctrl-C")
        return 0

    @classmethod
    def job_states(cls, records: dict[str, dict[str, Any]]) -> dict[str, JobState]:
        """Ended, for each record of a process of this host that is gone; nothing is said of a
        live process (its pid may have been reused: the heartbeat tells) or of another host."""
        return {key: JobState("ended", f"the worker on {HOST} (pid {record['pid']}) stopped without recording "
                                       "an outcome: its process is gone")
                for key, record in records.items()
                if record.get("host") == HOST and record.get("pid") and not _alive(record["pid"])}


def visible_gpus() -> int:
    """CUDA GPUs this process may use, without torch: CUDA_VISIBLE_DEVICES when set, else the
    NVIDIA driver's list (none without the driver)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([device for device in visible.split(",") if device.strip()])
    return len(glob.glob("/proc/driver/nvidia/gpus/*"))


def _in_process(runtime_config: dict[str, Any], job: JobRecord) -> Callable[[Path], bool]:
    """Runs a cell in this process: whether it succeeded (a failure is in the cell's state)."""
    from benchmark.run import Runtime, run_cell  # torch: only once a cell runs here

    runtime = Runtime.from_config(runtime_config)

    def run(cell_dir: Path) -> bool:
        try:
            run_cell(cell_dir, runtime, job=job)
        except Exception:  # recorded in the cell's state; the sweep goes on
            return False
        return True

    return run


def run_ranks(cell_dir: Path, runtime_config: dict[str, Any], job: JobRecord, nproc: int) -> bool:
    """Run the cell in `cell_dir` as `nproc` spawned ranks (benchmark.run.run_cell in each, with
    the runtime of `runtime_config`: the root config's paths and runtime); whether every rank
    succeeded. On failure the cell's state names the rank that failed first and why, also when
    that rank died without a word (killed)."""
    port = _free_port()
    cpus = max(1, len(os.sched_getaffinity(0)) // nproc)  # the machine's cores shared by the ranks
    spawn = multiprocessing.get_context("spawn")
    ranks = [spawn.Process(target=_rank_main, name=f"rank{rank}",
                           args=(cell_dir, runtime_config, JobRecord(**job, cpus=cpus),
                                 _rank_environment(rank, nproc, port)))
             for rank in range(nproc)]
    for process in ranks:
        process.start()
    first_failed = _watch(ranks)
    if first_failed is None:
        return True
    _record_rank_failure(cell_dir, ranks.index(first_failed), first_failed)
    return False


def _rank_environment(rank: int, nproc: int, port: int) -> dict[str, str]:
    """torch.distributed's environment variables of one rank on this machine."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_main(cell_dir: Path, runtime_config: dict[str, Any], job: JobRecord, environment: dict[str, str]) -> None:
    """One rank (in its spawned process). Its failure is recorded by benchmark.run; the exit
    code tells the launcher, without a traceback on the terminal."""
    os.environ.update(environment)
    from benchmark.run import Runtime, run_cell  # torch: in the rank's process only

    try:
        run_cell(cell_dir, Runtime.from_config(runtime_config), job=job)
    except Exception:  # recorded (rank 0: the cell's state; another rank: its failure file)
        sys.exit(1)


def _watch(ranks: list[multiprocessing.Process]) -> multiprocessing.Process | None:
    """Wait for every rank; the first to end in failure (None if none did). Once one failed,
    the others have RANK_GRACE_S to end, then are terminated (then killed)."""
    running, first_failed, deadline = list(ranks), None, None
    while running:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ended = multiprocessing.connection.wait([p.sentinel for p in running], timeout)
        if not ended:  # the grace period is over
            for process in running:
                process.terminate()
                process.join(5)
                if process.is_alive():
                    process.kill()
                    process.join()
            break
        for process in [p for p in running if p.sentinel in ended]:
            process.join()
            running.remove(process)
            if process.exitcode != 0 and first_failed is None:
                first_failed, deadline = process, time.monotonic() + RANK_GRACE_S
    return first_failed


def _record_rank_failure(cell_dir: Path, rank: int, process: multiprocessing.Process) -> None:
    """Fail the cell with the reason of `rank`, the first to fail: what it recorded itself, else
    how its process ended. Rank 0's own record of its own failure is kept."""
    from benchmark.distributed import failure_file  # only once ranks ran: torch is imported by then

    state = cells.read_state(cell_dir)
    if rank == 0 and state["state"] == "failed":
        return
    recorded = failure_file(cell_dir, rank)
    if recorded.exists():
        failure = json.loads(recorded.read_text())
        reason, trace = f"rank {rank}: {failure['reason']}", failure["traceback"]
    else:
        code = process.exitcode
        ended = (f"was killed by signal {-code} ({signal.Signals(-code).name})" if code < 0
                 else f"exited with code {code}")
        reason, trace = f"rank {rank} (pid {process.pid}) {ended} without recording a reason", None
    details = {key: value for key, value in state.items() if key not in ("state", "attempt", "time", "reason", "traceback")}
    cells.write_state(cell_dir, "failed", **details, reason=reason, **({"traceback": trace} if trace else {}))


def _alive(pid: int) -> bool:
    """Whether process `pid` of this host runs (a zombie, ended but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    # A zombie (ended, not yet reaped by its parent) still answers kill; /proc tells (Linux).
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:  # gone meanwhile; or no /proc at all (macOS), where kill's answer stands
        return not Path("/proc").is_dir()


def _logged(fn: Callable[[], None], log: Path) -> None:
    """Call `fn()` with this process's stdout and stderr going to `log` (run in the child)."""
    with open(log, "ab", buffering=0) as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    fn()
