"""Shared factories for the tests: made-up result rows and tiny models, one definition each."""
from __future__ import annotations

from typing import Any

from benchmark.cell import Cell
from benchmark.conditions import condition_columns
from benchmark.results import COLUMNS


def result_row(cell: Cell | None = None, condition: str | None = None, **values: Any) -> dict[str, Any]:
    """A complete result row: every column of the schema, null unless given. With a cell, its id,
    axes and seed; with a condition of that cell, the condition's columns; then `values`."""
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    if cell is not None:
        row |= {"cell_id": cell.id, **cell.axes, "seed": cell.seed}
    if cell is not None and condition is not None:
        row |= {**condition_columns(cell.config["eval"][condition]), "condition": condition}
    return row | values


def planned_with_directories(overrides: list[str]):
    """The study of `overrides` with a directory (its config) for each cell, as a launch leaves
    them: (study, the cells' directories)."""
    from benchmark.cell import write_config
    from benchmark.study import plan

    study = plan(overrides)
    for cell in study.cells:
        write_config(cell, cell.directory(study.dir), study.name)
    return study, [c.directory(study.dir) for c in study.cells]


def tiny_classifier(arch: str = "test_resnet", classes: int = 10):
    """One of timm's tiny test architectures, random weights, behind a [0.5] normalisation."""
    import timm

    from benchmark.models import Classifier

    return Classifier(timm.create_model(arch, pretrained=False, num_classes=classes), [0.5] * 3, [0.5] * 3)
