"""`rftbench tune`: per-cell hyper-parameter search, and the table a study then trains with.

    rftbench tune study=demo protocol=fft5 tune=smoke [--export PATH]   search, then write the table
    rftbench tune study=demo --status                                    trials per cell, best value

For each selected cell, `tune.workers` workers (`benchmark.trial`) pull trials of the cell's
Optuna study from the shared storage (`tune.storage`, by default the journal file
`<study dir>/tune/optuna.journal`) until `tune.n_trials` trials finished. The study's launcher
starts them (`Launcher.submit_workers`: `launcher=local` processes here, one cell at a time;
`launcher=slurm` one job array for all cells) and `tune` waits for them, asking the launcher
meanwhile which workers are gone: their running trials are failed and enqueued again, and workers
are started again while budget is left. Interrupted, running it again resumes each search.

Study directory: `tune/optuna.journal` the default storage, `tune/hparams.csv` the best values
of every tuned cell (columns `TABLE_COLUMNS`, one row per cell, written whole after each run),
`tune/<cell id>/` a cell's worker spec and running trials' checkpoints; worker logs are where
the launcher puts them (`logs/tune-<cell id>-<i>.log` locally). Nothing is
written into the study's cells or result tables. This module imports no torch.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from benchmark import tune_space
from benchmark.atomic import write_json_atomic, write_text_atomic
from benchmark.cell import Cell
from benchmark.errors import RFTBenchError
from benchmark.study import Study, plan
from benchmark.tune_space import TABLE_COLUMNS, TuneConfig
from launchers import LAUNCHERS, launcher_class, launcher_for

KEY_COLUMNS = ("dataset", "model", "loss", "protocol")
SPEC_FILE = "worker.json"
# How often `tune` asks the launcher whether its workers are still there: sacct is not free.
POLL_SECONDS = {"local": 5.0}
POLL_SECONDS_SCHEDULER = 60.0


@dataclass(frozen=True)
class Search:
    """One cell's search: the cell and its Optuna study (None when it never started)."""

    cell: Cell
    study: optuna.Study | None


def prepare(overrides: list[str], *, create: bool) -> tuple[Study, TuneConfig, str, list[Search]]:
    """Plan the selection and open its searches; every input is checked here, before any job."""
    study = plan(overrides)
    if not study.cells:
        raise RFTBenchError(f"the selection {' '.join(overrides)!r} has no cell to tune")
    tune = TuneConfig.from_config(study.config["tune"])
    url = tune_space.storage_url(tune, study.dir)
    storage = tune_space.open_storage(url)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    searches = [Search(cell, _open_search(storage, tune, cell, create)) for cell in study.cells]
    return study, tune, url, searches


def _open_search(storage: optuna.storages.BaseStorage, tune: TuneConfig, cell: Cell, create: bool) -> optuna.Study | None:
    name = tune_space.study_name(tune, cell)
    if not create:
        try:
            return optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            return None
    search = tune_space.load_or_create(storage, name, tune)
    if "cell" not in search.user_attrs:  # what optuna-dashboard shows beside the study's name
        search.set_user_attr("cell", {"cell_id": cell.id, **cell.axes, "seed": cell.seed})
        search.set_user_attr("space", tune_space.cell_space(tune, cell.config["protocol"]))
    return search


def tune_command(args: argparse.Namespace) -> int:
    study, tune, url, searches = prepare(args.overrides, create=not args.status)
    if args.status:
        return _print_status(study, searches, args.format)
    print(f"tune {tune.name}: {len(searches)} cells of study {study.name}, {tune.n_trials} trials each, "
          f"{tune.workers} workers per cell; storage {url}")
    incomplete = [search.cell.slug for search in _run_searches(study, tune, url, searches)]
    table = write_tables(study, searches, Path(args.export) if args.export else None)
    print(f"best values of {table} cells in {study.dir / tune_space.TUNE_DIR / tune_space.TABLE_FILE}"
          + (f" and {args.export}" if args.export else ""))
    if incomplete:
        print(f"{len(incomplete)} cells did not finish their budget ({', '.join(incomplete[:5])}); "
              "run the same command again to resume", file=sys.stderr)
    return 1 if incomplete else 0


# --- local workers ----------------------------------------------------------------------------

def worker_spec(study: Study, tune: TuneConfig, url: str, cell: Cell) -> Path:
    """Write what a worker of `cell` needs (the cell's config, the tune option, the runtime and the
    storage) into the cell's tune directory; returns its path."""
    work_dir = (study.dir / tune_space.TUNE_DIR / cell.id).resolve()
    root = {"paths": {k: str(Path(v).resolve()) for k, v in study.config["paths"].items()},
            "runtime": study.config["runtime"]}
    spec = {"cell_id": cell.id, "cell": cell.config, "tune": study.config["tune"], "root": root,
            "storage": url if tune_space.is_database(url) else str(Path(url).resolve()),
            "study_name": tune_space.study_name(tune, cell), "work_dir": str(work_dir)}
    write_json_atomic(work_dir / SPEC_FILE, spec)
    return work_dir / SPEC_FILE


@dataclass(frozen=True)
class TuneWorker:
    """What a launcher runs in each worker job (picklable; torch is imported in the job only)."""

    spec: str
    launcher_kind: str
    threads: int | None

    def __call__(self) -> None:
        from benchmark.trial import run_worker

        run_worker(self.spec, self.launcher_kind, self.threads)


def workers_gone(records: dict[int, dict[str, Any]]) -> set[int]:
    """The keys of the worker `records` (tune_space.worker_identity) whose job has ended, as
    their own launchers say."""
    by_kind: dict[str, dict[int, dict[str, Any]]] = {}
    for key, record in records.items():
        if record.get("launcher_kind") in LAUNCHERS:
            by_kind.setdefault(record["launcher_kind"], {})[key] = record
    gone = set()
    for kind, group in by_kind.items():
        states = launcher_class(kind).job_states(group) or {}  # None: no answer, assume alive
        gone |= {key for key, state in states.items() if state.state == "ended"}
    return gone


def _run_searches(study: Study, tune: TuneConfig, url: str, searches: list[Search]) -> list[Search]:
    """Run the searches' workers through the study's launcher until each budget is met; a local
    launcher takes one cell at a time (its workers share this machine), others take all. When
    every worker has ended with budget left (a worker died, its trial was enqueued again), new
    workers are started, up to MAX_RETRIES times. Returns the searches left incomplete."""
    launcher = launcher_for(study.config["launcher"])
    local = launcher.kind == "local"
    threads = max(1, (os.cpu_count() or 1) // tune.workers) if local else None
    groups = [[search] for search in searches] if local else [searches]
    for group in groups:
        for _ in range(tune_space.MAX_RETRIES + 1):
            todo = [search for search in group if _remaining(search, tune)]
            if not todo:
                break
            records: dict[int, dict[str, Any]] = {}
            for search in todo:
                worker = TuneWorker(str(worker_spec(study, tune, url, search.cell)), launcher.kind, threads)
                for record in launcher.submit_workers(study, worker, tune.workers, f"tune-{search.cell.id}"):
                    records[len(records)] = dict(record)
            print(f"  started {len(records)} workers ({launcher.name}) for {len(todo)} cells")
            _wait(records, todo, POLL_SECONDS.get(launcher.kind, POLL_SECONDS_SCHEDULER))
        for search in group:
            count = tune_space.counts(search.study)
            print(f"  {search.cell.slug}: {_describe(count)}, best {_best(search.study)}")
    return [search for search in searches if _remaining(search, tune)]


def _remaining(search: Search, tune: TuneConfig) -> int:
    """Trials the search still needs (after failing the trials of workers that are gone)."""
    reaped = tune_space.reap(search.study, workers_gone)
    if reaped:
        print(f"  {search.cell.slug}: {reaped} trials of workers that are gone failed and enqueued again")
    return max(0, tune.n_trials - tune_space.counts(search.study)["finished"])


def _wait(records: dict[int, dict[str, Any]], searches: list[Search], poll_seconds: float) -> None:
    """Until every worker of `records` has ended, failing the trials of dead ones meanwhile (so
    that the live workers take their retries)."""
    while len(workers_gone(records)) < len(records):
        time.sleep(poll_seconds)
        for search in searches:
            tune_space.reap(search.study, workers_gone)


# --- status and tables ------------------------------------------------------------------------

def _describe(count: dict[str, int]) -> str:
    return (f"{count['COMPLETE']} complete, {count['PRUNED']} pruned, {count['FAIL']} failed, "
            f"{count['RUNNING']} running, {count['WAITING']} waiting")


def _best(study: optuna.Study | None) -> float | None:
    row = None if study is None else study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return min(t.value for t in row) if row else None


def status(searches: list[Search]) -> list[dict[str, Any]]:
    """Per cell: its axes, trials by state and the best value so far (None before any)."""
    rows = []
    for search in searches:
        count = tune_space.counts(search.study) if search.study else {}
        rows.append({"cell_id": search.cell.id, **search.cell.axes, "seed": search.cell.seed,
                     **{state.lower(): count.get(state, 0) for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")},
                     "best_value": _best(search.study)})
    return rows


def _print_status(study: Study, searches: list[Search], fmt: str) -> int:
    rows = status(searches)
    if fmt == "json":
        print(json.dumps({"study": study.name, "cells": rows}, indent=2))
        return 0
    print(f"study {study.name}: {len(rows)} cells, {sum(s.study is not None for s in searches)} with a search")
    for search, row in zip(searches, rows):
        best = "-" if row["best_value"] is None else f"{row['best_value']:.4f}"
        print(f"  {search.cell.slug}: {row['complete']} complete, {row['pruned']} pruned, {row['fail']} failed, "
              f"{row['running']} running, best {best}")
    return 0


def table_rows(searches: list[Search]) -> list[dict[str, Any]]:
    """The hyper-parameter table rows of the searches that have a complete trial. A table has
    one row per (dataset, model, loss, protocol): of several seeds' searches the best one wins."""
    best: dict[tuple, dict[str, Any]] = {}
    for search in searches:
        row = tune_space.table_row(search.cell, search.study) if search.study is not None else None
        key = tuple(row[k] for k in KEY_COLUMNS) if row else None
        if row and (key not in best or row["best_value"] < best[key]["best_value"]):
            best[key] = row
    return list(best.values())


def write_tables(study: Study, searches: list[Search], export: Path | None) -> int:
    """Write the study's table (its earlier rows of other cells kept) and, if asked, `export`
    (the selected cells only); returns the number of selected cells with a row."""
    rows = table_rows(searches)
    path = study.dir / tune_space.TUNE_DIR / tune_space.TABLE_FILE
    fresh = {tuple(row[k] for k in KEY_COLUMNS) for row in rows}
    kept = [row for row in read_table(path) if tuple(row[k] for k in KEY_COLUMNS) not in fresh]
    write_text_atomic(path, _csv(kept + rows))
    if export is not None:
        write_text_atomic(export, _csv(rows))
    return len(rows)


def read_table(path: Path) -> list[dict[str, str]]:
    """A table written by `write_tables`, as strings ([] when there is none)."""
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return []


def _csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=TABLE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _cell_text(v) for k, v in row.items()} for row in rows)
    return out.getvalue()


def _cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)
