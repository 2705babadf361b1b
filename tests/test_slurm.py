"""Dispatch on the real local SLURM cluster (scripts/slurm-local.sh): submitit job arrays, state
reconciled with sacct, resume, requeue on a time limit, cancel, and bad input. Nothing mocked.

The cells are the demo's, made cheap so that the whole file runs in about four minutes on two
cores. The full demo (12 cells) would take far longer: its Linf AutoAttack at 4/255 alone took
about three minutes per cell here, even on 20 test images (the robust ones go through APGD-T,
FAB-T and Square). So the cells are the demo's test_resnet ones, evaluated on 20 test images at
an Linf budget that APGD-CE breaks on every image. Each still trains for real, checkpoints every
epoch and writes its five result rows: what is tested is the dispatch, not the numbers.
"""
from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from benchmark import cell as cells
from benchmark import results
from benchmark.cli import main
from benchmark.paths import PROJECT_DIR
from benchmark.study import plan
from conftest import wait_until
import launchers.slurm
from launchers import launcher_for
from launchers.local import HOST
from launchers.slurm import cluster_config, sacct
from slurm_cluster import require_slurm

pytestmark = pytest.mark.slurm
require_slurm()

CHEAP = ["study=demo", "model=test_resnet.demo", "dataset.test_size=20", "eval.linf.eps=0.25"]
# One CPU and a little memory per cell, no GPU: two cells run at once on the test node.
SLURM = ["launcher=slurm", "launcher.resources.protocol=null", "launcher.resources.model_size=null",
         "launcher.resources.default.gpus_per_node=null", "launcher.resources.default.mem=3G",
         "launcher.resources.default.cpus_per_task=1", "launcher.resources.default.time=10",
         "launcher.poll_seconds=1"]
CONDITIONS = ["clean", "linf", "l2", "l1", "common"]
TIMEOUT_S = 420  # for a few cells on a busy two-core machine


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The digits split and the demo backbone's weights, made once for every test here."""
    from benchmark import data, models

    roots = {kind: tmp_path_factory.mktemp(kind) for kind in ("data", "weights")}
    config = plan(CHEAP).cells[0].config
    data.load_splits(config["dataset"], roots["data"])
    models.make_demo_weights(config["model"], roots["weights"])
    return roots


@pytest.fixture
def results_root(inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh results root; the jobs still queued or running at the end are cancelled."""
    root = tmp_path / "results"
    for kind, path in {**inputs, "results": root}.items():
        monkeypatch.setenv(f"RFTBENCH_{kind.upper()}", str(path))
    yield root
    job_ids = {cells.read_state(p.parent).get("job_id") for p in root.glob("*/cells/*/state.json")}
    if job_ids - {None}:
        subprocess.run(["scancel", *sorted(job_ids - {None})], capture_output=True)


def _states(overrides: list[str]) -> dict[str, dict]:
    """The cells' file records by slug (what the workers and the launcher wrote)."""
    study = plan(overrides)
    return {c.slug: cells.read_state(c.directory(study.dir)) for c in study.cells}


def _status(capsys, overrides: list[str]) -> dict:
    capsys.readouterr()
    assert main(["status", *overrides, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def _wait_until(what: str, check: Callable[[], bool], timeout: float = TIMEOUT_S) -> None:
    wait_until(what, check, timeout)


def _cell_dirs(overrides: list[str]) -> list[Path]:
    study = plan(overrides)
    return [c.directory(study.dir) for c in study.cells]


def _rows(overrides: list[str]) -> pd.DataFrame:
    """Every result row of the cells, as one DataFrame."""
    return pd.concat([results.read_rows(d / cells.ROWS_FILE).to_pandas() for d in _cell_dirs(overrides)],
                     ignore_index=True)


def _log(overrides: list[str], slug: str) -> str:
    study = plan(overrides)
    cell = next(c for c in study.cells if c.slug == slug)
    path = cell.directory(study.dir) / cells.LOG_FILE
    return path.read_text() if path.exists() else ""


def test_launch_returns_at_once_skips_live_and_done_cells_and_completes(results_root, capsys):
    overrides = [*CHEAP, "protocol=fft5", *SLURM]  # the demo's 2 FFT-5 cells of test_resnet
    assert main(["launch", *overrides]) == 0
    out = capsys.readouterr().out
    assert re.search(r"submitted job \d+: 2 cells", out)
    assert "2 cells submitted in 1 job arrays" in out and f"logs in {results_root / 'demo' / 'logs'}" in out
    submitted = _states(overrides)
    assert {r["state"] for r in submitted.values()} <= {"submitted", "running"}  # returned before the cells ran
    (array,) = {r["job_id"].split("_")[0] for r in submitted.values()}  # one array of two tasks
    assert {(r["launcher"], r["launcher_kind"]) for r in submitted.values()} == {("slurm", "slurm")}
    assert sorted(r["job_id"] for r in submitted.values()) == [f"{array}_0", f"{array}_1"]

    assert main(["launch", *overrides]) == 0  # while they are queued or running
    assert "nothing to launch" in capsys.readouterr().out
    assert {s: r["job_id"] for s, r in _states(overrides).items()} == {s: r["job_id"] for s, r in submitted.items()}
    live = _status(capsys, overrides)["by_state"]
    assert live.get("queued", 0) + live.get("running", 0) + live.get("done", 0) == 2 and "failed" not in live

    _wait_until("both cells are done", lambda: _status(capsys, overrides)["by_state"].get("done") == 2)
    report = _status(capsys, overrides)
    assert report["total"] == 2 and report["by_state"] == {"done": 2}
    table = _rows(overrides)
    assert len(table) == 2 * 5 and sorted(set(table.condition)) == sorted(CONDITIONS)
    assert table.groupby("cell_id").condition.apply(list).map(lambda c: c == CONDITIONS).all()
    assert table.attempt.eq(1).all() and table.requeues.eq(0).all()
    job_of = {r["cell_id"]: r["job_id"] for r in report["cells"]}
    assert (table.slurm_job_id == table.cell_id.map(job_of)).all()
    _wait_until("sacct records both jobs COMPLETED",
                lambda: {j["State"] for j in sacct(job_of.values()).values()} == {"COMPLETED"}, 30)
    assert main(["launch", *overrides]) == 0
    assert "nothing to launch" in capsys.readouterr().out


def test_a_killed_cell_is_failed_with_a_reason_and_resume_reruns_only_it(results_root, capsys):
    overrides = [*CHEAP, "loss=classic_at", "protocol=fft5,fft50", "protocol.epochs=2", *SLURM]
    survivor, victim = plan(overrides).cells  # FFT-5, then FFT-50 (both 2 epochs here)
    assert main(["launch", *overrides]) == 0
    _wait_until("the victim has checkpointed its first epoch", lambda: "epoch 1/2" in _log(overrides, victim.slug))
    os.kill(_states(overrides)[victim.slug]["pid"], signal.SIGKILL)  # no chance to write anything

    def entry(cell) -> dict:
        return next(e for e in _status(capsys, overrides)["cells"] if e["cell_id"] == cell.id)

    _wait_until("the killed cell is failed", lambda: entry(victim)["state"] == "failed", 60)
    failed = entry(victim)
    assert failed["reason"].startswith(f"SLURM job {failed['job_id']}: ") and "signal 9" in failed["reason"]
    _wait_until("the other cell is done", lambda: entry(survivor)["state"] == "done")

    survivor_files = {p: p.read_bytes() for p in _cell_dirs(overrides)[0].iterdir() if p.is_file()}
    assert main(["resume", *overrides]) == 0
    assert "1 cells submitted" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in survivor_files} == survivor_files
    _wait_until("the resumed cell is done", lambda: _status(capsys, overrides)["by_state"] == {"done": 2})
    assert "resumed from checkpoint after epoch 1" in _log(overrides, victim.slug)
    table = _rows(overrides)
    assert len(table) == 2 * 5 and not table.duplicated(["cell_id", "condition"]).any()
    assert table.groupby("protocol").attempt.max().to_dict() == {"fft5": 1, "fft50": 2}
    capsys.readouterr()
    assert main(["collect", "study=demo"]) == 0
    assert "10 measurements" in capsys.readouterr().out


def test_a_cell_stopped_by_its_time_limit_is_requeued_and_resumes_from_its_checkpoint(results_root, capsys):
    # A 2-minute limit, signalled 30 s before it: SLURM checks limits every 30 s, so the signal
    # comes 60 to 90 s after the start. The worker has checkpointed an epoch or more by then,
    # and its 40 epochs are far from done.
    overrides = [*CHEAP, "loss=classic_at", "protocol=fft50", "protocol.epochs=40", *SLURM,
                 "launcher.resources.default.time=2", "launcher.signal_delay_s=30"]
    (slug,) = _states(overrides)
    assert main(["launch", *overrides]) == 0
    _wait_until("the cell is requeued", lambda: _states(overrides)[slug].get("requeues") == 1, 180)
    _wait_until("the requeued job restarts the cell", lambda: "resumed from checkpoint" in _log(overrides, slug), 90)
    log = _log(overrides, slug)
    before_requeue = log.split("resumed from checkpoint")[0]
    epochs_done = max(int(n) for n in re.findall(r"epoch (\d+)/40", before_requeue))
    resumed_at = int(re.search(r"resumed from checkpoint after epoch (\d+)", log).group(1))
    assert resumed_at == epochs_done >= 1
    state = _states(overrides)[slug]
    assert state["state"] == "running" and state["attempt"] == 2 and state["requeues"] == 1
    assert "Caught signal SIGUSR2" in Path(state["log"]).read_text()  # submitit's handler took it
    history = subprocess.run(["sacct", "--duplicates", "-X", "-n", "-P", "-o", "State", "-j", state["job_id"]],
                             capture_output=True, text=True, check=True).stdout.split()
    assert history[0] == "REQUEUED" and history[-1] == "RUNNING"

    capsys.readouterr()
    assert main(["cancel", *overrides]) == 0
    assert "cancelled 1 queued or running cells" in capsys.readouterr().out
    cancelled = _status(capsys, overrides)["cells"][0]
    assert cancelled["state"] == "failed" and cancelled["reason"] == "cancelled by user"
    _wait_until("sacct records the job CANCELLED",
                lambda: sacct([state["job_id"]])[state["job_id"]]["State"].startswith("CANCELLED"), 30)


def test_a_cell_raising_an_exception_is_failed_in_sacct_and_status_with_its_traceback(results_root, capsys):
    overrides = [*CHEAP, "loss=classic_at", "protocol=fft5", "protocol.optimizer.lr_head=1e38",
                 "protocol.optimizer.lr_backbone=1e38", *SLURM]
    assert main(["launch", *overrides, "--wait"]) == 1
    out = capsys.readouterr().out
    assert "failed cells (1):" in out and "collected 0 measurements" in out
    (entry,) = _status(capsys, overrides)["cells"]
    assert entry["state"] == "failed" and entry["traceback"].startswith("Traceback (most recent call last)")
    assert entry["reason"].split(":")[0] in entry["traceback"].splitlines()[-1]
    _wait_until("sacct records the job FAILED",
                lambda: sacct([entry["job_id"]])[entry["job_id"]]["State"] == "FAILED", 30)
    capsys.readouterr()
    assert main(["status", *overrides]) == 0
    text = capsys.readouterr().out
    assert f"reason: {entry['reason']}" in text and "Exited with exit code 1" in text  # the job log's tail


def test_resume_goes_back_to_slurm_by_itself_and_local_cells_are_never_asked_of_sacct(results_root, capsys,
                                                                                      monkeypatch):
    diverging = [*CHEAP, "loss=classic_at", "protocol.optimizer.lr_head=1e38", "protocol.optimizer.lr_backbone=1e38"]
    on_slurm, both = [*diverging, "protocol=fft5"], [*diverging, "protocol=fft5,lp50"]
    assert main(["launch", *on_slurm, *SLURM, "--wait"]) == 1  # it fails: its loss diverges
    (slurm_cell,) = plan(on_slurm).cells
    first = cells.read_state(slurm_cell.directory(plan(on_slurm).dir))
    assert first["state"] == "failed" and first["launcher_kind"] == "slurm"

    capsys.readouterr()
    assert main(["resume", *on_slurm]) == 0  # no launcher on the command line: the cell's own
    assert "1 cells submitted in 1 job arrays" in capsys.readouterr().out
    again = cells.read_state(slurm_cell.directory(plan(on_slurm).dir))
    assert again["job_id"] != first["job_id"]
    assert (again["launcher"], again["launcher_config"]) == (first["launcher"], first["launcher_config"])

    # While the SLURM cell is queued or running, a local worker is at the other cell: this process.
    study = plan(both)
    (local_cell,) = [c for c in study.cells if c.id != slurm_cell.id]
    local_dir = local_cell.directory(study.dir)
    cells.write_config(local_cell, local_dir, study.name)
    cells.write_state(local_dir, "running", launcher="local", launcher_kind="local", host=HOST, pid=os.getpid())
    (local_dir / cells.HEARTBEAT_FILE).touch()
    asked: list[str] = []
    real_sacct = launchers.slurm.sacct
    monkeypatch.setattr(launchers.slurm, "sacct", lambda ids: real_sacct(asked.extend(ids) or ids))
    states = {e["cell_id"]: e["state"] for e in _status(capsys, both)["cells"]}
    assert states[local_cell.id] == "running" and states[slurm_cell.id] in ("queued", "running", "failed")
    assert asked == [again["job_id"]]  # one sacct call, about the SLURM cell's job only
    _wait_until("the resumed cell fails again", lambda: cells.read_state(slurm_cell.directory(study.dir))["state"]
                == "failed", 120)


def test_workers_that_are_not_cells_run_as_one_job_array(results_root):
    study = plan([*CHEAP, *SLURM])
    slurm = launcher_for(study.config["launcher"])
    markers = [results_root / f"worker{i}" for i in range(2)]
    records = [slurm.submit_workers(study, functools.partial(Path.write_text, marker, "done"), 1, f"probe{i}")[0]
               for i, marker in enumerate(markers)]
    assert all(r["launcher_kind"] == "slurm" and r["job_id"] for r in records)
    by_name = {f"probe{i}": record for i, record in enumerate(records)}
    _wait_until("both workers ended", lambda: {s.state for s in slurm.job_states(by_name).values()} == {"ended"}
                and len(slurm.job_states(by_name)) == 2, 120)
    assert all(marker.read_text() == "done" for marker in markers)
    assert all("COMPLETED" in state.reason for state in slurm.job_states(by_name).values())


def test_an_unknown_partition_shows_sbatch_message_and_records_nothing(results_root, capsys):
    overrides = [*CHEAP, "protocol=fft5", *SLURM, "launcher.partition=nosuchpartition"]
    assert main(["launch", *overrides]) == 2
    err = capsys.readouterr().err
    assert "sbatch refused" in err and "invalid partition specified: nosuchpartition" in err
    assert "None of these cells was submitted" in err
    assert {r["state"] for r in _states(overrides).values()} == {"pending"}


def test_an_unreachable_controller_is_a_clear_error_and_writes_nothing(results_root, tmp_path):
    # The cluster's own configuration, but pointing at a port where no controller listens.
    config = Path(cluster_config()["SLURM_CONF"]).read_text()
    unreachable = tmp_path / "slurm.conf"
    unreachable.write_text(re.sub(r"(?m)^SlurmctldPort=.*\n", "", config) + "SlurmctldPort=9\n")
    done = subprocess.run([sys.executable, "-m", "benchmark.cli", "launch", *CHEAP, *SLURM],
                          cwd=PROJECT_DIR, env={**os.environ, "SLURM_CONF": str(unreachable)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "rftbench launch: error: no SLURM controller answers" in done.stderr
    assert "Unable to contact slurm controller" in done.stderr
    assert not results_root.exists()
