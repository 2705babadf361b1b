"""Study-level commands: plan, launch, status, resume, cancel.

A sweep is idempotent (DomainBed-style): a cell's id is the hash of its resolved training config
and its state lives in its directory, so relaunching a study launches only what is not done.

A cell's state comes from the files its worker writes (benchmark.cell), reconciled, for the cells
whose files say a worker is at it, with the launcher that cell records (launchers): a cell whose
job ended without the cell recording an outcome (out of memory, node failure, time limit,
cancelled, killed; a local worker's process gone) is failed with the launcher's reason, each
launcher asked once for all its cells (one sacct call for the SLURM ones; local cells are never
sent to sacct). A running cell its launcher says nothing of whose heartbeat stopped is failed
too. The states shown are pending, queued, running, done and failed.

Which launcher runs a cell: `launch` sends the pending cells to the configured launcher
(`launcher=NAME`, default local). `resume` sends each failed cell back to the launcher config it
was last launched with (recorded under the study), so a study launched with `launcher=slurm`
resumes on SLURM, with the same resources, without saying so again; pending cells go to the
configured launcher. A launcher on the command line (`launcher=NAME` or any `launcher.KEY=...`)
wins: every cell resumed goes to it. `status` and `cancel` always ask each cell's own launcher.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmark import cell as cells
from benchmark.cell import AXES, Cell
from benchmark.retention import describe_disk, disk_estimate, disk_used, human_bytes
from benchmark.show import note_lines
from benchmark.study import Study, plan
from launchers import (
    JobState,
    Launcher,
    config_key,
    kind_of,
    launcher_class,
    launcher_for,
    record_config,
    recorded_config,
)

TABLE_ROWS = 40  # cells listed in the text output; --format json lists all
LOG_LINES = 5  # lines of a failed cell's log shown by `status`
# A running cell whose job its launcher says nothing of is dead once its heartbeat file (touched
# every cell.HEARTBEAT_SECONDS by the worker) is this old.
STALE_HEARTBEAT_S = 120.0
# What a cell's file state shows while a worker may still be at it (reconciled with its launcher).
ACTIVE = {"submitted": "queued", "requeued": "queued", "running": "running"}
LIVE = ("queued", "running")
LAUNCH_LOCK = ".launch.lock"


# --- states -----------------------------------------------------------------------------------

def cell_states(study: Study, subset: list[Cell] | None = None) -> dict[str, dict[str, Any]]:
    """State record of every cell of the study (or of `subset`), by cell id, reconciled with
    the scheduler: `state` is one of pending, queued, running, done, failed. A cell without a
    directory is pending without a look at its files (most cells of a big fresh study)."""
    chosen = study.cells if subset is None else subset
    study_dir = study.dir
    present = cells.cells_with_directory(study_dir)
    records = {c.id: cells.read_state(c.directory(study_dir)) if c.id in present else {"state": "pending"}
               for c in chosen}
    jobs = _job_states(records)
    now = time.time()
    for cell in chosen:
        record = records[cell.id]
        if record["state"] in ACTIVE:
            age = _heartbeat_age(cell.directory(study_dir), now) if record["state"] == "running" else None
            records[cell.id] = reconcile(record, jobs.get(cell.id), age)
    return records


def reconcile(record: dict[str, Any], job: JobState | None, heartbeat_age: float | None) -> dict[str, Any]:
    """The record to show for a cell: its file `record`, corrected for an active one by what its
    launcher says of its job (None: nothing) or, failing that, by the age in seconds of its
    worker's heartbeat (None when there is none)."""
    state = record["state"]
    if state not in ACTIVE:
        return record
    if job is not None:
        if job.state == "ended":
            return {**record, "state": "failed", "reason": job.reason}
        return {**record, "state": job.state}
    if state == "running" and heartbeat_age is not None and heartbeat_age > STALE_HEARTBEAT_S:
        where = f"on {record.get('host', '?')} (pid {record.get('pid', '?')})"
        return {**record, "state": "failed",
                "reason": f"the worker {where} stopped without recording an outcome: "
                          f"no heartbeat for {heartbeat_age:.0f} s"}
    return {**record, "state": ACTIVE[state]}


def _job_states(records: dict[str, dict[str, Any]]) -> dict[str, JobState]:
    """What the active cells' own launchers say of their jobs, by cell id: each launcher kind is
    asked once, about its cells only; {} when no cell is active."""
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for cell_id, record in records.items():
        if record["state"] in ACTIVE:
            by_kind.setdefault(kind_of(record), {})[cell_id] = record
    jobs: dict[str, JobState] = {}
    for kind, active in by_kind.items():
        said = launcher_class(kind).job_states(active)
        if said is None:
            print(f"warning: the {kind} launcher could not tell what became of the jobs: {len(active)} queued "
                  "or running cells are shown as their files say (a job that died without a word looks alive)",
                  file=sys.stderr)
        else:
            jobs |= said
    return jobs


def _heartbeat_age(cell_dir: Path, now: float) -> float | None:
    try:
        return now - (cell_dir / cells.HEARTBEAT_FILE).stat().st_mtime
    except FileNotFoundError:
        return None


def summary(study: Study, states: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The JSON shape shared by `plan` and `status`: total, by_state and one entry per cell
    (with its job id when it has one; with reason, traceback and log when it failed)."""
    return {
        "study": study.name,
        "total": len(study.cells),
        "by_state": dict(Counter(states[c.id]["state"] for c in study.cells)),
        "cells": [_entry(c, states[c.id]) for c in study.cells],
    }


def _entry(cell: Cell, record: dict[str, Any]) -> dict[str, Any]:
    keys = ("launcher", "job_id", *(("reason", "traceback", "log") if record["state"] == "failed" else ()))
    return {"cell_id": cell.id, **cell.axes, "seed": cell.seed, "state": record["state"],
            **{k: record[k] for k in keys if record.get(k)}}


def log_tail(record: dict[str, Any], cell_dir: Path, lines: int = LOG_LINES) -> tuple[Path | None, list[str]]:
    """The last lines of the cell's job log (where SLURM's messages and the traceback land),
    else of its train.log; (None, []) when it has neither."""
    for path in (Path(record["log"]) if record.get("log") else None, cell_dir / cells.LOG_FILE):
        if path is not None and path.exists():
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - 16_384))
                return path, f.read().decode(errors="replace").splitlines()[-lines:]
    return None, []


# --- output -----------------------------------------------------------------------------------

def _print_summary(study: Study, report: dict[str, Any]) -> None:
    print(f"study {study.name}: {report['total']} cells in {study.dir}")
    for axis in (*AXES, "seed"):
        counts = Counter(getattr(c, axis) for c in study.cells)
        print(f"  {axis:9s} {len(counts):4d}: " + ", ".join(f"{name} ({n})" for name, n in counts.items()))
    print("  states: " + _counts(report["by_state"]))
    from benchmark.cost import describe

    print("\n".join(f"  {line}" for line in describe(report["estimate"])))
    print("  " + describe_disk(report["disk"]))
    for entry in report["cells"][:TABLE_ROWS]:
        print(f"  {entry['cell_id']}  {entry['state']:8s} " + " ".join(entry[a] for a in AXES) + f" seed{entry['seed']}")
    if report["total"] > TABLE_ROWS:
        print(f"  ... {report['total'] - TABLE_ROWS} more (--format json lists every cell)")


def _counts(by_state: dict[str, int]) -> str:
    return ", ".join(f"{state} {n}" for state, n in sorted(by_state.items()))


def _print_status(study: Study, states: dict[str, dict[str, Any]], report: dict[str, Any]) -> None:
    print(f"study {study.name}: {report['total']} cells in {study.dir} "
          f"({human_bytes(report['disk_bytes_used'])} on disk in their directories)")
    print("  " + _counts(report["by_state"]))
    _print_failed(study, [c for c in study.cells if states[c.id]["state"] == "failed"], states)


def _print_failed(study: Study, failed: list[Cell], states: dict[str, dict[str, Any]]) -> None:
    if not failed:
        return
    print(f"failed cells ({len(failed)}):")
    for cell in failed[:TABLE_ROWS]:
        record = states[cell.id]
        job = f"  job {record['job_id']}" if record.get("job_id") else ""
        print(f"  {cell.slug} ({cell.id}){job}\n    reason: {record.get('reason', 'no reason recorded')}")
        path, lines = log_tail(record, cell.directory(study.dir))
        if path is not None:
            print(f"    {path}:\n" + "\n".join(f"      | {line}" for line in lines))
    if len(failed) > TABLE_ROWS:
        print(f"  ... {len(failed) - TABLE_ROWS} more (--format json lists every cell)")
    print(f"resume them with: rftbench resume study={study.name} (each goes back to its own launcher)")


# --- commands ---------------------------------------------------------------------------------

def plan_command(args: argparse.Namespace) -> int:
    """The study's cells, their states and the cost estimate of its cells (benchmark.cost)."""
    from benchmark.cost import estimate

    study = plan(args.overrides)
    states = cell_states(study)
    report = {**summary(study, states), "estimate": estimate(study, states), "disk": disk_estimate(study),
              "notes": study.notes}
    if args.format == "json":
        print(json.dumps(report, indent=2))
    else:
        _print_summary(study, report)
        for line in note_lines(study.notes):  # stderr: stdout stays the plan
            print(f"note: {line}", file=sys.stderr)
    return 0


@contextmanager
def _launch_lock(study: Study) -> Iterator[None]:
    """One launch or resume of a study at a time: the second sees the first's submissions."""
    study.dir.mkdir(parents=True, exist_ok=True)
    with open(study.dir / LAUNCH_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _submit(study: Study, wanted: Callable[[str], bool], wait: bool, own_launchers: bool) -> int:
    """Launch the cells whose state is `wanted`, failed ones with their own launcher when
    `own_launchers` (see the module's docstring), others with the configured one; with `wait`,
    block until they end, then collect."""
    configured = launcher_for(study.config["launcher"])
    configured.check(study)  # a clear error before anything is written
    _check_inputs(study)
    with _launch_lock(study):
        states = cell_states(study)
        todo = [c for c in study.cells if wanted(states[c.id]["state"])]
        if not todo:
            print(f"study {study.name}: nothing to launch ({len(study.cells)} cells: {_counts(summary(study, states)['by_state'])})")
            return 0
        groups = _by_launcher(study, todo, states, configured, own_launchers)
        for launcher, _ in groups:
            if launcher is not configured:
                launcher.check(study)  # a recorded launcher: the study directory exists already
        code = max(_launch(study, launcher, chosen) for launcher, chosen in groups)
    if wait:
        poll_seconds = min(launcher.config.get("poll_seconds", 10) for launcher, _ in groups)
        code = max(code, wait_for(study, todo, poll_seconds))
        _collect(study)
    return code


def _by_launcher(study: Study, todo: list[Cell], states: dict[str, dict[str, Any]], configured: Launcher,
                 own_launchers: bool) -> list[tuple[Launcher, list[Cell]]]:
    """`todo` grouped by the launcher that takes each cell: with `own_launchers`, the config a
    failed cell was last launched with (when recorded), else `configured`. The configured one
    comes last: a local launcher blocks until its cells are done, and cells going back to a
    scheduler need not wait for them."""
    launchers: dict[str | None, Launcher] = {None: configured}  # by recorded config key
    groups: dict[str, tuple[Launcher, list[Cell]]] = {}
    for cell in todo:
        key = states[cell.id].get("launcher_config") if own_launchers else None
        if key not in launchers:
            config = recorded_config(study.dir, key)
            launchers[key] = configured if config is None else launcher_for(config)
        launcher = launchers[key]
        groups.setdefault(config_key(launcher.config), (launcher, []))[1].append(cell)
    return sorted(groups.values(), key=lambda group: group[0] is configured)


def _launch(study: Study, launcher: Launcher, todo: list[Cell]) -> int:
    record_config(study.dir, launcher.config)  # what `resume` sends the cells back to
    for cell in todo:
        cells.write_config(cell, cell.directory(study.dir), study.name)
    return launcher.launch(study, todo)


def _chooses_launcher(overrides: Sequence[str]) -> bool:
    """Whether the command line sets the launcher: `launcher=NAME` or any `launcher.KEY=...`."""
    return any(o.lstrip("+~").split("=")[0].split(".")[0] == "launcher" for o in overrides)


def _check_inputs(study: Study) -> None:
    """Every dataset prepared, every weights file present and every condition runnable, before
    any cell is launched."""
    from benchmark.conditions import check_conditions
    from benchmark.prepare import require_prepared
    from benchmark.weights import require_weights

    runtime = study.config["paths"]
    # Planned cells share their eval node: keyed by object, not by a serialisation per cell.
    for eval_cfg in {id(c.config["eval"]): c.config["eval"] for c in study.cells}.values():
        check_conditions(eval_cfg)
    for config in {c.dataset: c.config["dataset"] for c in study.cells}.values():
        require_prepared(config, Path(runtime["data"]))
    for config in {c.model: c.config["model"] for c in study.cells}.values():
        require_weights(config, Path(runtime["weights"]))


def wait_for(study: Study, todo: list[Cell], poll_seconds: float) -> int:
    """Block until none of `todo` is queued or running, printing the counts as they change;
    1 when any of them failed (listed with reasons), else 0."""
    last: Counter[str] | None = None
    while True:
        states = cell_states(study, todo)
        counts = Counter(r["state"] for r in states.values())
        if counts != last:
            print(f"{time.strftime('%H:%M:%S')} study {study.name}: {_counts(counts)}", flush=True)
            last = counts
        if not any(counts[state] for state in LIVE):
            break
        time.sleep(poll_seconds)
    failed = [c for c in todo if states[c.id]["state"] == "failed"]
    _print_failed(study, failed, states)
    return 1 if failed else 0


def _collect(study: Study) -> None:
    from benchmark.collect import collect, print_warnings

    report = collect(study.dir)
    print(f"study {study.name}: collected {report.measurements} measurements of {report.cells} cells")
    print_warnings(report)


def launch_command(args: argparse.Namespace) -> int:
    """Launch the pending cells: done, queued and running cells are left alone."""
    return _submit(plan(args.overrides), lambda state: state == "pending", args.wait, own_launchers=False)


def resume_command(args: argparse.Namespace) -> int:
    """Launch the failed and the pending cells again (training resumes from their checkpoints),
    failed ones with their own launcher unless the command line chooses one."""
    return _submit(plan(args.overrides), lambda state: state in ("pending", "failed"), args.wait,
                   own_launchers=not _chooses_launcher(args.overrides))


def status_command(args: argparse.Namespace) -> int:
    study = plan(args.overrides)
    if args.watch is not None and args.format == "text":
        from benchmark.watch import watch

        width = shutil.get_terminal_size().columns if sys.stdout.isatty() else None
        return watch(study, args.watch, sys.stdout, time.time, time.sleep, width)
    while True:
        states = cell_states(study)
        present = cells.cells_with_directory(study.dir)
        report = {**summary(study, states), "disk_bytes_used": sum(disk_used(c.directory(study.dir))
                                                                   for c in study.cells if c.id in present)}
        if args.watch is not None and sys.stdout.isatty():
            print("\033[2J\033[H", end="")  # clear the screen: each refresh replaces the last
        if args.format == "json":
            print(json.dumps(report, indent=2))
        else:
            _print_status(study, states, report)
        if args.watch is None or not any(report["by_state"].get(state) for state in LIVE):
            return 0
        sys.stdout.flush()
        time.sleep(args.watch)


def cancel_command(args: argparse.Namespace) -> int:
    """Cancel the queued and running cells chosen by the overrides, through the launcher each
    was launched with."""
    study = plan(args.overrides)
    states = cell_states(study)
    by_kind: dict[str, list[Cell]] = {}
    for cell in study.cells:
        if states[cell.id]["state"] in LIVE:
            by_kind.setdefault(kind_of(states[cell.id]), []).append(cell)
    if not by_kind:
        print(f"study {study.name}: nothing to cancel (no queued or running cell)")
        return 0
    return max(launcher_class(kind).cancel(study, chosen) for kind, chosen in by_kind.items())
