"""Learning curves as data: a cell's per-epoch history (`<cell>/history.parquet`) and the study's
collected `history` table (`<study>/history.parquet`). Torch-free.

The worker rewrites the cell's file whole after every epoch from the history its checkpoint
holds (`train.TrainResult.history`), so a requeued or resumed cell has each epoch once: the
checkpoint and the file never disagree on which epochs are done.

Validation columns: `val_accuracy` is the clean accuracy on the whole val split (`val_size`
images); `val_robust_loss` and `val_robust_accuracy` are the robust validation loss of
`benchmark.validation` (the hyper-parameter search's objective, one definition) and the accuracy
on the same attacked images, measured on its fixed, stratified subset of `val_robust_size`
images (`runtime.history_validation_size`, small: the attack costs `val_seconds` per epoch,
outside `seconds`, the epoch's training and clean validation time).

A cell "never left chance" when its clean validation accuracy stayed, at every epoch, within
three standard errors of a guessing classifier's: at most p + 3 sqrt(p (1 - p) / val_size),
p = 1 / num_classes (`never_left_chance`).
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from benchmark.atomic import file_signature, write_json_atomic
from benchmark.cell import CELLS_DIR
from benchmark.results import write_table

if TYPE_CHECKING:  # the analysis passes pandas tables; nothing here imports pandas
    import pandas as pd

HISTORY_FILE = "history.parquet"  # a cell's, and the study's collected table
MANIFEST_FILE = "history-manifest.json"
CHANCE_STANDARD_ERRORS = 3.0

HISTORY_SCHEMA = pa.schema([
    ("study", pa.string()),
    ("cell_id", pa.string()),
    ("epoch", pa.int32()),                 # epochs completed (1 = after the first)
    ("step", pa.int64()),                  # optimizer updates so far
    ("samples_seen", pa.int64()),          # training examples so far, every rank counted
    ("train_loss", pa.float64()),          # the epoch's mean robust training loss
    ("train_accuracy", pa.float64()),      # accuracy on the epoch's adversarial training examples
    ("val_accuracy", pa.float64()),        # clean, whole val split
    ("val_size", pa.int64()),
    ("val_robust_loss", pa.float64()),     # benchmark.validation's objective; null when not measured
    ("val_robust_accuracy", pa.float64()),
    ("val_robust_size", pa.int64()),
    ("val_seconds", pa.float64()),         # the robust validation's cost
    ("eps", pa.float64()),                 # the training attack's eps this epoch
    ("lr_backbone", pa.float64()),         # null when the backbone is frozen
    ("lr_head", pa.float64()),
    ("seconds", pa.float64()),             # training and clean validation of the epoch
])


def history_table(study: str, cell_id: str, records: list[dict[str, Any]]) -> pa.Table:
    """The cell's history table from the trainer's records (a column a record lacks is null)."""
    rows = [{**dict.fromkeys(HISTORY_SCHEMA.names), **record, "study": study, "cell_id": cell_id}
            for record in records]
    return pa.Table.from_pylist(rows, schema=HISTORY_SCHEMA)


def write_history(cell_dir: Path, study: str, cell_id: str, records: list[dict[str, Any]]) -> None:
    """Replace the cell's history file with `records`, whole (see the module docstring)."""
    write_table(cell_dir / HISTORY_FILE, history_table(study, cell_id, records))


def read_history(path: Path) -> pa.Table:
    """A cell's or a study's history file, in HISTORY_SCHEMA: the columns it lacks null (a file
    of an older or partial history); an empty table when there is no file."""
    if not path.exists():
        return HISTORY_SCHEMA.empty_table()
    table = pq.read_table(path)
    columns = {field.name: table[field.name] if field.name in table.column_names else pa.nulls(table.num_rows, field.type)
               for field in HISTORY_SCHEMA}
    return pa.table(columns).cast(HISTORY_SCHEMA)


def collect_history(study_dir: Path) -> pa.Table:
    """Bring `<study>/history.parquet` up to date with its cells' history files and return it:
    rewritten (atomically) only when a cell's file appeared, changed or went away. The caller
    holds the study's collect lock."""
    cells_dir = study_dir / CELLS_DIR
    names = sorted(n for n in os.listdir(cells_dir) if not n.startswith(".")) if cells_dir.is_dir() else []
    signatures = {name: file_signature(cells_dir / name / HISTORY_FILE) for name in names}
    signatures = {name: sig for name, sig in signatures.items() if sig is not None}
    target, manifest = study_dir / HISTORY_FILE, study_dir / MANIFEST_FILE
    if target.exists() and manifest.exists() and _read_manifest(manifest) == signatures:
        return read_history(target)
    tables = [_cell_history(cells_dir / name, study_dir.name) for name in signatures]
    table = pa.concat_tables([HISTORY_SCHEMA.empty_table(), *tables]).sort_by([("cell_id", "ascending"),
                                                                               ("epoch", "ascending")])
    write_table(target, table)
    write_json_atomic(manifest, signatures)  # last: an interrupted collect reads the cells again
    return table


def _cell_history(cell_dir: Path, study: str) -> pa.Table:
    """The cell's history, its rows naming this cell and study (as its directory does); an
    unreadable file is reported on stderr and left out."""
    try:
        table = read_history(cell_dir / HISTORY_FILE)
    except (OSError, pa.ArrowException) as err:
        print(f"skipped {cell_dir / HISTORY_FILE}: unreadable ({err})", file=sys.stderr)
        return HISTORY_SCHEMA.empty_table()
    for name, value in (("study", study), ("cell_id", cell_dir.name)):
        table = table.set_column(table.column_names.index(name), name, pa.array([value] * table.num_rows, pa.string()))
    return table


def _read_manifest(path: Path) -> dict[str, list[int]] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def chance_ceiling(num_classes: int, val_size: int) -> float:
    """The highest validation accuracy that still counts as chance (module docstring)."""
    p = 1.0 / num_classes
    return p + CHANCE_STANDARD_ERRORS * math.sqrt(p * (1 - p) / max(val_size, 1))


def never_left_chance(history: pd.DataFrame, num_classes: dict[str, int]) -> list[str]:
    """The ids of the cells of `history` (a history table as pandas) whose clean validation
    accuracy stayed at chance at every epoch (`num_classes`: per cell id; others are not judged)."""
    best = history.groupby("cell_id").agg(accuracy=("val_accuracy", "max"), size=("val_size", "min"))
    return sorted(cell for cell, accuracy, size in zip(best.index, best["accuracy"], best["size"])
                  if cell in num_classes and not (math.isnan(accuracy) or math.isnan(size)) and size > 0
                  and accuracy <= chance_ceiling(num_classes[cell], int(size)))
