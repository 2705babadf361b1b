"""A tuning worker: one long-lived process that runs trials of one cell's search, pulled from the
shared Optuna storage, until the cell's budget is met. `benchmark.tune` starts workers through
a launcher (`run_worker`), or by hand: `python -m benchmark.trial SPEC.json`.

It loads the cell's train and val splits once (never the test split) and then, per trial, the
pretrained backbone afresh; the trial trains the cell's loss and protocol with the drawn values
for at most `tune.max_epochs` epochs and reports the robust validation loss
(`benchmark.validation`) after every epoch; the pruner stops it at a rung where it trails. A
trial writes no result rows: its checkpoint lives in its work directory, removed when it ends.

Several workers may serve one cell. A worker starts a trial while the finished and running
trials are fewer than the budget, or when a retried trial waits, and ends when the rest of the
budget is in other workers' hands: `tune` fails and enqueues again the trials of workers that
died, and starts workers for them. The worker knows nothing of schedulers: it records its job
record on each trial (`tune_space.worker_identity`), and `tune` asks the launcher about it.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import torch

from benchmark import data, models, train, tune_space
from benchmark.run import Runtime, loader_workers
from benchmark.tune_space import TuneConfig
from benchmark.validation import robust_validation_loss, validation_subset

log = logging.getLogger("benchmark")
# A worker whose trials all fail is broken (missing weights, a bug), not unlucky: it stops.
MAX_FAILURES_IN_A_ROW = 5


class CellTrials:
    """What every trial of one cell shares: the config, the loaded splits and validation subset."""

    def __init__(self, spec: dict[str, Any], launcher_kind: str):
        self.launcher_kind = launcher_kind
        self.cell, self.tune = spec["cell"], TuneConfig.from_config(spec["tune"])
        self.runtime = Runtime.from_config(spec["root"])
        self.work_dir = Path(spec["work_dir"])
        self.device = self.runtime.torch_device()
        self.splits = data.load_splits(self.cell["dataset"], self.runtime.data_root, with_test=False)
        self.x_val, self.y_val = validation_subset(self.splits.val, self.tune.validation_size)
        self.space = tune_space.cell_space(self.tune, self.cell["protocol"])
        self.epochs = tune_space.trial_epochs(self.tune, self.cell["protocol"])
        self.failures_in_a_row = 0

    def objective(self, trial: optuna.Trial) -> float:
        """Train one trial; its value is the robust validation loss after its last epoch."""
        trial.set_user_attr("worker", tune_space.worker_identity(trial.number, self.launcher_kind))
        try:
            value = self._train(trial)
        except optuna.TrialPruned:
            self.failures_in_a_row = 0
            raise
        except Exception as err:
            self.failures_in_a_row += 1
            trial.set_user_attr("failure", f"{type(err).__name__}: {err}")
            raise
        self.failures_in_a_row = 0
        return value

    def _train(self, trial: optuna.Trial) -> float:
        protocol = tune_space.tuned_protocol(self.cell["protocol"], tune_space.suggest(trial, self.space), self.epochs)
        train.seed_everything(self.cell["seed"])
        model = models.create_model(self.cell["model"], self.splits.num_classes, self.runtime.weights_root)
        values: list[float] = []

        def report(epoch: int, _: train.TrainResult) -> None:
            value = robust_validation_loss(model, self.x_val, self.y_val, self.cell["loss"]["attack"], self.device)
            values.append(value)
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch}: robust validation loss {value:.4f}")

        trial_dir = self.work_dir / f"trial-{trial.number}"
        trainer = train.Trainer(model, self.splits, self.cell["loss"], protocol, ckpt_path=trial_dir / "last.pt",
                                device=self.device, seed=self.cell["seed"],
                                num_workers=loader_workers(self.runtime.num_workers, self.device),
                                on_epoch_end=report)
        try:
            trainer.fit()
        finally:
            shutil.rmtree(trial_dir, ignore_errors=True)
        return values[-1] if math.isfinite(values[-1]) else math.nan  # nan: Optuna fails the trial


def work(spec: dict[str, Any], launcher_kind: str) -> int:
    """Run trials of the spec's cell until its budget is met or in other workers' hands (or the
    time budget is spent); 1 when it stopped because its trials kept failing."""
    trials = CellTrials(spec, launcher_kind)
    tune = trials.tune
    study = optuna.load_study(study_name=spec["study_name"], storage=tune_space.open_storage(spec["storage"]),
                              sampler=tune.sampler(), pruner=tune.pruner())
    deadline = time.monotonic() + 60 * tune.timeout_minutes if tune.timeout_minutes else math.inf
    while time.monotonic() < deadline:
        count = tune_space.counts(study)
        if count["WAITING"] == 0 and count["finished"] + count["RUNNING"] >= tune.n_trials:
            break
        study.optimize(trials.objective, n_trials=1, catch=(Exception,))
        if trials.failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
            log.error("stopping: the last %d trials failed (see their `failure` attribute)", trials.failures_in_a_row)
            return 1
    return 0


def run_worker(spec_path: str, launcher_kind: str, threads: int | None = None) -> int:
    """A worker's entry point: `threads` torch threads (default: the CPUs this process may run on,
    which a scheduler restricts to the job's allocation), log records to stderr, then `work`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))  # torch would take every core of the node
    return work(json.loads(Path(spec_path).read_text()), launcher_kind)


if __name__ == "__main__":
    sys.exit(run_worker(sys.argv[1], "local"))
