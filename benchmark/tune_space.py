"""Hyper-parameter search, the torch-free half: a `conf/tune` option checked, the search space of
a cell, the Optuna study of a cell (name, storage, sampler, pruner), the bookkeeping of its trials
(budget, workers that died) and the per-cell hyper-parameter table it produces.

One Optuna study per cell, named `<cell id>.<space hash>`: the hash covers what makes two trials
comparable (the cell's search space, the epochs of a trial, the objective's subset size), so
tuning a cell again with another space starts a new study instead of mixing trials. The budget
counts finished trials (complete or pruned); failed trials do not count.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import (
    JournalFileBackend,
    JournalFileOpenLock,
    JournalStorage,
)
from optuna.trial import FrozenTrial, TrialState

from benchmark.cell import Cell, canonical_json
from benchmark.errors import RFTBenchError
from benchmark.schema import TuneOption, check

# The hyper-parameters a protocol tunes, in the order they are drawn (the draw of a trial
# depends on it); a protocol that does not train its backbone tunes the head ones only.
PARAMS = ("lr_backbone", "lr_head", "weight_decay_backbone", "weight_decay_head", "cosine")
BACKBONE_PARAMS = ("lr_backbone", "weight_decay_backbone")
TABLE_COLUMNS = ("dataset", "model", "loss", "protocol", *PARAMS, "n_trials", "best_value")
TUNE_DIR = "tune"                   # <study dir>/tune/: journal, table, trial work
JOURNAL_FILE = "optuna.journal"
TABLE_FILE = "hparams.csv"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
MAX_RETRIES = 3                     # times a trial whose worker died is tried again
HEARTBEAT_SECONDS = 60              # database storages: a running trial's heartbeat ...
GRACE_SECONDS = 180                 # ... and how long without one before it counts as dead


@dataclass(frozen=True)
class TuneConfig:
    """A `conf/tune` option, checked (see conf/tune/asha.yaml for the meaning of each key)."""

    name: str
    n_trials: int
    timeout_minutes: float | None
    max_epochs: int
    workers: int
    seed: int
    storage: str | None
    min_resource: int
    reduction_factor: int
    validation_size: int
    space: dict[str, Any]

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> TuneConfig:
        """The option `cfg` (the root config's `tune` node, checked by `schema.TuneOption`)."""
        check(TuneOption, cfg, f"tune option {cfg.get('name')!r}", "tune")
        name, pruner = cfg["name"], cfg["pruner"]
        space = {key: value for key, value in cfg["space"].items() if value is not None}
        return cls(name, cfg["n_trials"], cfg["timeout_minutes"], cfg["max_epochs"], cfg["workers"], cfg["seed"],
                   cfg["storage"], pruner["min_resource"], pruner["reduction_factor"], cfg["validation_size"],
                   space)

    def sampler(self) -> optuna.samplers.BaseSampler:
        return TrialSeededRandomSampler(self.seed)

    def pruner(self) -> optuna.pruners.BasePruner:
        """ASHA: asynchronous successive halving, one rung per `reduction_factor` x epochs."""
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=self.min_resource,
                                                      reduction_factor=self.reduction_factor)


class TrialSeededRandomSampler(optuna.samplers.RandomSampler):
    """Random sampling whose draw for trial n depends only on (seed, n): workers sharing a study
    draw distinct values, and the same ones whatever order they ask in."""

    def __init__(self, seed: int):
        super().__init__(seed)
        self._seed = seed

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._rng.rng.seed([self._seed, trial.number])  # RandomSampler keeps its numpy RandomState there


# --- the space of a cell --------------------------------------------------------------------

def cell_space(tune: TuneConfig, protocol: dict[str, Any]) -> dict[str, Any]:
    """The part of `tune.space` that `protocol` tunes (no backbone values when it is frozen)."""
    return {param: spec for param, spec in tune.space.items()
            if protocol["train_backbone"] or param not in BACKBONE_PARAMS}


def trial_epochs(tune: TuneConfig, protocol: dict[str, Any]) -> int:
    return min(tune.max_epochs, protocol["epochs"])


def study_name(tune: TuneConfig, cell: Cell) -> str:
    """The Optuna study of `cell` under `tune`: the cell id and a hash of what makes trials comparable."""
    identity = {"space": cell_space(tune, cell.config["protocol"]),
                "epochs": trial_epochs(tune, cell.config["protocol"]),
                "validation_size": tune.validation_size}
    return f"{cell.id}.{hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:8]}"


def suggest(trial: optuna.Trial, space: dict[str, Any]) -> dict[str, Any]:
    """Draw the trial's values of `space`, in PARAMS order."""
    return {param: (trial.suggest_categorical(param, space[param]) if param == "cosine" else
                    trial.suggest_float(param, space[param]["low"], space[param]["high"], log=space[param]["log"]))
            for param in PARAMS if param in space}


def tuned_protocol(protocol: dict[str, Any], params: dict[str, Any], epochs: int | None = None) -> dict[str, Any]:
    """`protocol` with the tuned values in place (and `epochs` when given: a trial's length)."""
    optimizer = {**protocol["optimizer"], **{k: float(v) for k, v in params.items() if k != "cosine"}}
    tuned = {**protocol, "optimizer": optimizer, "cosine": bool(params.get("cosine", protocol["cosine"]))}
    return tuned if epochs is None else {**tuned, "epochs": epochs}


# --- storage ----------------------------------------------------------------------------------

def storage_url(tune: TuneConfig, study_dir: Path) -> str:
    """The storage of the searches: `tune.storage`, or the journal file under the study."""
    return tune.storage or str(study_dir / TUNE_DIR / JOURNAL_FILE)


def is_database(url: str) -> bool:
    return "://" in url


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """The Optuna storage at `url` (a database URL, or a journal file path), checked reachable.

    Database storages get Optuna's heartbeat: a trial whose worker stops beating is failed and
    retried (by the next trial a worker starts, or the next `reap`). Optuna's journal file has no
    heartbeat (Optuna 5); there `reap` asks the launcher of the trial's worker whether it is gone.
    """
    if not is_database(url):
        path = Path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        # The open-lock works on NFSv3+ (a cluster's shared filesystem).
        return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    try:
        with _stable_enough():
            return RDBStorage(url, engine_kwargs={"pool_pre_ping": True},
                              heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                              heartbeat_stale_trial_callback=_retry())
    except Exception as err:  # noqa: BLE001 - SQLAlchemy and the drivers raise many kinds
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RFTBenchError(f"tune.storage={_masked(url)!r} cannot be opened: {first_line}. A database "
                            "URL looks like mysql+pymysql://user:password@host:3306/db or "
                            "sqlite:///path.db; null uses a journal file under the study") from None


@contextmanager
def _stable_enough() -> Iterator[None]:
    """Optuna marks its heartbeat and retry helpers experimental; they are what its documentation
    recommends for workers that die, so the warning would only be noise to a user."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def _retry() -> RetryHeartbeatStaleTrialCallback:
    with _stable_enough():
        return RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)


def _masked(url: str) -> str:
    """`url` without its password."""
    head, at, tail = url.rpartition("@")
    if not at or ":" not in head.split("://", 1)[-1]:
        return url
    return f"{head.rsplit(':', 1)[0]}:***@{tail}"


def load_or_create(storage: optuna.storages.BaseStorage, name: str, tune: TuneConfig) -> optuna.Study:
    return optuna.create_study(storage=storage, study_name=name, direction="minimize", load_if_exists=True,
                               sampler=tune.sampler(), pruner=tune.pruner())


# --- trials and workers -----------------------------------------------------------------------

def counts(study: optuna.Study) -> Counter:
    """Trials by state name (COMPLETE, PRUNED, FAIL, RUNNING, WAITING), plus `finished`."""
    by_state = Counter(t.state.name for t in study.get_trials(deepcopy=False))
    by_state["finished"] = sum(by_state[s.name] for s in FINISHED)
    return by_state


def worker_identity(trial_number: int, launcher_kind: str) -> dict[str, Any]:
    """Who runs a trial, recorded on it (user attribute `worker`) in the shape of a launcher's
    job record, so that `reap` can ask that launcher whether it is still there. It names the
    trial: a retried trial inherits its predecessor's attributes, and must not be taken for it."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")
    return {"trial": trial_number, "launcher_kind": launcher_kind, "job_id": job_id,
            "host": os.uname().nodename, "pid": os.getpid()}


def reap(study: optuna.Study, gone: Callable[[dict[int, dict[str, Any]]], set[int]]) -> int:
    """Fail the running trials whose worker is gone and enqueue each again (at most MAX_RETRIES
    times); returns how many. `gone` takes {trial number: worker record} and returns the numbers
    whose worker ended (the launchers' job states). A worker killed before it recorded itself is
    left to the database heartbeat."""
    with _stable_enough():
        optuna.storages.fail_stale_trials(study)  # database storages: trials without a heartbeat
    running = {t.number: t.user_attrs["worker"] for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
               if t.user_attrs.get("worker", {}).get("trial") == t.number}
    retry = _retry()
    reaped = 0
    for number in sorted(gone(running)) if running else ():
        try:
            failed = study.tell(number, state=TrialState.FAIL)
        except (RuntimeError, ValueError):  # finished meanwhile
            continue
        retry(study, failed)
        reaped += 1
    return reaped


# --- the table --------------------------------------------------------------------------------

def table_row(cell: Cell, study: optuna.Study) -> dict[str, Any] | None:
    """The cell's row of the hyper-parameter table: the best complete trial's values, the
    protocol's own for what was not tuned (LP: backbone columns empty); None without a
    complete trial."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    best = min(complete, key=lambda t: t.value)
    protocol = tuned_protocol(cell.config["protocol"], best.params)
    row: dict[str, Any] = {**cell.axes, "cosine": protocol["cosine"],
                           **{p: protocol["optimizer"][p] for p in PARAMS if p != "cosine"}}
    if not protocol["train_backbone"]:
        row |= {p: None for p in BACKBONE_PARAMS}
    return {column: row.get(column) for column in TABLE_COLUMNS} | {
        "n_trials": counts(study)["finished"], "best_value": best.value}
