"""The result tables: the row schema (one per cell x condition) and the study's collected cell
table, defined once here, versioned, written atomically, and read back checked, without torch.
Loading a study's tables by name is `benchmark.tables`; what a condition's columns hold is
`benchmark.conditions`.

A row carries what was measured (counts, not only a ratio) and what produced it (benchopt-style
provenance), so a table can be trusted and re-derived without the cell directory. Layout and
every column are documented in results/README.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from benchmark.atomic import write_atomic
from benchmark.cell import AXES
from benchmark.errors import RFTBenchError

SCHEMA_VERSION = 2
# The nullable columns each version added: a file of an older version is read with them null
# (results written before an upgrade stay readable and are never rewritten).
ADDED_COLUMNS = {2: ("precision", "world_size")}

MEASUREMENTS_FILE = "measurements.parquet"  # the long table: one row per cell x condition
CELLS_FILE = "cells.parquet"                # one row per cell directory

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
        ("accuracy", pa.float64()),           # n_correct / n_examples; expected robustness: see README
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
        ("precision", pa.string()),          # the training precision that ran: fp32 | fp16 | bf16; imported: null
        ("world_size", pa.int32()),           # processes (ranks) that trained and evaluated the cell; imported: null
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
# A row without these cannot be placed in a table or checked, so its file is rejected.
REQUIRED = ("cell_id", *AXES, "condition", "n_examples", "n_correct", "accuracy")

# cells.parquet columns read from each cell's resolved config: (column, path in config, type).
CONFIG_COLUMNS = (
    ("seed", ("seed",), pa.int64()),
    ("test_size", ("dataset", "test_size"), pa.int64()),
    ("num_classes", ("dataset", "num_classes"), pa.int64()),
    ("model_type", ("model", "type"), pa.string()),
    ("model_size", ("model", "size"), pa.string()),
    ("params_m", ("model", "params_m"), pa.float64()),
    ("pretraining_strategy", ("model", "pretraining", "strategy"), pa.string()),
    ("pretraining_data", ("model", "pretraining", "data"), pa.string()),
    ("epochs", ("protocol", "epochs"), pa.int64()),
    ("train_backbone", ("protocol", "train_backbone"), pa.bool_()),
    ("trades_beta", ("loss", "trades_beta"), pa.float64()),
    ("train_eps", ("loss", "attack", "eps"), pa.float64()),
)
CELL_SCHEMA = pa.schema(
    [
        ("schema_version", pa.int16()),
        ("study", pa.string()),
        ("cell_id", pa.string()),
        ("slug", pa.string()),
        *((axis, pa.string()) for axis in AXES),
        *((name, type_) for name, _, type_ in CONFIG_COLUMNS),
        ("config", pa.string()),          # the whole resolved config as JSON
        ("state", pa.string()),           # pending, submitted, running, failed, done, invalid
        ("reason", pa.string()),          # why the cell failed, or why its rows were rejected
        ("attempts", pa.int32()),
        ("requeues", pa.int32()),
        ("state_time", _TIME),            # when the worker last wrote state.json
        ("conditions", pa.int32()),       # measurements collected from the cell
        ("source", pa.string()),
        ("started_at", _TIME),
        ("finished_at", _TIME),
        ("train_seconds", pa.float64()),
        ("eval_seconds", pa.float64()),   # all conditions together
        ("truncated", pa.bool_()),        # some condition saw fewer examples than test_size
        ("truncation", pa.string()),      # which, e.g. "clean 750/1000; linf 750/1000"
    ],
    metadata={"rftbench_schema_version": str(SCHEMA_VERSION)},
)
# Both tables list cells in this order, a cell's measurements in its evaluation order.
SORT_KEYS = [(column, "ascending") for column in (*AXES, "cell_id")]


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


def read_table(path: Path, schema: pa.Schema) -> pa.Table:
    """A Parquet file of `schema`, checked: readable, whole, and of this schema version."""
    try:
        # Small files: one thread, and no file-system lookup, take a third of pq.read_table's CPU.
        with pa.OSFile(str(path)) as source:
            table = pq.ParquetFile(source).read(use_threads=False)
    except (OSError, pa.ArrowException) as err:
        raise CorruptResultError(path, f"unreadable Parquet ({err})") from None
    versions = set(table.column("schema_version").to_pylist()) if "schema_version" in table.column_names else set()
    if versions - set(range(1, SCHEMA_VERSION + 1)):
        raise CorruptResultError(path, f"schema_version {sorted(versions, key=str)}, expected {SCHEMA_VERSION} or older")
    table = _with_added_columns(table, schema, min(versions, default=SCHEMA_VERSION))
    present = set(table.column_names)
    missing = [name for name in schema.names if name not in present]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise CorruptResultError(path, f"not a result file of this schema: {len(missing)} columns missing ({shown})")
    if table.schema.equals(schema, check_metadata=False):
        return table
    try:
        return table.select(schema.names).cast(schema)
    except pa.ArrowException as err:
        raise CorruptResultError(path, f"columns of the wrong type ({err})") from None


def _with_added_columns(table: pa.Table, schema: pa.Schema, version: int) -> pa.Table:
    """`table` of schema `version` with the columns later versions added, null."""
    for later in range(version + 1, SCHEMA_VERSION + 1):
        for name in ADDED_COLUMNS.get(later, ()):
            if name in schema.names and name not in table.column_names:
                table = table.append_column(schema.field(name), pa.nulls(len(table), schema.field(name).type))
    return table


def read_rows(path: Path) -> pa.Table:
    """A row file (or the collected measurements), checked against the row schema."""
    return read_table(path, ROW_SCHEMA)
