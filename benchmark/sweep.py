"""Study-level commands: plan, launch, status, resume, cancel.

A sweep is idempotent (DomainBed-style): a cell's id is the hash of its resolved config and its
state lives in its directory, so relaunching a study launches only what is not done.
"""
from __future__ import annotations

import argparse
import importlib
import json
from collections import Counter
from typing import Any

from benchmark import cell as cells
from benchmark.cell import AXES, Cell
from benchmark.study import Study, plan

TABLE_ROWS = 40  # cells listed in the text output; --format json lists all


def cell_states(study: Study) -> dict[str, dict[str, Any]]:
    """State record of every cell of the study, by cell id."""
    return {c.id: cells.read_state(c.directory(study.dir)) for c in study.cells}


def summary(study: Study, states: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The JSON shape shared by `plan` and `status`: total, by_state and one entry per cell."""
    return {
        "study": study.name,
        "total": len(study.cells),
        "by_state": dict(Counter(states[c.id]["state"] for c in study.cells)),
        "cells": [{"cell_id": c.id, **c.axes, "state": states[c.id]["state"]} for c in study.cells],
    }


def _print_summary(study: Study, report: dict[str, Any]) -> None:
    print(f"study {study.name}: {report['total']} cells in {study.dir}")
    for axis in AXES:
        counts = Counter(getattr(c, axis) for c in study.cells)
        print(f"  {axis:9s} {len(counts):4d}: " + ", ".join(f"{name} ({n})" for name, n in counts.items()))
    print("  states: " + ", ".join(f"{state} {n}" for state, n in sorted(report["by_state"].items())))
    for entry in report["cells"][:TABLE_ROWS]:
        print(f"  {entry['cell_id']}  {entry['state']:8s} " + " ".join(entry[a] for a in AXES))
    if report["total"] > TABLE_ROWS:
        print(f"  ... {report['total'] - TABLE_ROWS} more (--format json lists every cell)")


def plan_command(args: argparse.Namespace) -> int:
    study = plan(args.overrides)
    report = summary(study, cell_states(study))
    if args.format == "json":
        print(json.dumps(report, indent=2))
    else:
        _print_summary(study, report)
    return 0


def _launcher(study: Study):
    """The launcher module named by the config's `launcher.name` (launchers/<name>.py)."""
    return importlib.import_module(f"launchers.{study.config['launcher']['name']}")


def _submit(study: Study, todo: list[Cell], wait: bool) -> int:
    if not todo:
        print(f"study {study.name}: nothing to launch ({len(study.cells)} cells, none pending)")
        return 0
    for cell in todo:
        cells.write_config(cell, cell.directory(study.dir), study.name)
    return _launcher(study).launch(study, todo, wait=wait)


def launch_command(args: argparse.Namespace) -> int:
    study = plan(args.overrides)
    states = cell_states(study)
    return _submit(study, [c for c in study.cells if states[c.id]["state"] == "pending"], args.wait)


def resume_command(args: argparse.Namespace) -> int:
    study = plan(args.overrides)
    states = cell_states(study)
    return _submit(study, [c for c in study.cells if states[c.id]["state"] in ("pending", "failed")], args.wait)


def status_command(args: argparse.Namespace) -> int:
    study = plan(args.overrides)
    states = cell_states(study)
    report = summary(study, states)
    if args.format == "json":
        print(json.dumps(report, indent=2))
        return 0
    _print_summary(study, report)
    for c in study.cells:
        if states[c.id]["state"] == "failed":
            print(f"  FAILED {c.slug} ({c.id}): {states[c.id].get('reason', 'no reason recorded')}")
    return 0


def cancel_command(args: argparse.Namespace) -> int:
    study = plan(args.overrides)
    return _launcher(study).cancel(study, study.cells)
