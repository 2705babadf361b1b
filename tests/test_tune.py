"""`rftbench tune`: the search space per protocol, bad input refused before any job, the
bookkeeping of trials (workers that die, budgets, distinct draws), the exported table a study
trains with, and one real search of the demo cell (two workers, one killed mid-trial)."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from benchmark import tune, tune_space
from benchmark.cli import main
from benchmark.study import plan
from benchmark.tune_space import TuneConfig

DEMO_CELL = ["study=demo", "model=test_resnet.demo", "loss=classic_at", "protocol=fft5"]
SLURM_DB_SOCKET = Path(os.environ.get("RFTBENCH_SLURM_DIR", "/var/lib/rftbench-slurm")) / "run" / "mariadb.sock"


def _tune_config(*overrides: str) -> TuneConfig:
    return TuneConfig.from_config(plan([*DEMO_CELL, *overrides]).config["tune"])


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def _journal_study(tmp_path: Path, cell_overrides: list[str] = DEMO_CELL) -> tuple[optuna.Study, TuneConfig]:
    planned = plan(cell_overrides)
    config = TuneConfig.from_config(planned.config["tune"])
    storage = tune_space.open_storage(str(tmp_path / "optuna.journal"))
    return tune_space.load_or_create(storage, tune_space.study_name(config, planned.cells[0]), config), config


def test_fft_tunes_both_parts_and_linear_probing_only_the_head(roots):
    config = _tune_config()
    fft, lp = (plan(["study=demo", "model=test_resnet.demo", "loss=classic_at", f"protocol={p}"]).cells[0]
               for p in ("fft5", "lp50"))
    fft_space = tune_space.cell_space(config, fft.config["protocol"])
    lp_space = tune_space.cell_space(config, lp.config["protocol"])
    assert list(fft_space) == list(tune_space.PARAMS)
    assert set(lp_space) == {"lr_head", "weight_decay_head", "cosine"}
    for param in ("lr_backbone", "lr_head"):
        assert fft_space[param] == {"low": 1e-6, "high": 1e-1, "log": True}
    for param in ("weight_decay_backbone", "weight_decay_head"):
        assert fft_space[param] == {"low": 1e-6, "high": 1e-2, "log": True}
    assert sorted(fft_space["cosine"]) == [False, True]


def test_another_search_space_is_another_optuna_study(roots):
    cell = plan(DEMO_CELL).cells[0]
    lp_cell = plan([*DEMO_CELL[:3], "protocol=lp50"]).cells[0]
    base, narrower = _tune_config(), _tune_config("tune.space.lr_head.high=0.01")
    other_backbone = _tune_config("tune.space.lr_backbone.high=0.01")
    assert tune_space.study_name(base, cell) != tune_space.study_name(narrower, cell)
    assert tune_space.study_name(base, cell).startswith(cell.id)
    # Linear probing does not search backbone values: their bounds do not split its study.
    assert tune_space.study_name(base, lp_cell) == tune_space.study_name(other_backbone, lp_cell)


def test_a_trial_draws_the_same_values_whichever_worker_asks_first(roots):
    config = _tune_config()
    space = tune_space.cell_space(config, plan(DEMO_CELL).cells[0].config["protocol"])
    first, second = (optuna.create_study(sampler=config.sampler()) for _ in range(2))
    drawn_first = [tune_space.suggest(first.ask(), space) for _ in range(3)]
    second.enqueue_trial({})  # another worker took trial 0 with no draw of this sampler
    second.ask()
    assert [tune_space.suggest(second.ask(), space) for _ in range(2)] == drawn_first[1:]
    assert drawn_first[0] != drawn_first[1]


@pytest.mark.parametrize("override, named", [
    ("tune.n_trials=0", "tune.n_trials=0"),
    ("tune.space.lr_head.low=0.5", "low 0.5 exceeds high 0.1"),
    ("tune.storage=mysql+pymysql://tuner:secret@127.0.0.1:1/optuna", "127.0.0.1:1"),
    ("tune.storage=nosuchdialect://host/db", "nosuchdialect://host/db"),
    ("model=glob(nosuchmodel*)", "nosuchmodel"),
])
def test_bad_input_is_refused_by_name_before_anything_is_written(roots, capsys, override, named):
    code = main(["tune", *DEMO_CELL, "tune=smoke", override])
    err = capsys.readouterr().err
    assert code == 2 and named in err and "Traceback" not in err
    assert "secret" not in err
    assert not any(roots["results"].iterdir())


def test_the_trial_of_a_dead_worker_is_failed_and_enqueued_again_once(tmp_path, roots):
    study, _ = _journal_study(tmp_path)
    dead, alive = study.ask(), study.ask()
    dead.set_user_attr("worker", {**tune_space.worker_identity(dead.number, "local"), "pid": _dead_pid()})
    alive.set_user_attr("worker", tune_space.worker_identity(alive.number, "local"))
    assert tune_space.reap(study, tune.workers_gone) == 1
    assert tune_space.reap(study, tune.workers_gone) == 0
    states = {t.number: t.state for t in study.get_trials()}
    assert states[dead.number] == TrialState.FAIL and states[alive.number] == TrialState.RUNNING
    retry = study.get_trials(states=(TrialState.WAITING,))
    assert len(retry) == 1 and retry[0].system_attrs["failed_trial"] == dead.number
    # The retry inherits the dead worker's record, which names the old trial: it is not reaped.
    taken = study.ask()
    assert taken.number == retry[0].number and tune_space.reap(study, tune.workers_gone) == 0


def _complete(study: optuna.Study, params: dict, value: float) -> None:
    """A complete trial with `params` (drawn from the asha space) and objective `value`."""
    space = TuneConfig.from_config(plan(DEMO_CELL).config["tune"]).space
    distributions = {k: optuna.distributions.CategoricalDistribution(space[k]) if k == "cosine" else
                     optuna.distributions.FloatDistribution(space[k]["low"], space[k]["high"], log=True)
                     for k in params}
    study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=value))


def test_a_trailing_trial_stops_at_the_first_rung_and_neither_it_nor_a_failed_one_is_chosen(tmp_path, roots):
    """The configured ASHA pruner on real trials (their values stand in for training): a trial
    that diverges trails at epoch 1 of 10 and is pruned there; one whose loss became NaN fails."""
    study, config = _journal_study(tmp_path)
    space = tune_space.cell_space(config, plan(DEMO_CELL).cells[0].config["protocol"])
    sane = study.ask()
    tune_space.suggest(sane, space)
    for epoch in range(1, config.max_epochs + 1):
        sane.report(2.0 - epoch / 100, epoch)
        assert not sane.should_prune()
    study.tell(sane, 1.9)
    diverging = study.ask({"lr_backbone": optuna.distributions.FloatDistribution(1e-6, 1e-1, log=True)})
    diverging.report(40.0, 1)
    assert diverging.should_prune()
    study.tell(diverging, state=TrialState.PRUNED)
    study.tell(study.ask(), float("nan"))  # Optuna fails a trial whose objective is NaN
    assert tune_space.table_row(plan(DEMO_CELL).cells[0], study)["lr_backbone"] == sane.params["lr_backbone"]
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL]


def test_the_exported_table_round_trips_into_the_cells_a_study_trains(tmp_path, roots):
    searches = []
    for protocol, params in (("fft5", {"lr_backbone": 2e-4, "lr_head": 3e-3, "weight_decay_backbone": 1e-5,
                                       "weight_decay_head": 4e-4, "cosine": True}),
                             ("lp50", {"lr_head": 5e-3, "weight_decay_head": 6e-4, "cosine": False})):
        overrides = [*DEMO_CELL[:3], f"protocol={protocol}"]
        study, _ = _journal_study(tmp_path / protocol, overrides)
        _complete(study, {k: v * 10 for k, v in params.items() if k != "cosine"} | {"cosine": False}, 3.0)
        _complete(study, params, 2.0)
        searches.append(tune.Search(plan(overrides).cells[0], study))
    export = tmp_path / "tuned.csv"
    assert tune.write_tables(plan(DEMO_CELL), searches, export) == 2
    rows = list(csv.DictReader(export.open()))
    assert list(rows[0]) == list(tune_space.TABLE_COLUMNS)
    assert [r["n_trials"] for r in rows] == ["2", "2"] and [r["best_value"] for r in rows] == ["2.0", "2.0"]
    assert rows[1]["lr_backbone"] == rows[1]["weight_decay_backbone"] == ""  # linear probing
    trained = plan([*DEMO_CELL[:3], "protocol=fft5,lp50", f"study.hparams={export}"]).cells
    for cell, row in zip(trained, rows):
        protocol = cell.config["protocol"]
        assert protocol["cosine"] == (row["cosine"] == "true")
        assert protocol["optimizer"]["lr_head"] == float(row["lr_head"])
        assert protocol["optimizer"]["weight_decay_head"] == float(row["weight_decay_head"])
    assert trained[0].config["protocol"]["optimizer"]["lr_backbone"] == float(rows[0]["lr_backbone"])


def test_status_counts_trials_per_state_without_creating_searches(tmp_path, roots, capsys):
    assert main(["tune", *DEMO_CELL, "tune=smoke", "--status", "--format", "json"]) == 0
    assert '"complete": 0' in capsys.readouterr().out
    journal = roots["results"] / "demo" / tune_space.TUNE_DIR / tune_space.JOURNAL_FILE
    assert not optuna.get_all_study_names(tune_space.open_storage(str(journal)))


@pytest.mark.slurm
def test_a_mariadb_storage_keeps_trials_and_retries_a_dead_workers(roots):
    if os.geteuid() != 0 or not SLURM_DB_SOCKET.exists():
        pytest.skip(f"needs root and the MariaDB of scripts/slurm-local.sh start (socket {SLURM_DB_SOCKET})")
    import pymysql

    admin = pymysql.connect(unix_socket=str(SLURM_DB_SOCKET), user="root")
    with admin.cursor() as cursor:
        for statement in ("DROP DATABASE IF EXISTS rftbench_tune_test", "CREATE DATABASE rftbench_tune_test",
                          "CREATE USER IF NOT EXISTS 'rftbench_tune'@'127.0.0.1' IDENTIFIED BY 'tune-test'",
                          "GRANT ALL ON rftbench_tune_test.* TO 'rftbench_tune'@'127.0.0.1'"):
            cursor.execute(statement)
    port = os.environ.get("RFTBENCH_SLURM_DB_PORT", "3307")
    url = f"mysql+pymysql://rftbench_tune:tune-test@127.0.0.1:{port}/rftbench_tune_test"
    try:
        searches = tune.prepare([*DEMO_CELL, "tune=smoke", f"tune.storage={url}"], create=True)[3]
        study = searches[0].study
        dead = study.ask()
        dead.set_user_attr("worker", {**tune_space.worker_identity(dead.number, "local"), "pid": _dead_pid()})
        assert tune_space.reap(study, tune.workers_gone) == 1
        params = {"lr_backbone": 1e-4, "lr_head": 1e-3, "weight_decay_backbone": 1e-5, "weight_decay_head": 1e-4,
                  "cosine": False}
        _complete(study, params, 1.5)
        row = tune_space.table_row(searches[0].cell, study)
        assert row["lr_head"] == 1e-3 and row["n_trials"] == 1
        assert tune.status(searches)[0] | {"complete": 1, "fail": 1} == tune.status(searches)[0]
    finally:
        with admin.cursor() as cursor:
            cursor.execute("DROP DATABASE IF EXISTS rftbench_tune_test")
        admin.close()


def _test_images(data_root: Path) -> list[Path]:
    directory = data_root / "digits"
    return [directory / row["path"] for row in csv.DictReader((directory / "index.csv").open())
            if row["split"] == "test"]


@pytest.mark.slow
def test_the_demo_search_finishes_its_budget_with_a_killed_worker_and_never_reads_the_test_split(tmp_path, roots):
    """Two workers tune the demo cell; one is killed with SIGKILL mid-trial. Its trial is failed
    and run again, the budget of finished trials is met, trial numbers are distinct, the test
    images (overwritten with garbage beforehand) are never read, and no result rows appear."""
    from benchmark import data

    data.load_splits(plan(DEMO_CELL).cells[0].config["dataset"], roots["data"])  # prepare digits
    for image in _test_images(roots["data"]):
        image.write_bytes(b"not an image: tuning must never read the test split")
    export = tmp_path / "tuned.csv"
    command = [sys.executable, "-m", "benchmark.cli", "tune", *DEMO_CELL, "tune=smoke", "tune.workers=2",
               "--export", str(export)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    journal = roots["results"] / "demo" / tune_space.TUNE_DIR / tune_space.JOURNAL_FILE
    victim = _wait_for_a_running_trial(journal, run)
    os.kill(victim, signal.SIGKILL)
    output = run.communicate(timeout=600)[0]
    assert run.returncode == 0, output

    storage = tune_space.open_storage(str(journal))
    study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
    trials = study.get_trials()
    finished = [t for t in trials if t.state in tune_space.FINISHED]
    killed = [t for t in trials if t.state == TrialState.FAIL and t.user_attrs["worker"]["pid"] == victim]
    assert len(finished) == 4 and len(killed) == 1
    assert any(t.system_attrs.get("failed_trial") == killed[0].number for t in finished)
    assert len({t.number for t in trials}) == len(trials)
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) >= 2
    assert not (roots["results"] / "demo" / "cells").exists()
    rows = list(csv.DictReader(export.open()))
    assert len(rows) == 1 and rows[0]["n_trials"] == "4"
    assert float(rows[0]["best_value"]) == min(t.value for t in trials if t.state == TrialState.COMPLETE)
    cell = plan([*DEMO_CELL, f"study.hparams={export}"]).cells[0]
    assert cell.config["protocol"]["optimizer"]["lr_head"] == float(rows[0]["lr_head"])


def _wait_for_a_running_trial(journal: Path, run: subprocess.Popen, timeout: float = 300) -> int:
    """The pid of a worker once it is at a trial (its first epoch under way)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and run.poll() is None:
        if journal.exists():
            storage = tune_space.open_storage(str(journal))
            for name in optuna.get_all_study_names(storage):
                study = optuna.load_study(study_name=name, storage=storage)
                for trial in study.get_trials(states=(TrialState.RUNNING,)):
                    if "worker" in trial.user_attrs:
                        time.sleep(1.0)  # into the trial's training
                        return trial.user_attrs["worker"]["pid"]
        time.sleep(0.5)
    raise AssertionError(f"no trial started: {run.communicate()[0] if run.poll() is not None else 'timeout'}")
