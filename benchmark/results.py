"""The result row: one per cell x condition, defined once here, versioned, written atomically.

A row carries what was measured (counts, not only a ratio) and what produced it (benchopt-style
provenance), so a table can be trusted and re-derived without the cell directory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from benchmark.atomic import write_atomic
from benchmark.errors import RFTBenchError

SCHEMA_VERSION = 1

_TIME = pa.timestamp("us", tz="UTC")
ROW_SCHEMA = pa.schema(
    [
        ("schema_version", pa.int16()),
        ("study", pa.string()),
        ("cell_id", pa.string()),
        ("dataset", pa.string()),
        ("model", pa.string()),
        ("loss", pa.string()),
        ("protocol", pa.string()),
        ("seed", pa.int64()),
        ("condition", pa.string()),           # eval option: clean, linf, l2, l1, common, ...
        ("norm", pa.string()),                # Linf / L2 / L1 for attacks, else null
        ("epsilon", pa.float64()),            # attack budget, else null
        ("eps_grid", pa.list_(pa.float64())),  # the budgets of an expected-robustness condition
        ("attack", pa.string()),              # e.g. autoattack-standard, corruptions-severity3
        ("attack_version", pa.string()),      # version of the package that ran the attack
        ("n_examples", pa.int64()),
        ("n_correct", pa.int64()),
        ("accuracy", pa.float64()),           # n_correct / n_examples
        ("attempt", pa.int32()),              # how many times a worker started this cell
        ("requeues", pa.int32()),             # how many times the scheduler requeued it
        ("source", pa.string()),              # run | imported
        ("source_file", pa.string()),         # for imported rows: the file they came from
        ("git_commit", pa.string()),
        ("git_dirty", pa.bool_()),
        ("python_version", pa.string()),
        ("torch_version", pa.string()),
        ("timm_version", pa.string()),
        ("autoattack_version", pa.string()),
        ("device", pa.string()),
        ("host", pa.string()),
        ("slurm_job_id", pa.string()),
        ("started_at", _TIME),
        ("finished_at", _TIME),
        ("train_seconds", pa.float64()),
        ("eval_seconds", pa.float64()),       # this condition's evaluation time
    ],
    metadata={"rftbench_schema_version": str(SCHEMA_VERSION)},
)
COLUMNS = tuple(ROW_SCHEMA.names)


class CorruptResultError(RFTBenchError):
    """A result file that is unreadable, truncated or not of our schema."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def rows_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows as a table of the row schema; a missing or unknown column is an error."""
    for row in rows:
        missing, unknown = set(COLUMNS) - set(row), set(row) - set(COLUMNS)
        if missing or unknown:
            raise ValueError(f"row columns differ from the schema: missing {sorted(missing)}, unknown {sorted(unknown)}")
    return pa.Table.from_pylist([{**row, "schema_version": SCHEMA_VERSION} for row in rows], schema=ROW_SCHEMA)


def write_table(path: Path, table: pa.Table) -> None:
    """Write a Parquet file atomically: readers see the old file or the whole new one."""
    write_atomic(path, lambda tmp: pq.write_table(table, tmp))


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    write_table(path, rows_table(rows))


def read_rows(path: Path) -> pa.Table:
    """A row file, checked: readable, whole, and of this schema version."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise CorruptResultError(path, f"unreadable Parquet ({err})") from None
    missing = set(COLUMNS) - set(table.column_names)
    if missing:
        raise CorruptResultError(path, f"not a result file of this schema: missing {sorted(missing)}")
    versions = set(table.column("schema_version").to_pylist())
    if versions != {SCHEMA_VERSION}:
        raise CorruptResultError(path, f"schema_version {sorted(versions)}, expected {SCHEMA_VERSION}")
    return table.select(list(COLUMNS)).cast(ROW_SCHEMA)
