"""tune_overhead_share: the hyper-parameter search's own cost per trial (the storage round-trips a
worker makes around a trial) as a share of a demo trial's wall time. Goal: <= 0.02.

demo trial      one real trial of the demo cell (digits x test_resnet.demo x classic_at x fft5,
                the smoke option: 1 epoch, 128 validation images) in a long-lived worker whose
                splits are loaded: what `benchmark.trial` does per trial (model creation,
                training, the objective, the storage calls). The median of TRIALS trials.
harness         the same worker loop with the training replaced by nothing: the budget check
                (`counts`), ask, the worker record, the draws, one report and prune check per
                epoch, tell; on the default journal file, in a study that already holds
                PRIOR_TRIALS trials (a search well under way: the journal grows with it).
Process start is paid once per worker, not per trial, and is reported apart. One torch thread.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import optuna
import torch

from benchmark import tune, tune_space
from benchmark.trial import CellTrials

CELL = ["study=demo", "model=test_resnet.demo", "loss=classic_at", "protocol=fft5", "tune=smoke"]
TRIALS = 3
PRIOR_TRIALS = 200
HARNESS_TRIALS = 50


def _bookkeeping_only(trials: CellTrials, study: optuna.Study) -> None:
    """One trial of the worker loop without its training."""
    tune_space.counts(study)
    trial = study.ask()
    trial.set_user_attr("worker", tune_space.worker_identity(trial.number, "local"))
    tune_space.suggest(trial, trials.space)
    for epoch in range(1, trials.epochs + 1):
        trial.report(1.0 + trial.number % 7, epoch)
        if trial.should_prune():
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return
    study.tell(trial, 1.0 + trial.number % 7)


def main() -> None:
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("results", "data", "weights"):
            os.environ[f"RFTBENCH_{kind.upper()}"] = str(Path(tmp) / kind)
        started = time.perf_counter()
        study_plan, config, url, searches = tune.prepare(CELL, create=True)
        spec_path = tune.worker_spec(study_plan, config, url, searches[0].cell)
        trials = CellTrials(json.loads(spec_path.read_text()), "local")
        print(f"worker_start_s={time.perf_counter() - started:.2f}  (plan, storage, splits; once per worker)")
        study = searches[0].study
        trials.objective(study.ask())  # the first trial makes the demo weights: not timed
        seconds = []
        for _ in range(TRIALS):
            start = time.perf_counter()
            study.optimize(trials.objective, n_trials=1)
            seconds.append(time.perf_counter() - start)
        trial_s = statistics.median(seconds)

        busy = tune_space.load_or_create(tune_space.open_storage(str(Path(tmp) / "busy.journal")), "busy", config)
        for _ in range(PRIOR_TRIALS):
            _bookkeeping_only(trials, busy)
        start = time.perf_counter()
        for _ in range(HARNESS_TRIALS):
            _bookkeeping_only(trials, busy)
        harness_s = (time.perf_counter() - start) / HARNESS_TRIALS
    print(f"load_average={os.getloadavg()[0]:.2f}")
    print(f"demo_trial_s={trial_s:.2f}  (median of {TRIALS})")
    print(f"harness_per_trial_s={harness_s:.4f}  (journal with {PRIOR_TRIALS}+ trials)")
    print(f"tune_overhead_share={harness_s / trial_s:.4f}")
