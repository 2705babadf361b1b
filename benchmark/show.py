"""`rftbench show CELL study=NAME [overrides]`: one cell's resolved config, and where each value
that is not its option file's came from (study settings, batching rule, hyper-parameter table or
its fallback, command line). CELL is a cell id or a slug; the overrides select and patch as for
`plan`, so a cell is shown as that command line would launch it.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml

from benchmark.cell import Cell
from benchmark.errors import RFTBenchError, closest_first
from benchmark.study import Study, plan


def find(study: Study, key: str) -> Cell:
    """The cell whose id or slug is `key`; an error naming the closest slugs when none is."""
    for cell in study.cells:
        if key in (cell.id, cell.slug):
            return cell
    close = closest_first(key, [c.slug for c in study.cells])[:5]
    raise RFTBenchError(f"no cell {key!r} in study {study.name} ({len(study.cells)} cells); "
                        f"closest slugs: {', '.join(close)}")


def document(study: Study, cell: Cell) -> dict[str, Any]:
    """What `show` prints: cell_id, slug, study, config (as in the cell's config.yaml) and sources."""
    return {"cell_id": cell.id, "slug": cell.slug, "study": study.name, "config": cell.config,
            "sources": study.sources(cell)}


def show_command(args: argparse.Namespace) -> int:
    study = plan(args.overrides)
    shown = document(study, find(study, args.cell))
    if args.format == "json":
        print(json.dumps({**shown, "notes": study.notes}, indent=2))
        return 0
    print(yaml.safe_dump(shown, sort_keys=False, width=120), end="")
    for line in note_lines(study.notes):
        print(line, file=sys.stderr)
    return 0


def note_lines(notes: dict[str, Any]) -> list[str]:
    """The planner's notes in words (for stderr: stdout stays the document)."""
    table = notes.get("hparams")
    if not table:
        return []
    return [f"hyper-parameters of {table['points']} grid points: {table['from_table']} from the table "
            f"{table['table']}, {table['from_fallback']} from the study's hparams_fallback, "
            f"{table['from_protocol']} from their protocol option"]
