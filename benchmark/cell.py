"""The cell: one fully resolved config of the grid, its stable id, its directory and its state.

A cell's id is a hash of its canonical resolved training config (everything but `eval`, the
conditions it is measured under), so the same config has the same id on any machine, relaunching
a study finds the cells that are already done, and measuring a done cell under a new condition
adds a row to it (`rftbench evaluate`, from its kept weights) instead of making a new cell. Rows
are keyed by (cell id, condition); config.yaml's `eval` holds the config of every condition the
cell's rows measure, and a condition name is never measured twice with different configs. A grid's ids are
assembled from each option's canonical JSON, serialised once (`grid`): planning 100,000 cells
must not serialise 100,000 whole configs.

Cell directory `<results>/<study>/cells/<cell_id>/`:
  config.yaml    the resolved cell config (written when the cell is first launched; `eval` gains
                 the conditions `rftbench evaluate` adds)
  state.json     what the worker last said: submitted / running (+ heartbeat) / failed (+ reason)
  train.log      the worker's log
  heartbeat      touched every 30 s while a worker runs (its mtime tells a live worker from a dead one);
                 it holds the worker's progress (`write_progress`), shown by `status --watch`
  ckpt/last.pt   the last completed epoch: weights, optimizer state and the history, tensors and
                 plain types only (loaded with weights_only=True); training resumes from it
  aa_state/      AutoAttack evaluation state (an interrupted evaluation resumes from it)
  history.parquet   the learning curve, one row per completed epoch, rewritten whole each epoch
  weights.safetensors  the final weights, kept once the cell is done (runtime.retention: with
                 `final`, the default, ckpt/ and aa_state/ are then removed; `none` keeps no weights)
  examples.parquet  per-example results (correct, score) for every condition
  rows.parquet   the result rows, written last and atomically: the cell is done when it exists
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmark.atomic import write_json_atomic, write_text_atomic

AXES = ("dataset", "model", "loss", "protocol")
ID_LENGTH = 16

CELLS_DIR = "cells"  # <results>/<study>/cells/<cell_id>/

ROWS_FILE = "rows.parquet"
EXAMPLES_FILE = "examples.parquet"
STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"
LOG_FILE = "train.log"
HEARTBEAT_FILE = "heartbeat"  # touched by a running worker every HEARTBEAT_SECONDS
HEARTBEAT_SECONDS = 30.0

# libyaml's C implementations: a 1,440-cell study reads and writes 1,440 configs.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def canonical_json(value: Any) -> str:
    """The JSON a cell id hashes: sorted keys, no whitespace, ASCII only."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


# Keys of a cell config that do not enter its id: the measurements are not the trained model.
NOT_IDENTITY = frozenset({"eval"})


def cell_id(config: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of `config` without NOT_IDENTITY keys, shortened."""
    return _digest(canonical_json({key: value for key, value in config.items() if key not in NOT_IDENTITY}))


def _digest(canonical: str) -> str:
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()[:ID_LENGTH]


def grid(choices: dict[str, list[Any]],
         refine: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(cell_id, config) of every config that takes one value per top-level key of `choices`,
    in the order of itertools.product over the keys as given. `refine`, when given, may replace
    values of a config by others that depend on the whole combination (per-cell values); it
    should return the same objects for the same combination, so their JSON is made once.

    Each value is serialised once; a config's canonical JSON is then joined from its values'
    pieces in sorted key order, the very bytes `canonical_json` gives the config's identity keys
    (an id costs a join and a hash, not a serialisation). The configs share their values' objects.
    """
    keys = sorted(key for key in choices if key not in NOT_IDENTITY)
    pieces: dict[tuple[str, int], tuple[Any, str]] = {}  # the value is kept so its id stays its own

    def piece(key: str, value: Any) -> str:
        found = pieces.get((key, id(value)))
        if found is None:
            found = pieces[key, id(value)] = (value, f"{canonical_json(key)}:{canonical_json(value)}")
        return found[1]

    for combo in itertools.product(*choices.values()):
        config = dict(zip(choices, combo))
        if refine is not None:
            config = refine(config)
        yield _digest("{" + ",".join([piece(key, config[key]) for key in keys]) + "}"), config


@dataclass(frozen=True)
class Cell:
    """One point of the grid: its axis choices and the resolved config they produce."""

    id: str
    dataset: str
    model: str
    loss: str
    protocol: str
    config: dict[str, Any] = field(compare=False, repr=False)

    @classmethod
    def from_config(cls, config: dict[str, Any], id_: str | None = None) -> Cell:
        """The cell of `config`; `id_`, when given, must be `cell_id(config)` (see `grid`)."""
        return cls(id_ or cell_id(config), *(config[axis]["name"] for axis in AXES), config=config)

    @property
    def seed(self) -> int:
        return self.config["seed"]

    @property
    def slug(self) -> str:
        """A readable name for logs and job names; the id, not the slug, identifies the cell."""
        return "__".join((self.dataset, self.model, self.loss, self.protocol, f"seed{self.seed}"))

    @property
    def axes(self) -> dict[str, str]:
        return {axis: getattr(self, axis) for axis in AXES}

    def directory(self, study_dir: Path) -> Path:
        return study_dir / CELLS_DIR / self.id


def cells_with_directory(study_dir: Path) -> set[str]:
    """The ids of the study's cells that have a directory (one listing: every other cell of a
    planned study is pending without a look at its files)."""
    try:
        with os.scandir(study_dir / CELLS_DIR) as entries:
            return {entry.name for entry in entries if entry.is_dir()}
    except FileNotFoundError:
        return set()


def write_config(cell: Cell, cell_dir: Path, study: str) -> None:
    """Record the cell's resolved config in its directory (once: the id pins the content)."""
    path = cell_dir / CONFIG_FILE
    if not path.exists():
        document = {"cell_id": cell.id, "slug": cell.slug, "study": study, "config": cell.config}
        write_text_atomic(path, yaml.dump(document, Dumper=_DUMPER, sort_keys=False))


def read_config(cell_dir: Path) -> dict[str, Any]:
    """The document `write_config` wrote: cell_id, slug, study and the resolved config."""
    return yaml.load((cell_dir / CONFIG_FILE).read_text(), Loader=_LOADER)


def _read_state_file(cell_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((cell_dir / STATE_FILE).read_text())
    except FileNotFoundError:
        return {"state": "pending"}
    except json.JSONDecodeError as err:  # only a foreign writer could leave half a file
        return {"state": "failed", "reason": f"unreadable {STATE_FILE}: {err}"}


def read_state(cell_dir: Path) -> dict[str, Any]:
    """The cell's state: `done` when its rows exist, else what state.json says, else pending."""
    state = _read_state_file(cell_dir)
    if (cell_dir / ROWS_FILE).exists():
        state["state"] = "done"
    return state


def write_state(cell_dir: Path, state: str, **details: Any) -> None:
    """Record a state transition with its time; `details` carry job ids, reasons, tracebacks.

    `attempt` counts the times a worker started the cell (it goes into the cell's rows).
    """
    previous = _read_state_file(cell_dir)
    attempt = previous.get("attempt", 0) + (1 if state == "running" else 0)
    record = {"state": state, "attempt": attempt, "time": time.time(), **details}
    write_json_atomic(cell_dir / STATE_FILE, record)


def write_progress(cell_dir: Path, **progress: Any) -> None:
    """Say where the worker is (e.g. phase=training, epochs_done, epochs; phase=evaluating,
    condition, conditions_done, conditions) in the heartbeat file; writing it is a beat too."""
    write_json_atomic(cell_dir / HEARTBEAT_FILE, progress)


def read_progress(cell_dir: Path) -> dict[str, Any]:
    """What `write_progress` last wrote; {} when nothing was (or the file is gone)."""
    try:
        return json.loads((cell_dir / HEARTBEAT_FILE).read_text() or "{}")
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
