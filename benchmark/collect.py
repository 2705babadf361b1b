"""Merge a study's cell directories into its two tables, incrementally (`rftbench collect`,
whose command is in `benchmark.tables`).

`<study>/measurements.parquet` (one row per cell x condition) and `<study>/cells.parquet` (one
row per cell directory) are rebuilt from `<study>/cells/*/`, and `<study>/history.parquet` (one
row per cell x epoch) from the cells' learning curves (benchmark.history). A cell has one row file, replaced
whole by each attempt, so its latest attempt wins and no measurement can appear twice. A manifest
keeps each cell's file signatures (inode, mtime_ns, size) at the last collect: only cells whose
files changed are read again, and a collect that finds no change writes nothing.

Every table is replaced atomically and collects of one study take turns (an flock), so a reader
or a concurrent collect never sees half a table. A cell file that is unreadable, truncated, of
another schema, cell or study, or incomplete is reported with its path and reason and the cell is
recorded as `invalid`; the other cells are collected as usual. Measurements on fewer examples
than the dataset's test_size are kept and flagged (`truncated`, `truncation` in cells.parquet).
"""
from __future__ import annotations

import fcntl
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import yaml

from benchmark.atomic import file_signature, write_json_atomic
from benchmark.cell import (
    AXES,
    CELLS_DIR,
    CONFIG_FILE,
    ROWS_FILE,
    STATE_FILE,
    read_config,
    read_state,
)
from benchmark.errors import RFTBenchError
from benchmark.history import collect_history
from benchmark.results import (
    CELL_SCHEMA,
    CELLS_FILE,
    CONFIG_COLUMNS,
    MEASUREMENTS_FILE,
    REQUIRED,
    ROW_SCHEMA,
    SCHEMA_VERSION,
    SORT_KEYS,
    CorruptResultError,
    read_rows,
    read_table,
    write_table,
)

MANIFEST_FILE = "collect-manifest.json"
LOCK_FILE = ".collect.lock"
# The files whose change makes a cell be read again.
TRACKED = (CONFIG_FILE, STATE_FILE, ROWS_FILE)
_SHOWN = 10  # cells named in a warning before "..."
# cells.parquet columns that summarise a cell's measurements: name -> (measurement column,
# aggregate). A rows' attempt and requeues override state.json's; the other columns of
# cells.parquet come from the cell's files.
_SUMMARY = {
    "conditions": ("condition", "count"),
    "source": ("source", "min"),
    "started_at": ("started_at", "min"),
    "finished_at": ("finished_at", "max"),
    "train_seconds": ("train_seconds", "max"),
    "eval_seconds": ("eval_seconds", "sum"),
    "attempts_rows": ("attempt", "max"),
    "requeues_rows": ("requeues", "max"),
}
_FILE_SCHEMA = pa.schema([f for f in CELL_SCHEMA if f.name not in {*_SUMMARY, "truncated", "truncation"}])
# The Python values that each of its types takes (checked without Arrow: 20x faster).
_PYTHON_TYPES = {
    pa.string(): str, pa.int16(): int, pa.int32(): int, pa.int64(): int, pa.float64(): int | float,
    pa.bool_(): bool, CELL_SCHEMA.field("state_time").type: datetime,
}

Signature = list[list[int] | None]  # per tracked file: [inode, mtime_ns, size], None when absent


@dataclass(frozen=True)
class Collected:
    """What a collect found: the sizes of the tables and what their user must know."""

    study_dir: Path
    cells: int
    measurements: int
    read: int  # cells read this time (new or changed since the last collect)
    problems: list[str] = field(default_factory=list)  # "<file path>: <reason>", per invalid cell
    truncated: list[str] = field(default_factory=list)  # "<slug> (<cell id>): <truncation>"


@dataclass(frozen=True)
class _Tables:
    signatures: dict[str, Signature]
    measurements: pa.Table
    cells: pa.Table


class _Rejected(Exception):
    """A cell file that cannot be collected; the message starts with the file's name."""


def collect(study_dir: Path) -> Collected:
    """Bring the study's tables up to date with its cell directories; see the module docstring."""
    with study_lock(study_dir):
        signatures = _signatures(study_dir / CELLS_DIR)
        tables = _previous(study_dir)
        changed = [cell for cell, signature in signatures.items() if tables.signatures.get(cell) != signature]
        if changed or tables.signatures.keys() != signatures.keys():
            tables = _updated(study_dir, tables, signatures, changed)
        collect_history(study_dir)
    return _report(study_dir, tables.measurements, tables.cells, read=len(changed))


def ensure_collected(study_dir: Path) -> Collected | None:
    """Collect a study that has cell directories but no collected tables yet; an error if it has
    neither. Returns the collect's report, None when the tables were there."""
    if (study_dir / MEASUREMENTS_FILE).exists() and (study_dir / CELLS_FILE).exists():
        return None
    if not (study_dir / CELLS_DIR).is_dir():
        raise RFTBenchError(
            f"study {study_dir.name!r} has no results: {study_dir} holds no {CELLS_DIR}/ and no {MEASUREMENTS_FILE}"
        )
    return collect(study_dir)


def truncated_cells(cells: pa.Table) -> list[str]:
    """`<slug> (<cell id>): <truncation>` for each cell measured on fewer examples than its test_size."""
    flagged = cells.filter(pc.fill_null(cells["truncated"], False))
    return [f"{row['slug']} ({row['cell_id']}): {row['truncation']}" for row in flagged.to_pylist()]


def truncation_warning(truncated: list[str]) -> str:
    """One warning line naming the truncated cells (the first few, then how many more)."""
    shown = "; ".join(truncated[:_SHOWN]) + (f"; ... ({len(truncated)} in all)" if len(truncated) > _SHOWN else "")
    return f"warning: {len(truncated)} cells were measured on fewer examples than their dataset's test_size: {shown}"


def print_warnings(report: Collected) -> None:
    """The skipped files and the truncated cells of a collect, on stderr."""
    for problem in report.problems:
        print(f"skipped {problem}", file=sys.stderr)
    if report.truncated:
        print(truncation_warning(report.truncated), file=sys.stderr)


@contextmanager
def study_lock(study_dir: Path) -> Iterator[None]:
    """Hold the study's collect lock: concurrent collects (and imports of archives) run one after another."""
    with open(study_dir / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _signatures(cells_dir: Path) -> dict[str, Signature]:
    if not cells_dir.is_dir():
        return {}
    with os.scandir(cells_dir) as entries:
        cells = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    return {cell: [file_signature(cells_dir / cell / name) for name in TRACKED] for cell in cells}


def _previous(study_dir: Path) -> _Tables:
    """The last collect's manifest and tables; empty (all cells are read) if any is missing or damaged."""
    empty = _Tables({}, ROW_SCHEMA.empty_table(), CELL_SCHEMA.empty_table())
    try:
        manifest = json.loads((study_dir / MANIFEST_FILE).read_text())
        tables = _Tables(
            manifest["cells"],
            read_rows(study_dir / MEASUREMENTS_FILE),
            read_table(study_dir / CELLS_FILE, CELL_SCHEMA),
        )
    except (OSError, ValueError, KeyError, TypeError, CorruptResultError):
        return empty
    consistent = manifest.get("schema_version") == SCHEMA_VERSION and set(tables.signatures) == set(
        tables.cells["cell_id"].to_pylist()
    )
    return tables if consistent else empty


def _updated(study_dir: Path, previous: _Tables, signatures: dict[str, Signature], changed: list[str]) -> _Tables:
    """Read the changed cells, merge them with the unchanged ones, write tables then manifest."""
    read = [_read_cell(study_dir / CELLS_DIR / cell, study_dir.name) for cell in changed]
    kept = pa.array(sorted(signatures.keys() - set(changed)), pa.string())
    measurements = _merged(previous.measurements, kept, [rows for rows, _ in read if rows is not None])
    files = pa.Table.from_pylist([record for _, record in read], schema=_FILE_SCHEMA)
    files = _merged(previous.cells.select(_FILE_SCHEMA.names), kept, [files])
    tables = _Tables(signatures, measurements, _summarised(files, measurements))
    write_table(study_dir / MEASUREMENTS_FILE, tables.measurements)
    write_table(study_dir / CELLS_FILE, tables.cells)
    # Last: a collect interrupted before this line reads the same cells again next time.
    write_json_atomic(study_dir / MANIFEST_FILE, {"schema_version": SCHEMA_VERSION, "cells": signatures})
    return tables


def _merged(previous: pa.Table, kept: pa.Array, new: list[pa.Table]) -> pa.Table:
    # sort_by is stable: a cell's rows, which come from one table, keep their evaluation order.
    unchanged = previous.filter(pc.is_in(previous["cell_id"], value_set=kept))
    return pa.concat_tables([unchanged, *new]).sort_by(SORT_KEYS)


def _summarised(files: pa.Table, measurements: pa.Table) -> pa.Table:
    """The cells table: what the cell files say and, computed for all cells at once, the summary
    of each cell's measurements."""
    summary = measurements.group_by("cell_id", use_threads=False).aggregate(list(_SUMMARY.values()))
    names = {f"{column}_{aggregate}": name for name, (column, aggregate) in _SUMMARY.items()}
    summary = summary.rename_columns([names.get(name, name) for name in summary.column_names])
    cells = files.join(summary, "cell_id", join_type="left outer", use_threads=False)
    flags = _truncation(cells, measurements)
    columns = {name: cells[name] for name in cells.column_names} | {
        "conditions": pc.fill_null(cells["conditions"], 0),
        "attempts": pc.coalesce(cells["attempts_rows"], cells["attempts"]),
        "requeues": pc.coalesce(cells["requeues_rows"], cells["requeues"]),
        "truncated": pa.array([flag for flag, _ in flags], pa.bool_()),
        "truncation": pa.array([text for _, text in flags], pa.string()),
    }
    return pa.table({name: columns[name] for name in CELL_SCHEMA.names}).cast(CELL_SCHEMA).sort_by(SORT_KEYS)


def _truncation(cells: pa.Table, measurements: pa.Table) -> list[tuple[bool | None, str | None]]:
    """Per cell (in `cells`' order): whether a measurement saw fewer examples than the dataset's
    test_size, and which ("linf 750/1000; l2 750/1000"); unknown without measurements or test_size."""
    ids, test_sizes = cells["cell_id"].to_pylist(), cells["test_size"].to_pylist()
    sizes = dict(zip(ids, test_sizes))
    short: dict[str, list[str]] = {}
    columns = measurements.select(["cell_id", "condition", "n_examples"]).to_pydict()
    for cell, condition, n in zip(*columns.values()):
        if sizes.get(cell) is not None and n < sizes[cell]:
            short.setdefault(cell, []).append(f"{condition} {n}/{sizes[cell]}")
    return [
        (None, None) if size is None or not count else (cell in short, "; ".join(short.get(cell, [])) or None)
        for cell, size, count in zip(ids, test_sizes, cells["conditions"].to_pylist())
    ]


def _report(study_dir: Path, measurements: pa.Table, cells: pa.Table, read: int) -> Collected:
    invalid = cells.filter(pc.equal(cells["state"], "invalid")).to_pylist()
    return Collected(
        study_dir,
        cells=cells.num_rows,
        measurements=measurements.num_rows,
        read=read,
        problems=[f"{study_dir / CELLS_DIR / cell['cell_id']}/{cell['reason']}" for cell in invalid],
        truncated=truncated_cells(cells),
    )


def _read_cell(cell_dir: Path, study: str) -> tuple[pa.Table | None, dict[str, Any]]:
    """The cell's measurements (None when it has none to collect) and what its files say."""
    record: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "study": study, "cell_id": cell_dir.name}
    rows = None
    try:
        record.update(_state_columns(cell_dir))
        document = _config(cell_dir)
        if document is not None:
            record.update(_config_columns(document))
        if (cell_dir / ROWS_FILE).exists():
            rows = _rows(cell_dir, study, document)
    except _Rejected as rejected:
        rows = None
        record.update(state="invalid", reason=str(rejected))
    return rows, record


def _state_columns(cell_dir: Path) -> dict[str, Any]:
    try:
        state = read_state(cell_dir)
    except (OSError, ValueError) as err:
        raise _Rejected(f"{STATE_FILE}: unreadable ({err})") from None
    when = state.get("time")
    columns = {
        "state": state.get("state"),
        "reason": state.get("reason"),
        "attempts": state.get("attempt"),
        "requeues": state.get("requeues"),
        "state_time": datetime.fromtimestamp(when, UTC) if isinstance(when, int | float) else when,
    }
    return _typed(columns, STATE_FILE)


def _config(cell_dir: Path) -> dict[str, Any] | None:
    """The cell's config.yaml document, checked to be this cell's; None when there is none yet."""
    try:
        document = read_config(cell_dir)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise _Rejected(f"{CONFIG_FILE}: unreadable ({err})") from None
    if not isinstance(document, dict) or not isinstance(document.get("config"), dict):
        raise _Rejected(f"{CONFIG_FILE}: not a cell config document")
    if document.get("cell_id") != cell_dir.name:
        raise _Rejected(f"{CONFIG_FILE}: the config of cell {document.get('cell_id')!r}, not of this cell")
    try:
        document["axes"] = {axis: document["config"][axis]["name"] for axis in AXES}
    except (KeyError, TypeError):
        raise _Rejected(f"{CONFIG_FILE}: no name for every axis {', '.join(AXES)}") from None
    return document


def _config_columns(document: dict[str, Any]) -> dict[str, Any]:
    config = document["config"]
    columns = {"slug": document.get("slug"), **document["axes"]}
    columns |= {name: _get(config, path) for name, path, _ in CONFIG_COLUMNS}
    columns["config"] = json.dumps(config, sort_keys=True, default=str)
    return _typed(columns, CONFIG_FILE)


def _get(config: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        config = config.get(key) if isinstance(config, dict) else None
    return config


def _typed(columns: dict[str, Any], source: str) -> dict[str, Any]:
    """`columns`, checked to fit their cells.parquet types; a value that does not rejects the cell."""
    for name, value in columns.items():
        if value is not None and not isinstance(value, _PYTHON_TYPES[_FILE_SCHEMA.field(name).type]):
            raise _Rejected(f"{source}: {name} {value!r} is not of type {_FILE_SCHEMA.field(name).type}")
    return columns


def _rows(cell_dir: Path, study: str, document: dict[str, Any] | None) -> pa.Table:
    """The cell's rows, checked: whole, complete, this cell's and study's, one per condition."""
    try:
        rows = read_rows(cell_dir / ROWS_FILE)
    except CorruptResultError as err:
        raise _Rejected(f"{ROWS_FILE}: {err.reason}") from None
    if document is None:
        raise _Rejected(f"{ROWS_FILE}: no {CONFIG_FILE} beside it to check the rows against")
    if rows.num_rows == 0:
        raise _Rejected(f"{ROWS_FILE}: no rows")
    nulls = [column for column in REQUIRED if rows[column].null_count]
    if nulls:
        raise _Rejected(f"{ROWS_FILE}: incomplete rows: null {', '.join(nulls)}")
    # Cells of several seeds share their axes: the seed tells them apart (unknown in imported rows).
    own = {"cell_id": cell_dir.name, "study": study, **document["axes"], "seed": document["config"].get("seed")}
    for column, value in own.items():
        other = set(rows[column].to_pylist()) - {value, *((None,) if column == "seed" else ())}
        if other:
            raise _Rejected(f"{ROWS_FILE}: foreign rows: {column} {sorted(other, key=str)}, this cell's is {value!r}")
    conditions = rows["condition"].to_pylist()
    repeated = sorted({c for c in conditions if conditions.count(c) > 1})
    if repeated:
        raise _Rejected(f"{ROWS_FILE}: conditions {repeated} appear more than once")
    return rows
