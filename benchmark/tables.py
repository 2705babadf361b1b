"""A study's result tables by name, as pandas: the long table (`load`), the cell table
(`load_cells`), the learning curves (`history`), the wide accuracy table (`wide`), and `rftbench
collect`. Torch-free: analysis and notebooks load results on a laptop with this module.

It builds on `collect` (a study never collected is collected first) and `results` (the schema and
checked reading); neither imports it.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from benchmark.arguments import study_and_root
from benchmark.cell import AXES, CELLS_DIR
from benchmark.collect import collect, ensure_collected, print_warnings
from benchmark.errors import RFTBenchError, unknown_choice
from benchmark.history import HISTORY_FILE, read_history
from benchmark.paths import study_dir
from benchmark.results import (
    CELL_SCHEMA,
    CELLS_FILE,
    MEASUREMENTS_FILE,
    ROW_SCHEMA,
    read_table,
)

if TYPE_CHECKING:  # pandas is imported by to_pandas() when a table is loaded
    import pandas as pd


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
    directory = existing_study_dir(study, results_root)
    ensure_collected(directory)
    return read_table(directory / name, schema)


def history(study: str, results_root: Path | None = None) -> pd.DataFrame:
    """The study's learning curves: one row per cell x completed epoch (benchmark.history's
    columns), collected with the other tables; empty for a study without histories (imported)."""
    directory = existing_study_dir(study, results_root)
    if ensure_collected(directory) is None and (directory / CELLS_DIR).is_dir() and not (directory / HISTORY_FILE).exists():
        collect(directory)  # collected before histories were
    return read_history(directory / HISTORY_FILE).to_pandas()


def wide(df: pd.DataFrame) -> pd.DataFrame:
    """One row per cell (dataset, model, loss, protocol, cell_id), one accuracy column per
    condition, in the order the conditions first appear (the evaluation order)."""
    index = [*AXES, "cell_id"]
    conditions = list(df["condition"].unique())
    table = df.pivot(index=index, columns="condition", values="accuracy")
    return table.reindex(columns=conditions).reset_index().rename_axis(columns=None)


def collect_command(args: argparse.Namespace) -> int:
    """`rftbench collect study=NAME [paths.results=DIR]`: 1 when some cell file was skipped."""
    directory = existing_study_dir(*study_and_root(args.overrides))
    report = collect(directory)
    print(
        f"study {directory.name}: {report.cells} cells, {report.measurements} measurements "
        f"({report.read} cells read) in {directory / MEASUREMENTS_FILE} and {CELLS_FILE}"
    )
    print_warnings(report)
    return 1 if report.problems else 0
