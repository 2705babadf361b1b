"""`rftbench query`: read-only SQL (DuckDB) over a study's collected tables.

The query sees four tables: `measurements` (the long table, one row per cell x condition),
`cells` (one row per cell), `accuracy` (wide: one row per cell, one accuracy column per
condition, the shape of the study's published table) and `history` (the learning curves, one row
per cell x epoch: benchmark.history). They are in-memory views of the Parquet
files, and DuckDB's file access is switched off (and locked) before the query runs, so a query
can neither change the study nor read or write any other file.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import date, datetime
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa

from benchmark.arguments import study_and_root
from benchmark.cell import AXES
from benchmark.collect import (
    ensure_collected,
    print_warnings,
    truncated_cells,
    truncation_warning,
)
from benchmark.errors import RFTBenchError
from benchmark.history import HISTORY_FILE, read_history
from benchmark.results import (
    CELL_SCHEMA,
    CELLS_FILE,
    MEASUREMENTS_FILE,
    read_rows,
    read_table,
)
from benchmark.tables import existing_study_dir, wide

FORMATS = ("table", "csv", "json", "markdown")


def query(sql: str, study: str = "demo", results_root: Path | None = None) -> pd.DataFrame:
    """The result of `sql` over the study's tables (collected first if they never were)."""
    directory = existing_study_dir(study, results_root)
    ensure_collected(directory)
    return run(sql, *_tables(directory)).to_pandas()


def run(sql: str, measurements: pa.Table, cells: pa.Table, history: pa.Table) -> pa.Table:
    """`sql` over the tables `measurements`, `cells`, `accuracy` and `history`; a SQL error is an
    RFTBenchError carrying DuckDB's message. Whatever the SQL creates is rolled back."""
    connection = _database().cursor()
    try:
        connection.register("measurements", measurements)
        connection.register("cells", cells)
        connection.register("history", history)
        connection.register("accuracy", wide(measurements.select([*AXES, "cell_id", "condition", "accuracy"]).to_pandas()))
        connection.begin()
        return connection.sql(sql).to_arrow_table()
    except duckdb.Error as err:
        raise RFTBenchError(f"query failed: {err}") from None
    finally:
        connection.close()  # rolls the transaction back


@cache
def _database() -> duckdb.DuckDBPyConnection:
    """The process' in-memory DuckDB (creating one takes 20-40 ms), with file access switched off
    for good; each query gets its own connection to it."""
    database = duckdb.connect()
    database.execute("SET enable_external_access = false")
    database.execute("SET lock_configuration = true")
    return database


def render(table: pa.Table, fmt: str) -> str:
    """The result as text: an aligned table, CSV, a JSON array of records, or a Markdown table."""
    if fmt == "json":
        return json.dumps(table.to_pylist(), indent=1, default=_json_value) + "\n"
    frame = table.to_pandas()
    if fmt == "csv":
        return frame.to_csv(index=False)
    if fmt == "markdown":
        return frame.to_markdown(index=False) + "\n"
    if fmt == "table":
        return frame.to_string(index=False) + "\n" if len(frame) else "  ".join(frame.columns) + "\n(no rows)\n"
    raise RFTBenchError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")


def query_command(args: argparse.Namespace) -> int:
    directory = existing_study_dir(*study_and_root(args.overrides))
    collected = ensure_collected(directory)
    if collected:
        print(f"collected study {directory.name} first: {collected.cells} cells, {collected.measurements} measurements",
              file=sys.stderr)
        print_warnings(collected)
    measurements, cells, history = _tables(directory)
    sys.stdout.write(render(run(args.sql, measurements, cells, history), args.format))
    truncated = truncated_cells(cells)
    if truncated and not collected:  # a collect has just said it
        print(truncation_warning(truncated), file=sys.stderr)
    return 0


def _tables(directory: Path) -> tuple[pa.Table, pa.Table, pa.Table]:
    return (read_rows(directory / MEASUREMENTS_FILE), read_table(directory / CELLS_FILE, CELL_SCHEMA),
            read_history(directory / HISTORY_FILE))


def _json_value(value: Any) -> Any:
    """JSON for what DuckDB returns beyond JSON's types: times as ISO 8601, exact sums as numbers."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return str(value)
