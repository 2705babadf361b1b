"""The result tables: the row schema (one per cell x condition) and the study's collected tables,
defined once here, versioned, written atomically, and loaded into pandas without torch.

A row carries what was measured (counts, not only a ratio) and what produced it (benchopt-style
provenance), so a table can be trusted and re-derived without the cell directory. Layout and
every column are documented in results/README.md.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from benchmark.atomic import write_atomic
from benchmark.cell import AXES
from benchmark.errors import RFTBenchError, unknown_choice
from benchmark.paths import study_dir

if TYPE_CHECKING:  # pandas is imported by to_pandas() when a table is loaded: commands that only
    import pandas as pd  # read a few Parquet columns (e.g. plan's cost estimate) skip its import

SCHEMA_VERSION = 1

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
    present = set(table.column_names)
    missing = [name for name in schema.names if name not in present]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise CorruptResultError(path, f"not a result file of this schema: {len(missing)} columns missing ({shown})")
    versions = set(table.column("schema_version").to_pylist())
    if versions - {SCHEMA_VERSION}:
        raise CorruptResultError(path, f"schema_version {sorted(versions, key=str)}, expected {SCHEMA_VERSION}")
    if table.schema.equals(schema, check_metadata=False):
        return table
    try:
        return table.select(schema.names).cast(schema)
    except pa.ArrowException as err:
        raise CorruptResultError(path, f"columns of the wrong type ({err})") from None


def read_rows(path: Path) -> pa.Table:
    """A row file (or the collected measurements), checked against the row schema."""
    return read_table(path, ROW_SCHEMA)


def condition_columns(spec: dict[str, Any]) -> dict[str, Any]:
    """The norm, epsilon, eps_grid and attack columns of a condition, from its `eval` config node.
    An expected-robustness condition runs its AutoAttack at every budget of its grid; its
    epsilon is the grid's end."""
    kind = spec["kind"]
    if kind in ("autoattack", "expected"):
        budget = "".join(f",{key}={spec[key]}" for key in ("n_iter", "n_restarts") if key in spec)
        attacks = f"({','.join(spec['attacks'])}{budget})" if spec.get("attacks") else ""
        attack = f"{'expected-' if kind == 'expected' else ''}autoattack-{spec['version']}{attacks}"
    elif kind == "corruptions":
        attack = f"corruptions-severity{spec['severity']}"
    else:
        attack = None if kind == "clean" else kind
    grid = eps_grid(spec) if kind == "expected" else None
    return {"norm": spec.get("norm"), "epsilon": spec.get("eps"), "eps_grid": grid, "attack": attack}


def eps_grid(spec: dict[str, Any]) -> list[float]:
    """The budgets of an expected-robustness condition: 0 to `eps` in steps of `grid_step`
    (e.g. 4/255 in steps of 1/255: 0, 1/255, ..., 4/255). `eps` must be a whole number of steps;
    the points are k * eps / M, so the last is `eps` exactly."""
    eps, step = float(spec["eps"]), float(spec["grid_step"])
    intervals = round(eps / step) if step > 0 else 0
    if eps <= 0 or intervals < 1 or abs(intervals * step - eps) > 1e-9 * eps:
        raise RFTBenchError(f"expected robustness needs eps > 0 that is a whole number of grid steps: got "
                            f"eps={eps!r}, grid_step={step!r} (e.g. eps=4/255, grid_step=1/255)")
    return [k * eps / intervals for k in range(intervals + 1)]


def study_from(overrides: Sequence[str], default: str = "demo") -> tuple[str, Path | None]:
    """The study named by `study=NAME` (else `default`) and the results root `paths.results=DIR`
    (None: the default root). Commands over existing results take only these two keys: a
    collected study needs no config (an imported one has none in conf/study)."""
    values: dict[str, str | None] = {"study": default, "paths.results": None}
    for word in overrides:
        key, sep, value = word.partition("=")
        if not sep:
            raise RFTBenchError(f"malformed argument {word!r}: expected key=value, e.g. study={default}")
        if key not in values:
            raise unknown_choice("key", key, values)
        values[key] = value
    results_root = values["paths.results"]
    return str(values["study"]), Path(results_root) if results_root else None


def existing_study_dir(study: str, results_root: Path | None = None) -> Path:
    """`study`'s directory; an error listing the studies there if it does not exist."""
    directory = study_dir(study, results_root)
    if directory.is_dir():
        return directory
    parent = directory.parent
    studies = [p.name for p in parent.iterdir() if p.is_dir()] if parent.is_dir() else []
    if not studies:
        raise RFTBenchError(f"no study {study!r}: {parent} holds no study directories")
    raise RFTBenchError(f"{unknown_choice('study', study, studies)} (the study directories in {parent})")


def load(study: str, results_root: Path | None = None) -> pd.DataFrame:
    """The study's long table (one row per cell x condition) from `<results root>/<study>/`.

    `results_root` defaults to `$RFTBENCH_RESULTS`, else `results/`. A study whose cells were
    never collected is collected first.
    """
    return _collected(study, results_root, MEASUREMENTS_FILE, ROW_SCHEMA).to_pandas()


def load_cells(study: str, results_root: Path | None = None) -> pd.DataFrame:
    """The study's cell table: config columns, state, attempts, timings, truncation flag."""
    return _collected(study, results_root, CELLS_FILE, CELL_SCHEMA).to_pandas()


def _collected(study: str, results_root: Path | None, name: str, schema: pa.Schema) -> pa.Table:
    from benchmark.collect import ensure_collected  # collect builds on this module

    directory = existing_study_dir(study, results_root)
    ensure_collected(directory)
    return read_table(directory / name, schema)


def wide(df: pd.DataFrame) -> pd.DataFrame:
    """One row per cell (dataset, model, loss, protocol, cell_id), one accuracy column per
    condition, in the order the conditions first appear (the evaluation order)."""
    index = [*AXES, "cell_id"]
    conditions = list(df["condition"].unique())
    table = df.pivot(index=index, columns="condition", values="accuracy")
    return table.reindex(columns=conditions).reset_index().rename_axis(columns=None)
