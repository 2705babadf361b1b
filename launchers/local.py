"""Run cells on this machine, one after another, in this process, with a progress bar.

A failing cell is recorded as failed (its state carries the reason and traceback) and the
sweep goes on with the next cell; the exit code is non-zero when any cell failed.
"""
from __future__ import annotations

import sys

from tqdm import tqdm

from benchmark import cell as cells
from benchmark.cell import Cell
from benchmark.run import Runtime, run_cell
from benchmark.study import Study


def check(study: Study) -> None:
    """Nothing to check: the cells run in this process."""


def launch(study: Study, todo: list[Cell]) -> int:
    runtime = Runtime.from_config(study.config)
    failed: list[Cell] = []
    print(f"study {study.name}: running {len(todo)} cells locally; results in {study.dir}")
    with tqdm(todo, unit="cell", file=sys.stdout, dynamic_ncols=True) as bar:
        for cell in bar:
            bar.set_description(cell.slug)
            try:
                run_cell(cell.directory(study.dir), runtime)
            except Exception:  # recorded in the cell's state; the sweep goes on
                failed.append(cell)
    for cell in failed:
        reason = cells.read_state(cell.directory(study.dir)).get("reason")
        print(f"FAILED {cell.slug} ({cell.id}): {reason}  [log: {cell.directory(study.dir) / cells.LOG_FILE}]")
    print(f"study {study.name}: {len(todo) - len(failed)} cells done, {len(failed)} failed; "
          f"rows in {study.dir / 'cells'}/*/{cells.ROWS_FILE}")
    return 1 if failed else 0


def cancel(study: Study, todo: list[Cell]) -> int:
    print("the local launcher runs cells in the foreground: stop it with Ctrl-C")
    return 0
