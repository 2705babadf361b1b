"""`rftbench import-reference`: the study authors' published per-cell table as an RFTBench study.

Their file has one row per cell: five accuracies (`clean_acc, Linf_acc, L2_acc, L1_acc,
common_acc`) and their names for the axes (`dataset, backbone, loss_function, ft_strategy`).
Their names map to ours through one table, the `study_name` of every conf/{dataset,model,loss,
protocol} option, checked both ways: every name of theirs maps, and no two options map to one.
Each row becomes the cell of `study=paper` with the same axes (same cell id, so the same analysis
applies to imported and own results), written as cell directories like a run's and collected,
into a study of another name (in `paper` itself, launch would take the cells for done).

What the file does not say is not invented: n_examples is the dataset's configured test_size,
n_correct = round(accuracy * n_examples) while `accuracy` keeps the published value exactly (some
published numbers were computed on fewer images, and the file does not say which, so imported
cells are not flagged truncated); seed, attempts, versions and times are null; `source` is
"imported" and `source_file` names the file and its sha256.

Published cells whose numbers come from a flaw of the authors' pipeline, not from the model
(PUBLISHED_FLAWS), are listed in `<study>/flags.csv` (FLAG_COLUMNS; `flag` says why), which the
analysis shows beside the study's results.
"""
from __future__ import annotations

import argparse
import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from benchmark.atomic import write_text_atomic
from benchmark.cell import AXES, ROWS_FILE, Cell, write_config
from benchmark.collect import CELLS_DIR, Collected, collect, print_warnings
from benchmark.conditions import condition_columns
from benchmark.errors import RFTBenchError
from benchmark.paths import study_dir
from benchmark.results import (
    CELL_SCHEMA,
    CELLS_FILE,
    COLUMNS,
    MEASUREMENTS_FILE,
    CorruptResultError,
    read_rows,
    read_table,
    rows_table,
    write_table,
)
from benchmark.study import load_option, options, plan
from benchmark.arguments import study_and_root

PUBLISHED_STUDY = "paper"  # the conf/study whose cells the published table holds
DEFAULT_STUDY = "paper-published"
# Their column per axis, and their accuracy column per condition (an eval option of ours).
AXIS_COLUMNS = {"dataset": "dataset", "model": "backbone", "loss": "loss_function", "protocol": "ft_strategy"}
CONDITIONS = {"clean_acc": "clean", "Linf_acc": "linf", "L2_acc": "l2", "L1_acc": "l1", "common_acc": "common"}
FLAGS_FILE = "flags.csv"  # in the study's directory
FLAG_COLUMNS = (*AXES, "flag")


@dataclass(frozen=True)
class PublishedFlaw:
    """The published cells of `model` under `protocol` (every dataset and loss) are not the
    model's numbers, because of `reason` (a sentence, written into flags.csv)."""

    model: str
    protocol: str
    reason: str


_NOT_LOADED = ("the authors loaded the pretrained {name} weights with strict=False, which silently skipped "
               "them, so linear probing trained a head on a backbone that was not pretrained: the published "
               "numbers sit at chance (a loading failure, not a property of the model)")
# Both the authors' pipeline and the published numbers support each entry: every LP-50 cell of these
# two backbones is at chance, and no other backbone's are. Their FFT cells presumably started from
# the unloaded backbone too, but the numbers do not single them out, so they are not flagged:
# FFT-50 is far above chance (0.4 to 0.65 clean on Caltech-101 and UC Merced), and under FFT-5 a
# backbone the authors loaded through timm (vit_small_patch16_224.dino) is as close to chance.
PUBLISHED_FLAWS = (
    PublishedFlaw("tf_efficientnet_b0.in1k", "lp50", _NOT_LOADED.format(name="EfficientNet-B0")),
    PublishedFlaw("mobilevit_s.cvnets_in1k", "lp50", _NOT_LOADED.format(name="MobileViT-S")),
)


def import_reference(path: Path, study: str = DEFAULT_STUDY, results_root: Path | None = None) -> Collected:
    """Import the published table at `path` as study `study`; idempotent."""
    if study in options("study"):
        # Its cells have the ids of the configured study's own cells: launch would think them done.
        raise RFTBenchError(
            f"study={study} is a configured study (conf/study/{study}.yaml): import into another name, "
            f"e.g. study={DEFAULT_STUDY}"
        )
    table = read_published(path)
    cells = published_cells(table)
    source_file = f"{path.name} sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}"
    directory = study_dir(study, results_root)
    _check_target(directory, {cell.id for cell in cells}, source_file)
    for cell, (_, row) in zip(cells, table.iterrows()):
        cell_dir = cell.directory(directory)
        write_config(cell, cell_dir, study)
        _write_if_changed(cell_dir / ROWS_FILE, rows_table(published_rows(cell, row, study, source_file)))
    flags = published_flags(cells).to_csv(index=False)
    if not (directory / FLAGS_FILE).is_file() or (directory / FLAGS_FILE).read_text() != flags:
        write_text_atomic(directory / FLAGS_FILE, flags)
    return collect(directory)


def read_published(path: Path) -> pd.DataFrame:
    """The published table; its accuracies parse to the floats nearest the written decimals."""
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as err:
        raise RFTBenchError(f"cannot read the published table {path}: {err}") from None
    missing = [c for c in (*AXIS_COLUMNS.values(), *CONDITIONS) if c not in table.columns]
    if missing or table.empty:
        raise RFTBenchError(f"{path} is not the published per-cell table: {f'no columns {missing}' if missing else 'no rows'}")
    accuracies = table[list(CONDITIONS)].apply(pd.to_numeric, errors="coerce")
    bad = table.index[~((accuracies >= 0) & (accuracies <= 1)).all(axis=1)]
    if len(bad):
        raise RFTBenchError(f"{path}: accuracies missing or outside [0, 1] in rows {list(bad[:10])}")
    return table.assign(**accuracies)


def name_mapping(axis: str, study_names: Mapping[str, str | None]) -> dict[str, str]:
    """Their name -> our option, from each option's `study_name` (None: not in their study).
    Two options claiming one name of theirs is an error naming both."""
    mapping: dict[str, str] = {}
    clashes = []
    for option, theirs in sorted(study_names.items()):
        if theirs is None:
            continue
        if theirs in mapping:
            clashes.append(f"{theirs!r} (conf/{axis}/{mapping[theirs]}.yaml and conf/{axis}/{option}.yaml)")
        mapping.setdefault(theirs, option)
    if clashes:
        raise RFTBenchError(f"several {axis} options have the same study_name: {'; '.join(clashes)}")
    return mapping


def published_cells(table: pd.DataFrame) -> list[Cell]:
    """The `study=paper` cell of each row; every name of theirs must map to an option of ours."""
    ours = {}
    unmapped = []
    for axis, column in AXIS_COLUMNS.items():
        mapping = name_mapping(axis, {o: load_option(axis, o).get("study_name") for o in options(axis)})
        ours[axis] = table[column].map(mapping)
        names = sorted(set(table.loc[ours[axis].isna(), column]))
        if names:
            unmapped.append(f"{column} {', '.join(map(repr, names))} (no conf/{axis} option has it as study_name)")
    if unmapped:
        raise RFTBenchError(f"the published table has names without an option of ours: {'; '.join(unmapped)}")
    by_axes = {tuple(cell.axes.values()): cell for cell in plan([f"study={PUBLISHED_STUDY}"]).cells}
    keys = list(zip(*(ours[axis] for axis in AXES)))
    outside = sorted({key for key in keys if key not in by_axes})
    if outside:
        raise RFTBenchError(f"{len(outside)} published cells are not cells of study={PUBLISHED_STUDY}, e.g. {outside[:3]}")
    repeated = sorted(key for key, count in Counter(keys).items() if count > 1)
    if repeated:
        raise RFTBenchError(f"{len(repeated)} cells appear more than once in the published table, e.g. {repeated[:3]}")
    return [by_axes[key] for key in keys]


def published_flags(cells: Iterable[Cell]) -> pd.DataFrame:
    """One row per cell that PUBLISHED_FLAWS names (FLAG_COLUMNS), in the order of `cells`."""
    reasons = {(flaw.model, flaw.protocol): flaw.reason for flaw in PUBLISHED_FLAWS}
    rows = [{**cell.axes, "flag": reasons[cell.model, cell.protocol]}
            for cell in cells if (cell.model, cell.protocol) in reasons]
    return pd.DataFrame(rows, columns=list(FLAG_COLUMNS))


def published_rows(cell: Cell, row: Mapping[str, Any], study: str, source_file: str) -> list[dict[str, Any]]:
    """The cell's five rows: the published accuracies, counts on the configured test size."""
    n_examples = cell.config["dataset"]["test_size"]
    return [
        {
            **dict.fromkeys(COLUMNS),
            **condition_columns(cell.config["eval"][condition]),
            "study": study,
            "cell_id": cell.id,
            **cell.axes,
            "condition": condition,
            "n_examples": n_examples,
            "n_correct": round(float(row[column]) * n_examples),  # ties to even
            "accuracy": float(row[column]),
            "source": "imported",
            "source_file": source_file,
        }
        for column, condition in CONDITIONS.items()
    ]


def import_command(args: argparse.Namespace) -> int:
    study, results_root = study_and_root(args.overrides, default=DEFAULT_STUDY)
    path = Path(args.path)
    report = import_reference(path, study, results_root)
    flagged = len(pd.read_csv(report.study_dir / FLAGS_FILE))
    print(f"imported {path.name} as study {study}: {report.cells} cells, {report.measurements} measurements "
          f"in {report.study_dir}; {flagged} published cells flagged in {FLAGS_FILE}")
    print_warnings(report)
    return 1 if report.problems else 0


def _write_if_changed(path: Path, rows: pa.Table) -> None:
    """Write `rows` unless the file holds them already: importing again then changes no file, and
    the collect after it reads nothing."""
    try:
        if read_rows(path).equals(rows):
            return
    except CorruptResultError:
        pass  # absent or damaged: written below
    write_table(path, rows)


def _check_target(directory: Path, cell_ids: set[str], source_file: str) -> None:
    """Refuse to mix: the study may hold only cells imported earlier from this same file."""
    if not (directory / CELLS_DIR).is_dir():
        return
    problems = collect(directory).problems
    rows = read_rows(directory / MEASUREMENTS_FILE).select(["cell_id", "source", "source_file"]).to_pylist()
    runs = {row["cell_id"] for row in rows if row["source"] != "imported"}
    files = {row["source_file"] for row in rows if row["source"] == "imported"} - {source_file}
    others = set(read_table(directory / CELLS_FILE, CELL_SCHEMA)["cell_id"].to_pylist()) - cell_ids - runs
    reasons = [
        *([f"{len(runs)} cells of own runs"] if runs else []),
        *([f"rows imported from {sorted(files, key=str)}"] if files else []),
        *([f"{len(others)} cells this import does not write (was conf/ changed?)"] if others else []),
        *([f"{len(problems)} unreadable cells"] if problems else []),
    ]
    if reasons:
        raise RFTBenchError(
            f"study {directory.name!r} already holds {'; '.join(reasons)}: import into another "
            f"study=NAME, or remove {directory} to import afresh"
        )
