"""Per-cell hyper-parameter tables: the values a study trains each cell with, overriding its
protocol's (the published study's tuned table, or the output of `rftbench tune`).

Format (CSV or Parquet, one row per cell), columns in the project's option names:
  dataset, model, loss, protocol   the cell's options (required, each a known option)
  lr_backbone, lr_head             learning rates (> 0)
  weight_decay_backbone, weight_decay_head   weight decays (>= 0)
  cosine                           cosine annealing: true/false in any case
The backbone values may be empty (linear probing trains no backbone); any other column is kept
for information and ignored. A cell has at most one row. The values land in the cell's
`protocol.optimizer` and `protocol.cosine`, so they are part of its resolved config and id.

A study names its table with `hparams:` (null when it has none; `study.hparams=PATH` on the
command line), and may give `hparams_fallback:` per protocol option: the values of the cells
the table lacks.
"""
from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmark.cell import AXES
from benchmark.errors import RFTBenchError, unknown_choice
from benchmark.paths import PROJECT_DIR

OPTIMIZER_KEYS = ("lr_backbone", "lr_head", "weight_decay_backbone", "weight_decay_head")
REQUIRED = (*AXES, *OPTIMIZER_KEYS, "cosine")
OPTIONAL = ("lr_backbone", "weight_decay_backbone")  # may be empty: linear probing
Key = tuple[str, str, str, str]  # (dataset, model, loss, protocol)


@dataclass(frozen=True)
class Table:
    """A checked table: the protocol patch of each cell it names."""

    path: Path
    patches: dict[Key, dict[str, Any]]


def resolve_path(path: str) -> Path:
    """A table path as written in a study or on the command line: relative paths are tried
    from the working directory, then from the project (where shipped tables live)."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    return PROJECT_DIR / candidate


def read(path: str, options: Callable[[str], list[str]]) -> Table:
    """The table at `path`, checked against the groups' `options` before anything runs: an
    unknown option name, a missing column, a value that is not a number or out of range, or two
    rows for one cell is an RFTBenchError naming the file, the line and the value."""
    resolved = resolve_path(path)
    if not resolved.is_file():
        raise RFTBenchError(f"hyper-parameter table {path!r} does not exist (study.hparams; looked at {resolved})")
    rows = _rows(resolved)
    valid = {axis: set(options(axis)) for axis in AXES}
    patches: dict[Key, dict[str, Any]] = {}
    lines: dict[Key, int] = {}
    for line, row in rows:
        where = f"{resolved}, line {line}"
        key = tuple(_name(row, axis, valid[axis], where) for axis in AXES)
        if key in patches:
            raise RFTBenchError(f"{where}: a second row for cell {'/'.join(key)} (the first is line {lines[key]})")
        patches[key], lines[key] = _patch(row, where), line
    return Table(resolved, patches)


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) of a CSV (the header is line 1) or Parquet file (row i is line i + 2)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # only for Parquet tables

        rows = pq.read_table(path).to_pylist()
        columns = list(rows[0]) if rows else pq.read_schema(path).names
    else:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows, columns = list(reader), reader.fieldnames or []
    missing = [column for column in REQUIRED if column not in columns]
    if missing:
        raise RFTBenchError(f"hyper-parameter table {path}: missing columns {', '.join(missing)} "
                            f"(required: {', '.join(REQUIRED)})")
    return ((i + 2, row) for i, row in enumerate(rows))


def _name(row: dict[str, Any], axis: str, valid: set[str], where: str) -> str:
    name = str(row[axis] or "")
    if name not in valid:
        raise RFTBenchError(f"{where}: {unknown_choice(f'{axis} in column {axis!r}', name, valid)}")
    return name


def _patch(row: dict[str, Any], where: str) -> dict[str, Any]:
    optimizer = {}
    for key in OPTIMIZER_KEYS:
        value = _number(row[key], key, where, optional=key in OPTIONAL)
        if value is not None:
            optimizer[key] = value
    return {"optimizer": optimizer, "cosine": _boolean(row["cosine"], where)}


def _number(value: Any, column: str, where: str, optional: bool) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if optional:
            return None
        raise RFTBenchError(f"{where}: column {column!r} is empty")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RFTBenchError(f"{where}: column {column!r} holds {value!r}, not a number") from None
    low_ok = number > 0 if column.startswith("lr_") else number >= 0
    if not math.isfinite(number) or not low_ok:
        rule = "a learning rate must be > 0" if column.startswith("lr_") else "a weight decay must be >= 0"
        raise RFTBenchError(f"{where}: column {column!r} holds {value!r}: {rule}")
    return number


def _boolean(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false"):
        raise RFTBenchError(f"{where}: column 'cosine' holds {value!r}; expected true or false")
    return text == "true"
