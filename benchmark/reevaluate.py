"""`rftbench evaluate study=NAME eval=[...] [selection]`: measure done cells under the conditions
they lack, from their kept final weights, without retraining (what users do when a new attack
appears).

A cell's id leaves its conditions out (benchmark.cell), so the planned cell of `eval=[clean,
linf, new]` is the done cell of `eval=[clean, linf]`: its missing conditions are measured in this
process, one cell after another, and their rows join the cell's rows (rows.parquet and
examples.parquet rewritten whole, rows last; config.yaml's `eval` gains their configs first).
A condition the cell already measured under another config is refused before anything is
measured: rows are keyed by (cell id, condition), so a new config takes a new condition name.
Cells not done, or done without weights (`runtime.retention=none`, or finished before weights
were kept), are listed and left alone. The study is collected at the end.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from benchmark import cell as cells
from benchmark.atomic import write_text_atomic
from benchmark.cell import Cell, canonical_json
from benchmark.errors import RFTBenchError
from benchmark.results import SCHEMA_VERSION, read_rows, write_table
from benchmark.retention import WEIGHTS_FILE, drop_training_state
from benchmark.study import Study, plan

_SHOWN = 10  # cells named per reason before "..."


@dataclass(frozen=True)
class Evaluation:
    """A done cell and the conditions (name -> config) it lacks."""

    cell: Cell
    directory: Path
    missing: dict[str, dict[str, Any]]


def pending_evaluations(study: Study) -> tuple[list[Evaluation], dict[str, list[Cell]]]:
    """(the done cells of `study` that kept weights and lack some planned condition, the cells
    left alone by reason). RFTBenchError, listing them, when a planned condition was measured
    under another config."""
    todo, skipped, conflicts = [], {}, []
    present = cells.cells_with_directory(study.dir)
    for cell in study.cells:
        directory = cell.directory(study.dir)
        if cell.id not in present or not (directory / cells.ROWS_FILE).exists():
            skipped.setdefault("not done (launch it)", []).append(cell)
            continue
        measured = set(read_rows(directory / cells.ROWS_FILE)["condition"].to_pylist())
        recorded = cells.read_config(directory)["config"].get("eval", {})
        conflicts += [f"{cell.slug} ({cell.id}): {name}" for name, spec in cell.config["eval"].items()
                      if name in measured and name in recorded and canonical_json(recorded[name]) != canonical_json(spec)]
        missing = {name: spec for name, spec in cell.config["eval"].items() if name not in measured}
        if not missing:
            skipped.setdefault("has every condition", []).append(cell)
        elif not (directory / WEIGHTS_FILE).exists():
            skipped.setdefault("kept no weights (runtime.retention)", []).append(cell)
        else:
            todo.append(Evaluation(cell, directory, missing))
    if conflicts:
        shown = "; ".join(conflicts[:_SHOWN]) + (f"; ... ({len(conflicts)} in all)" if len(conflicts) > _SHOWN else "")
        raise RFTBenchError(f"{len(conflicts)} conditions were measured under another config of the same name: "
                            f"{shown}. Give the new config a new condition name (a conf/eval file)")
    return todo, skipped


def evaluate_cell(evaluation: Evaluation, root_config: dict[str, Any]) -> list[str]:
    """Measure `evaluation.missing` on the cell's kept weights and add the rows; returns the
    conditions measured."""
    import torch

    from benchmark import data, evaluate, models, run
    from benchmark.provenance import provenance
    from benchmark.retention import load_weights

    directory, config = evaluation.directory, evaluation.cell.config
    runtime = run.Runtime.from_config(root_config)
    device = runtime.torch_device()
    started = datetime.now(UTC)
    splits = data.load_splits(config["dataset"], runtime.data_root)
    model = models.create_model(config["model"], splits.num_classes, runtime.weights_root)
    model.load_state_dict(load_weights(directory))
    model.to(device)
    x_test, y_test = data.load_tensors(splits.test)
    with torch.no_grad():
        measurements = evaluate.evaluate(model, x_test, y_test, evaluation.missing, directory,
                                         batch_size=runtime.eval_batch_size,
                                         native=run.native_images(config["dataset"], runtime))
    rows = read_rows(directory / cells.ROWS_FILE)
    base = rows.slice(0, 1).to_pylist()[0]  # who trained the cell: kept; who measured: this run
    measured = {**provenance(str(device), None), "schema_version": SCHEMA_VERSION, "started_at": started,
                "finished_at": datetime.now(UTC)}
    new_rows = pa.Table.from_pylist([{**base, **measured, **run.measurement_columns(m)} for m in measurements],
                                    schema=rows.schema)
    _record_conditions(directory, evaluation.missing)
    examples = pq.read_table(directory / cells.EXAMPLES_FILE)
    write_table(directory / cells.EXAMPLES_FILE, pa.concat_tables([examples, run.examples_table(measurements)]))
    write_table(directory / cells.ROWS_FILE, pa.concat_tables([rows, new_rows]))  # last: the rows say what is done
    drop_training_state(directory, runtime.retention)  # the AutoAttack state this evaluation left
    return [m.condition for m in measurements]


def _record_conditions(directory: Path, specs: dict[str, dict[str, Any]]) -> None:
    """Add `specs` to the `eval` of the cell's config.yaml (written whole)."""
    document = cells.read_config(directory)
    document["config"]["eval"] = {**document["config"].get("eval", {}), **specs}
    write_text_atomic(directory / cells.CONFIG_FILE, yaml.safe_dump(document, sort_keys=False))


def evaluate_command(args: argparse.Namespace) -> int:
    """Measure the selected done cells under the conditions they lack, then collect."""
    from benchmark.collect import collect, print_warnings
    from benchmark.conditions import check_conditions

    study = plan(args.overrides)
    todo, skipped = pending_evaluations(study)
    for reason, left in skipped.items():
        names = ", ".join(c.slug for c in left[:_SHOWN]) + (" ..." if len(left) > _SHOWN else "")
        print(f"{len(left)} cells left alone, {reason}: {names}")
    for evaluation in todo:
        check_conditions(evaluation.missing)
    for evaluation in todo:
        done = evaluate_cell(evaluation, study.config)
        print(f"{evaluation.cell.slug} ({evaluation.cell.id}): measured {', '.join(done)}", flush=True)
    if todo:
        report = collect(study.dir)
        print(f"study {study.name}: collected {report.measurements} measurements of {report.cells} cells")
        print_warnings(report)
    return 0
