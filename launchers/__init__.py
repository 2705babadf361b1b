"""How cells (and other jobs, such as hyper-parameter search workers) are dispatched: one
interface, `Launcher`, and one registry of its kinds, `LAUNCHERS`.

A launcher config is `conf/launcher/<name>.yaml`, chosen with `launcher=<name>`: its `name`, its
`kind` (the registered launcher that runs it: `slurm` and `slurm_cpu` are two configs of the
`slurm` kind) and the kind's own keys. `LAUNCHERS` maps a kind to the import path of its
`Launcher` subclass, imported only when a cell of that kind is launched, cancelled or asked
about: `status` of local cells imports no submitit, and nothing dispatch-side imports torch (the
worker, benchmark.run, is imported inside the job that runs a cell).

A launcher hands every job it starts a job record (benchmark.provenance.JobRecord: which
launcher config and kind, which job, its log); the worker writes it into each state of its cell.
So each cell says what runs it, and `status`, `resume` and `cancel` ask that cell's own launcher,
whatever the command line configures. The resolved config of every launch is recorded once per
study, `<study>/launchers/<name>-<hash>.json` (the record's `launcher_config`), so `resume` can
send a failed cell back with the very config (partition, resources, ...) it was launched with.

A new kind is one subclass registered here (or from a plugin module) plus one config file.
"""
from __future__ import annotations

import abc
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel

from benchmark.atomic import write_json_atomic
from benchmark.cell import Cell, canonical_json
from benchmark.provenance import JobRecord
from benchmark.registry import Registry, resolve

if TYPE_CHECKING:  # a job unpickling its launcher's worker need not import Hydra
    from benchmark.study import Study

LAUNCHERS: Registry[str] = Registry("launcher kind")  # kind -> "module:Class" of its Launcher
LAUNCHERS.register("local", "launchers.local:LocalLauncher")
LAUNCHERS.register("slurm", "launchers.slurm:SlurmLauncher")

CONFIGS_DIR = "launchers"  # <study>/launchers/<name>-<hash>.json: the configs cells were launched with


@dataclass(frozen=True)
class JobState:
    """What the scheduler says of one job: `queued`, `running` or `ended` (and, when ended,
    what it died of, in words a user reads in `status`)."""

    state: Literal["queued", "running", "ended"]
    reason: str | None = None


class Launcher(abc.ABC):
    """One kind of launcher, built from a resolved launcher config (submitit's Executor).

    Instance methods start new work with this config. Class methods act on jobs started before,
    from the records their cells or workers wrote, whatever config started them: a launcher
    answers for its own jobs (`job_states`) and stops them (`cancel`).
    """

    kind: ClassVar[str]
    schema: ClassVar[type[BaseModel] | None] = None  # the config's keys (checked at plan time)

    def __init__(self, config: dict[str, Any]):
        self.config = config

    @property
    def name(self) -> str:
        """The config's name, as chosen on the command line (`launcher=<name>`)."""
        return self.config["name"]

    def check(self, study: Study) -> None:
        """Raise RFTBenchError when the study's cells cannot be launched from here (called before
        anything is written; contacts the scheduler when the kind needs one)."""

    @abc.abstractmethod
    def launch(self, study: Study, cells: list[Cell]) -> int:
        """Run or submit `cells` (their directories hold config.yaml); the exit code of the
        command: non-zero when a cell failed or could not be submitted."""

    @abc.abstractmethod
    def submit_workers(self, study: Study, fn: Callable[[], None], n: int, name: str) -> list[JobRecord]:
        """Start `n` jobs that each call `fn()` (picklable; not a cell: it writes no cell
        state), named `name`, with the default resources of this config; their job records,
        for `job_states` (is the worker still there?)."""

    def processes(self, cell: Cell) -> int:
        """How many processes run `cell` (the ranks of one data-parallel group)."""
        return 1

    @classmethod
    @abc.abstractmethod
    def cancel(cls, study: Study, cells: list[Cell]) -> int:
        """Stop the jobs of `cells` (queued or running ones of this kind, by their state files)
        and mark the cells failed; an exit code."""

    @classmethod
    @abc.abstractmethod
    def job_states(cls, records: dict[str, dict[str, Any]]) -> dict[str, JobState] | None:
        """What the scheduler says of the jobs of `records` (state or job records of this kind,
        by any key: cell id, worker name), by the same key. A key left out: nothing known (a job
        the scheduler has not registered yet, a worker on another host). None: the scheduler
        could not answer at all."""

    def job_record(self, **job: Any) -> JobRecord:
        """The record of a job this launcher starts: which config and kind, plus `job`."""
        return JobRecord(launcher=self.name, launcher_kind=self.kind, launcher_config=config_key(self.config), **job)


def launcher_class(kind: str) -> type[Launcher]:
    """The Launcher subclass registered as `kind` (imported now)."""
    return resolve(LAUNCHERS[kind])


def launcher_for(config: dict[str, Any]) -> Launcher:
    """The launcher that runs the resolved launcher `config` (its `kind` chooses the class)."""
    return launcher_class(config["kind"])(config)


def kind_of(record: dict[str, Any]) -> str:
    """The launcher kind of a cell's state record: a record no launcher annotated (a worker run
    by hand) is a local one."""
    return record.get("launcher_kind", "local")


def config_key(config: dict[str, Any]) -> str:
    """`<name>-<hash>`: names a resolved launcher config by its content."""
    return f"{config['name']}-{hashlib.sha256(canonical_json(config).encode()).hexdigest()[:8]}"


def record_config(study_dir: Path, config: dict[str, Any]) -> None:
    """Keep `config` under the study, once per distinct config, for `recorded_config`."""
    path = study_dir / CONFIGS_DIR / f"{config_key(config)}.json"
    if not path.exists():
        write_json_atomic(path, config)


def recorded_config(study_dir: Path, key: str | None) -> dict[str, Any] | None:
    """The launcher config recorded as `key` (a record's `launcher_config`), None when there is
    none (a cell launched before configs were recorded, or by hand)."""
    path = study_dir / CONFIGS_DIR / f"{key}.json"
    if key is None or not path.exists():
        return None
    return json.loads(path.read_text())
